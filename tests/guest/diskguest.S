/*
 * diskguest.S - boot-sector guest for the libvirt tests (tests/e2e/libvirt-*.sh):
 * a heartbeat in RAM and, optionally, a stream of stamped disk writes.
 *
 * Booted by SeaBIOS from sector 0 of the domain's disk (virtio-blk or IDE).
 * It stays in 16-bit real mode so that it can call the BIOS, and loops:
 *
 *   HB_COUNT += 1
 *   if not DISK_WRITES:
 *       hlt until the next interrupt: the BIOS timer ticks at 18.2 Hz, so
 *       HB_COUNT counts about 18 per second since boot and costs no CPU (a
 *       guest that booted anew cannot pass for the one that was migrated)
 *   else:
 *       s = HB_DONE + 1                       (the stamp of this write)
 *       HB_STAMP = s
 *       k = (s - 1) mod WRITE_SECTORS
 *       write one sector at LBA WRITE_LBA + k with int 13h AH=43h, holding
 *       128 little-endian u32: [0] = 0x57595246 ("FRYW"), [1] = s,
 *       [2] = WRITE_LBA + k, [3..127] = s
 *       on success HB_DONE = s, else HB_ERRS += 1 and HB_LASTERR = AH
 *       (the same stamp is written again next time)
 *
 * So once HB_DONE >= WRITE_SECTORS, a disk holding every completed write
 * has, for its largest stamp M, exactly the stamps M-WRITE_SECTORS+1 .. M in
 * the range, stamp s at sector (s-1) mod WRITE_SECTORS; a lost or stale write
 * breaks that. When the guest is stopped, M is HB_DONE, or HB_DONE + 1 when
 * the write of HB_STAMP reached the disk before the vCPU stopped.
 *
 * Heartbeat block at HB_ADDR (guest physical, little-endian u32 each; read
 * it with `virsh qemu-monitor-command --hmp DOM 'xp /6wx 0x7e00'`):
 *   +0  HB_COUNT    loop iterations (the heartbeat; ~18/s without DISK_WRITES)
 *   +4  HB_MAGIC    0x44595246 ("FRYD") once initialised
 *   +8  HB_DONE     completed disk writes (= last completed stamp)
 *   +12 HB_ERRS     failed int 13h calls
 *   +16 HB_STAMP    stamp of the write in progress
 *   +20 HB_LASTERR  AH of the last failed call | boot drive << 8
 *
 * Build-time constants (as --defsym NAME=VALUE):
 *   DISK_WRITES    0: heartbeat only (default); 1: also write the disk
 *   WRITE_LBA      first sector of the written range   (default 2048)
 *   WRITE_SECTORS  sectors in the range, a power of 2  (default 256)
 */

	.ifndef DISK_WRITES
	.equ	DISK_WRITES, 0
	.endif
	.ifndef WRITE_LBA
	.equ	WRITE_LBA, 2048
	.endif
	.ifndef WRITE_SECTORS
	.equ	WRITE_SECTORS, 256
	.endif

	.if	(WRITE_SECTORS & (WRITE_SECTORS - 1)) || (WRITE_SECTORS == 0)
	.error	"WRITE_SECTORS must be a power of 2"
	.endif

	.equ	HB_ADDR, 0x7e00
	.equ	HB_COUNT, HB_ADDR
	.equ	HB_MAGIC, HB_ADDR + 4
	.equ	HB_DONE, HB_ADDR + 8
	.equ	HB_ERRS, HB_ADDR + 12
	.equ	HB_STAMP, HB_ADDR + 16
	.equ	HB_LASTERR, HB_ADDR + 20
	.equ	DAP, HB_ADDR + 0x40	/* int 13h disk address packet */
	.equ	BUF, 0x8000		/* one sector */
	.equ	MAGIC_VAL, 0x44595246	/* "FRYD" */
	.equ	SECTOR_MAGIC, 0x57595246	/* "FRYW" */
	.equ	STACK_TOP, 0x7c00

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
	sti				/* the BIOS disk code may want its timer */
	/* clear the block: a checker must not trust a stale magic */
	xorl	%eax, %eax
	movw	$HB_ADDR, %di
	movw	$16, %cx
	rep stosl
	movb	%dl, HB_LASTERR+1	/* boot drive, from the BIOS */
	movl	$MAGIC_VAL, HB_MAGIC

loop:
	addl	$1, HB_COUNT
	.if	DISK_WRITES
	movl	HB_DONE, %eax
	incl	%eax
	movl	%eax, HB_STAMP
	movw	$BUF, %di
	movw	$128, %cx
	rep stosl			/* every word = stamp */
	decl	%eax
	andl	$(WRITE_SECTORS - 1), %eax
	addl	$WRITE_LBA, %eax	/* LBA of this write */
	movl	$SECTOR_MAGIC, BUF
	movl	%eax, BUF+8
	movw	$0x10, DAP		/* size 16, reserved 0 */
	movw	$1, DAP+2		/* one sector */
	movw	$BUF, DAP+4		/* buffer offset */
	movw	$0, DAP+6		/* buffer segment */
	movl	%eax, DAP+8		/* LBA low */
	movl	$0, DAP+12		/* LBA high */
	movw	$DAP, %si
	movb	HB_LASTERR+1, %dl
	movw	$0x4300, %ax		/* extended write, no verify */
	int	$0x13
	jc	write_failed
	movl	HB_STAMP, %eax
	movl	%eax, HB_DONE
	jmp	loop
write_failed:
	addl	$1, HB_ERRS
	movb	%ah, HB_LASTERR
	.else
	hlt			/* until the BIOS timer ticks (18.2 Hz): no CPU burnt */
	.endif
	jmp	loop

	.org	510
	.byte	0x55, 0xaa
