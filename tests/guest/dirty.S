/*
 * dirty.S - boot-sector guest that keeps dirtying a RAM area in a checkable
 * pattern (ferry migration tests).
 *
 * Booted by SeaBIOS from a raw disk image (IDE or floppy). It switches to
 * 32-bit protected mode with flat 4 GiB segments, then:
 *
 *   pass 0 (initialisation): write 0 over every 32-bit word of the area
 *   publish the heartbeat block (magic, done = 0)
 *   for g = 1, 2, 3, ...:
 *       HB_CUR  = g
 *       write g into every word of the area, lowest address first,
 *       one 4 KiB page at a time, adding 1024 to HB_WORDS after each page
 *       HB_DONE = g
 *
 * Invariant, once HB_MAGIC is set and at any instant the guest is stopped:
 * the area is a (possibly empty) prefix of words equal to G followed by
 * words equal to G-1, where G = HB_CUR. HB_DONE is HB_CUR-1 while a pass
 * runs, HB_CUR between the last store of a pass and the next HB_CUR store.
 *
 * Heartbeat block at HB_ADDR (guest physical, little endian u32 each):
 *   +0  HB_MAGIC  0x59525246 ("FRRY")
 *   +4  HB_DONE   last completed pass
 *   +8  HB_CUR    pass in progress
 *   +12 HB_WORDS  words written in passes >= 1, low 32 bits
 *   +16 HB_WORDSH high 32 bits
 *   +20 area base   (so a checker can find the area by itself)
 *   +24 area size in bytes
 *
 * Build-time constants (override with `as --defsym NAME=VALUE`):
 *   AREA_BASE  guest physical start, 4 KiB aligned   (default 16 MiB)
 *   AREA_SIZE  bytes, multiple of 4096, > 0          (default 32 MiB)
 *   HB_ADDR    heartbeat block                       (default 0x7e00)
 *   MAX_PASSES stop after this many passes and halt  (default: never stop;
 *              a benchmark guest whose RAM is non-zero but quiet)
 * The guest needs RAM >= AREA_BASE + AREA_SIZE.
 */

	.ifndef AREA_BASE
	.equ	AREA_BASE, 0x1000000
	.endif
	.ifndef AREA_SIZE
	.equ	AREA_SIZE, 0x2000000
	.endif
	.ifndef HB_ADDR
	.equ	HB_ADDR, 0x7e00
	.endif

	.equ	HB_MAGIC_VAL, 0x59525246
	.equ	PAGE_WORDS, 1024
	.equ	CODE_SEL, 0x08
	.equ	DATA_SEL, 0x10
	.equ	STACK_TOP, 0x7000

	.if	(AREA_SIZE % 4096) || (AREA_SIZE == 0) || (AREA_BASE % 4096)
	.error	"AREA_BASE must be 4 KiB aligned and AREA_SIZE a non-zero multiple of 4096"
	.endif

	.text
	.code16
	.globl	_start
_start:
	cli
	cld
	xorw	%ax, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	$STACK_TOP, %sp
	ljmp	$0, $real_start		/* normalise CS:IP to 0000:7cxx */

real_start:
	/* mask NMI (CMOS index port bit 7) */
	inb	$0x70, %al
	orb	$0x80, %al
	outb	%al, $0x70

	/* A20: ask the BIOS, then use the fast A20 gate as well */
	movw	$0x2401, %ax
	int	$0x15
	inb	$0x92, %al
	testb	$0x02, %al
	jnz	1f
	orb	$0x02, %al
	andb	$0xfe, %al		/* never pulse the reset bit */
	outb	%al, $0x92
1:
	lgdtl	gdt_desc
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$CODE_SEL, $pm32

	.code32
pm32:
	movw	$DATA_SEL, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	movw	%ax, %fs
	movw	%ax, %gs
	movl	$STACK_TOP, %esp

	/* clear the heartbeat block: a checker must not trust a stale magic */
	xorl	%eax, %eax
	movl	$HB_ADDR, %edi
	movl	$8, %ecx
	rep stosl

	/* pass 0: zero the area so that pass 1 already satisfies the invariant */
	movl	$AREA_BASE, %edi
	movl	$(AREA_SIZE / 4), %ecx
	rep stosl

	movl	$0, HB_ADDR+4		/* done  */
	movl	$0, HB_ADDR+8		/* cur   */
	movl	$0, HB_ADDR+12		/* words */
	movl	$0, HB_ADDR+16
	movl	$AREA_BASE, HB_ADDR+20
	movl	$AREA_SIZE, HB_ADDR+24
	movl	$HB_MAGIC_VAL, HB_ADDR	/* published last */

	movl	$1, %eax		/* g */
pass:
	movl	%eax, HB_ADDR+8
	movl	$AREA_BASE, %edi
	movl	$(AREA_SIZE / 4096), %edx
page:
	movl	$PAGE_WORDS, %ecx
	rep stosl
	addl	$PAGE_WORDS, HB_ADDR+12
	adcl	$0, HB_ADDR+16
	decl	%edx
	jnz	page
	movl	%eax, HB_ADDR+4
	.ifdef	MAX_PASSES
	cmpl	$MAX_PASSES, %eax
	jae	idle
	.endif
	incl	%eax
	jmp	pass
	.ifdef	MAX_PASSES
idle:
	hlt				/* interrupts are off: stays here */
	jmp	idle
	.endif

	.p2align 3
gdt:
	.quad	0x0000000000000000	/* null */
	.quad	0x00cf9a000000ffff	/* 0x08: code, base 0, limit 4 GiB, 32-bit */
	.quad	0x00cf92000000ffff	/* 0x10: data, base 0, limit 4 GiB */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.long	gdt

	.org	510
	.byte	0x55, 0xaa
