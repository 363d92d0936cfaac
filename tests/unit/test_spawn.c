/* The destination's QEMU command line built from the source's (spawn.h):
 * what is kept, remapped, dropped and refused, on good and hostile command
 * lines; and the file checks before a start. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "controlplane/spawn.h"

static const struct ferry_spawn_config cfg = {
	.qemu = "/usr/bin/qemu-system-x86_64",
	.storage_dir = "/var/lib/ferry/images",
	.mem_dir = "/dev/shm/ferry",
	.qmp_path = "/run/ferry/web,1.qmp",
	.pidfile = "/run/ferry/web-1.pid",
};

/* A <vm> with the given argv (NULL-terminated). */
static void vm_of(struct ferry_cookie_vm *vm, const char *const *argv)
{
	memset(vm, 0, sizeof(*vm));
	for (; *argv; argv++) {
		size_t n = strlen(*argv) + 1;
		memcpy(vm->cmdline + vm->cmdline_len, *argv, n);
		vm->cmdline_len += n;
		vm->nargs++;
	}
}

static struct ferry_spawn_cmd cmd;
static struct ferry_err err;

static int build(const struct ferry_spawn_config *c, const char *const *argv)
{
	static struct ferry_cookie_vm vm;
	vm_of(&vm, argv);
	ferry_spawn_cmd_free(&cmd);
	ferry_err_clear(&err);
	return ferry_spawn_build(c, &vm, &cmd, &err);
}

/* The output, one string, arguments separated by '|'. */
static const char *joined(void)
{
	static char s[8192];
	size_t o = 0;
	s[0] = '\0';
	for (size_t i = 0; i < cmd.argc && o < sizeof(s); i++)
		o += (size_t)snprintf(s + o, sizeof(s) - o, "%s%s", i ? "|" : "", cmd.argv[i]);
	return s;
}

/* argv builds, to exactly want ('|' between arguments). */
static void builds_to(const struct ferry_spawn_config *c, const char *const *argv, const char *want, const char *what)
{
	int r = build(c, argv);
	CHECK(r == 0, "%s: accepted (%s)", what, err.msg);
	CHECK(strcmp(joined(), want) == 0, "%s: %s", what, joined());
}

#define REFUSED(needle, ...) do { \
	const char *a_[] = { __VA_ARGS__, NULL }; \
	int r_ = build(&cfg, a_); \
	CHECK(r_ < 0 && cmd.argv == NULL, "refused: %s (%d)", (needle), r_); \
	CHECK_MSG(err, (needle), "  says '%s': %s", (needle), err.msg); \
} while (0)

#define Q "qemu-system-x86_64"
#define MAX_ARGS 64

static void test_good(void)
{
	/* What tests/lib/qemu.sh starts, as /proc/PID/cmdline shows it. */
	const char *src[] = { Q, "-name", "ferry-vm", "-nodefaults", "-no-user-config", "-display", "none", "-machine",
			      "pc,memory-backend=ram0", "-accel", "tcg", "-m", "256M", "-object",
			      "memory-backend-file,id=ram0,size=256M,mem-path=/dev/shm/ferry-test-9-src.ram,share=on,prealloc=off",
			      "-qmp", "unix:/tmp/q/src.qmp,server=on,wait=off", "-monitor", "none", "-serial", "none",
			      "-parallel", "none", "-drive", "file=/tmp/q/src.img,format=raw,if=ide,index=0", "-boot", "c",
			      "-qmp", "unix:/tmp/q/a/web-1.qmp,server=on,wait=off", NULL };
	builds_to(&cfg, src,
		     "/usr/bin/qemu-system-x86_64|-name|ferry-vm|-nodefaults|-no-user-config|-machine|pc,memory-backend=ram0|"
		     "-accel|tcg|-m|256M|-object|memory-backend-file,id=ram0,size=256M,"
		     "mem-path=/dev/shm/ferry/ferry-test-9-src.ram,share=on,prealloc=off|-serial|none|-parallel|none|"
		     "-drive|file=/var/lib/ferry/images/src.img,format=raw,if=ide,index=0|-boot|c|-display|none|-S|"
		     "-incoming|defer|-qmp|unix:/run/ferry/web,,1.qmp,server=on,wait=off|-pidfile|/run/ferry/web-1.pid",
		  "the tests' command line: kept, remapped, dropped, added");
	CHECK(cmd.nfiles == 2, "two files: %zu", cmd.nfiles);
	{
		/* A started QEMU can migrate on: its own command line comes out the same. */
		char first[8192];
		snprintf(first, sizeof(first), "%s", joined());
		const char *again[MAX_ARGS + 1];
		size_t n = 0;
		for (; n < cmd.argc && n < MAX_ARGS; n++)
			again[n] = strdup(cmd.argv[n]);
		again[n] = NULL;
		builds_to(&cfg, again, first, "a started QEMU's own command line");
		for (size_t i = 0; i < n; i++)
			free((char *)again[i]);
	}
	CHECK(build(&cfg, src) == 0, "rebuilt the first one");
	CHECK(cmd.files[0].kind == FERRY_SPAWN_RAM && strcmp(cmd.files[0].path, "/dev/shm/ferry/ferry-test-9-src.ram") == 0,
	      "RAM file remapped: %s", cmd.files[0].path);
	CHECK(cmd.files[1].kind == FERRY_SPAWN_IMAGE && strcmp(cmd.files[1].device, "ide0-hd0") == 0 &&
		      strcmp(cmd.files[1].source_path, "/tmp/q/src.img") == 0,
	      "image of device %s from %s", cmd.files[1].device, cmd.files[1].source_path);

	struct ferry_spawn_config pre = cfg;
	pre.prealloc = true;
	pre.pidfile = NULL;
	const char *libvirtish[] = { "/usr/bin/" Q, "--name", "guest=web,debug-threads=on", "-uuid",
				     "6f1c2a3b-4d5e-4f60-8172-93a4b5c6d7e8", "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off",
				     "-accel", "kvm", "-cpu", "host,+x2apic", "-smp", "2,sockets=1,cores=2", "-object",
				     "memory-backend-ram,id=pc.ram,size=1073741824", "-chardev",
				     "socket,id=charmonitor,fd=31,server=on,wait=off", "-mon",
				     "chardev=charmonitor,id=monitor,mode=control", "-rtc", "base=utc", "-no-shutdown",
				     "-global", "PIIX4_PM.disable_s3=1", "-blockdev",
				     "driver=file,filename=/var/lib/libvirt/images/web.raw,node-name=f0,read-only=off",
				     "-blockdev", "driver=raw,file=f0,node-name=d0", "-device",
				     "virtio-blk-pci,drive=d0,id=virtio-disk0,bootindex=1", "-netdev", "user,id=n0",
				     "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,romfile=", "-chardev",
				     "pty,id=charserial0", "-device", "isa-serial,chardev=charserial0,id=serial0",
				     "-vnc", "127.0.0.1:0", "-device", "VGA,id=video0", "-daemonize", "-msg", "timestamp=on",
				     NULL };
	builds_to(&pre, libvirtish,
		     "/usr/bin/qemu-system-x86_64|-name|guest=web,debug-threads=on|-uuid|6f1c2a3b-4d5e-4f60-8172-93a4b5c6d7e8|"
		     "-machine|pc-i440fx-7.2,usb=off,dump-guest-core=off|-accel|kvm|-cpu|host,+x2apic|-smp|"
		     "2,sockets=1,cores=2|-object|memory-backend-ram,id=pc.ram,size=1073741824,prealloc=on|-chardev|"
		     "null,id=charmonitor|-rtc|base=utc|-no-shutdown|-global|PIIX4_PM.disable_s3=1|-blockdev|"
		     "driver=file,filename=/var/lib/ferry/images/web.raw,node-name=f0,read-only=off|-blockdev|"
		     "driver=raw,file=f0,node-name=d0|-device|virtio-blk-pci,drive=d0,id=virtio-disk0,bootindex=1|-netdev|"
		     "user,id=n0|-device|virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,romfile=|-chardev|"
		     "null,id=charserial0|-device|isa-serial,chardev=charserial0,id=serial0|-device|VGA,id=video0|-msg|"
		     "timestamp=on|-display|none|-S|-incoming|defer|-qmp|unix:/run/ferry/web,,1.qmp,server=on,wait=off",
		  "libvirt style: chardevs null, monitors/vnc/daemonize dropped, blockdev remapped, prealloc forced");
	CHECK(cmd.nfiles == 1 && cmd.files[0].device[0] == '\0', "a blockdev image has no known device name");

	const char *commas[] = { Q, "-drive", "file=/x/a,,b.img,format=raw,id=disk0", NULL };
	int r = build(&cfg, commas);
	CHECK(r < 0 && strstr(err.msg, "file name must be"), "a comma in a file name is refused: %s", err.msg);
	const char *virtio[] = { Q, "-drive", "file=/x/d.img,if=virtio,index=1,format=raw", "-drive",
				 "if=ide,media=cdrom,index=2", NULL };
	r = build(&cfg, virtio);
	CHECK(r == 0 && cmd.nfiles == 1 && strcmp(cmd.files[0].device, "virtio1") == 0,
	      "virtio drive named virtio1, an empty cdrom has no file (%s)", err.msg);
}

static void test_hostile(void)
{
	REFUSED("not a qemu-system-* binary", "/bin/sh", "-c", "id");
	REFUSED("not a qemu-system-* binary", "qemu-system-x86_64; rm", "-S");
	REFUSED("the source runs qemu-system-aarch64, this host's QEMU is qemu-system-x86_64", "/opt/qemu-system-aarch64");
	REFUSED("option -plugin is refused", Q, "-plugin", "/tmp/evil.so");
	REFUSED("option -add-fd is refused", Q, "-add-fd", "fd=3,set=1");
	REFUSED("option -fsdev is refused", Q, "-fsdev", "local,id=f,path=/");
	REFUSED("option -virtfs is refused", Q, "-virtfs", "local,path=/,mount_tag=r");
	REFUSED("option -L is refused", Q, "-L", "/tmp");
	REFUSED("-bios /tmp/evil.bin: only a firmware name", Q, "-bios", "/tmp/evil.bin");
	REFUSED("option -kernel is refused", Q, "-kernel", "/boot/vmlinuz");
	REFUSED("option -readconfig is refused", Q, "--readconfig", "/etc/shadow");
	REFUSED("option '-evil' is not on the list", Q, "-evil", "x");
	REFUSED("argument 'disk.img' is not an option", Q, "disk.img");
	REFUSED("option -m lacks its argument", Q, "-m");
	REFUSED("only user networking", Q, "-netdev", "tap,id=n,script=/tmp/x.sh");
	REFUSED("property 'smb' is not allowed", Q, "-netdev", "user,id=n,smb=/");
	REFUSED("property 'guestfwd' is not allowed", Q, "-netdev", "user,id=n,guestfwd=tcp:10.0.2.1:1-cmd:id");
	{
		struct ferry_spawn_config nomem = cfg;
		nomem.mem_dir = NULL;
		const char *a[] = { Q, "-object", "memory-backend-file,id=m,size=1G,mem-path=/etc/passwd",
				    NULL };
		CHECK(build(&nomem, a) == -EPERM && strstr(err.msg, "no directory for RAM files (ferryd --mem-dir)"),
		      "memory-backend-file without a --mem-dir: %s", err.msg);
		CHECK(build(&cfg, a) == 0 && strstr(joined(), "mem-path=/dev/shm/ferry/passwd|"),
		      "with one, the RAM file is always in it: %s", joined());
	}
	REFUSED("property 'server.type' is not allowed", Q, "-blockdev", "driver=raw,server.type=inet");
	REFUSED("-object rng-random is not started here", Q, "-object", "rng-random,id=r,filename=/dev/sda");
	REFUSED("-object secret is not started here", Q, "-object", "secret,id=s,file=/root/key");
	REFUSED("property 'romfile' names something on the host", Q, "-device", "e1000,romfile=/tmp/rom");
	REFUSED("property 'x-igd-opregion' names something", Q, "-device", "virtio-net-pci,x-igd-opregion=on");
	REFUSED("-device vfio-pci: this driver is not on the list", Q, "-device", "vfio-pci,host=01:00.0");
	REFUSED("-device vhost-user-fs-pci", Q, "-device", "driver=vhost-user-fs-pci,chardev=c");
	REFUSED("property 'romfile' names", Q, "-global", "e1000.romfile=/tmp/x");
	REFUSED("only format=raw", Q, "-drive", "file=/a/b.qcow2,format=qcow2");
	REFUSED("without format= QEMU would probe", Q, "-drive", "file=/a/b.img");
	REFUSED("property 'backing' is not allowed", Q, "-drive", "file=/a/b.img,format=raw,backing=/etc/x");
	REFUSED("property 'file.filename' is not allowed", Q, "-drive", "file.filename=/etc/x,format=raw");
	REFUSED("property 'snapshot' is not allowed", Q, "-drive", "file=/a/b.img,format=raw,snapshot=on");
	REFUSED("only the file and raw drivers", Q, "-blockdev", "driver=nbd,server.type=inet,export=x");
	REFUSED("property 'server.host' is not allowed", Q, "-blockdev", "driver=raw,server.host=x");
	REFUSED("option -device in JSON form", Q, "-device", "{\"driver\":\"vfio-pci\",\"host\":\"01:00.0\"}");
	REFUSED("option -blockdev in JSON form", Q, "-blockdev", "{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}");
	REFUSED("the file name must be", Q, "-drive", "file=/a/..,format=raw");
	REFUSED("the file name must be", Q, "-drive", "file=/a/,format=raw");
	REFUSED("the file name must be", Q, "-drive", "file=json:{\"driver\":\"nbd\"},format=raw");
	REFUSED("a second file named 'x.img'", Q, "-drive", "file=/a/x.img,format=raw", "-drive", "file=/b/x.img,format=raw");
	REFUSED("property 'kernel' is not allowed", Q, "-machine", "pc,kernel=/boot/vmlinuz");
	REFUSED("property 'firmware' is not allowed", Q, "-machine", "q35,firmware=/tmp/f.fd");
	REFUSED("sets 'type' twice", Q, "-machine", "pc,type=q35");
	REFUSED("only kvm and tcg", Q, "-accel", "xen");
	REFUSED("property 'splash' is not allowed", Q, "-boot", "order=c,splash=/tmp/x.bmp");
	REFUSED("-smbios file=", Q, "-smbios", "file=/tmp/x");
	REFUSED("write it as -netdev", Q, "-nic", "tap,script=/x");
	REFUSED("option -spice is refused", Q, "-spice", "unix=on,addr=/tmp/s");
	REFUSED("has an empty property name", Q, "-device", "e1000,=x");
	REFUSED("-chardev '' has no id", Q, "-chardev", "");

	/* Bad cookies' command lines never get as far as an option. */
	struct ferry_cookie_vm vm;
	memset(&vm, 0, sizeof(vm));
	ferry_err_clear(&err);
	CHECK(ferry_spawn_build(&cfg, &vm, &cmd, &err) == -EINVAL && strstr(err.msg, "carries no QEMU command line"),
	      "no command line: %s", err.msg);
	const char *two[] = { Q, "-S", NULL };
	vm_of(&vm, two);
	vm.nargs = 3;
	ferry_err_clear(&err);
	CHECK(ferry_spawn_build(&cfg, &vm, &cmd, &err) == -EINVAL && strstr(err.msg, "holds 2 arguments, not 3"),
	      "a count that does not match: %s", err.msg);
	vm_of(&vm, two);
	vm.cmdline[vm.cmdline_len - 1] = 'x';
	ferry_err_clear(&err);
	CHECK(ferry_spawn_build(&cfg, &vm, &cmd, &err) == -EINVAL, "an unterminated command line: %s", err.msg);
	/* Every option a QEMU has seen must be in its place: none of ours repeated. */
	const char *incoming[] = { Q, "-incoming", "tcp:0:4444", "-S", "-pidfile", "/etc/x", "-daemonize", NULL };
	CHECK(build(&cfg, incoming) == 0 && strstr(joined(), "tcp:0:4444") == NULL && strstr(joined(), "/etc/x") == NULL &&
		      strstr(joined(), "daemonize") == NULL,
	      "the source's -incoming, -pidfile, -daemonize are dropped: %s", joined());
}

static void test_files(void)
{
	char dir[] = "/tmp/ferry-spawn-test.XXXXXX";
	CHECK(mkdtemp(dir) != NULL, "temp dir");
	char img[300], ram[300];
	snprintf(img, sizeof(img), "%s/disk.img", dir);
	snprintf(ram, sizeof(ram), "%s/vm.ram", dir);
	struct ferry_spawn_config c = cfg;
	c.storage_dir = dir;
	c.mem_dir = dir;
	const char *argv[] = { Q, "-object", "memory-backend-file,id=m,size=1M,mem-path=/src/vm.ram", "-drive",
			       "file=/src/disk.img,format=raw,if=ide,index=0", NULL };
	static struct ferry_cookie_vm vm;
	vm_of(&vm, argv);
	vm.nblockdevs = 1;
	strcpy(vm.blockdevs[0].name, "ide0-hd0");
	vm.blockdevs[0].capacity = 4096;
	ferry_spawn_cmd_free(&cmd);
	CHECK(ferry_spawn_build(&c, &vm, &cmd, &err) == 0, "build (%s)", err.msg);

	ferry_err_clear(&err);
	CHECK(ferry_spawn_check_files(&cmd, &vm, &err) == -ENOENT && strstr(err.msg, img) && strstr(err.msg, "/src/disk.img"),
	      "a missing image is named: %s", err.msg);
	CHECK(access(ram, F_OK) != 0, "the RAM file made before is removed again");
	int fd = open(img, O_CREAT | O_WRONLY, 0600);
	CHECK(fd >= 0 && ftruncate(fd, 1024) == 0, "image of 1024 bytes");
	close(fd);
	ferry_err_clear(&err);
	CHECK(ferry_spawn_check_files(&cmd, &vm, &err) == -EINVAL && strstr(err.msg, "holds 1024 bytes, the source's ide0-hd0 4096"),
	      "an image of another size: %s", err.msg);
	CHECK(truncate(img, 4096) == 0, "image of 4096 bytes");
	ferry_err_clear(&err);
	CHECK(ferry_spawn_check_files(&cmd, &vm, &err) == 0, "the right image: %s", err.msg);
	struct stat st;
	CHECK(lstat(ram, &st) == 0 && (st.st_mode & 0777) == 0600, "the RAM file is created, owner only");
	ferry_err_clear(&err);
	CHECK(ferry_spawn_check_files(&cmd, &vm, &err) == -EEXIST && strstr(err.msg, ram),
	      "an existing RAM file is never reused: %s", err.msg);
	ferry_spawn_remove_ram(&cmd);
	CHECK(access(ram, F_OK) != 0, "RAM file removed");
	CHECK(unlink(img) == 0 && symlink("/etc/passwd", img) == 0, "the image made a symbolic link");
	ferry_err_clear(&err);
	CHECK(ferry_spawn_check_files(&cmd, &vm, &err) == -EPERM && strstr(err.msg, "not a regular file"),
	      "a link is refused: %s", err.msg);
	unlink(img);

	/* Storage migration: a listed disk's missing image is made empty, of
	 * the disk's size; a link in its place is not followed; unlisted disks
	 * are left alone. */
	static struct ferry_cookie ck;
	ck.flags = FERRY_COOKIE_NBD;
	ck.nbd.ndisks = 1;
	strcpy(ck.nbd.disks[0].target, "other");
	ck.nbd.disks[0].capacity = 4096;
	ferry_err_clear(&err);
	CHECK(ferry_spawn_make_images(&cmd, &ck, &err) == 0 && access(img, F_OK) != 0, "an unlisted disk gets no image");
	strcpy(ck.nbd.disks[0].target, "ide0-hd0");
	CHECK(ferry_spawn_make_images(&cmd, &ck, &err) == 0 && lstat(img, &st) == 0 && st.st_size == 4096 &&
		      (st.st_mode & 0777) == 0600 && st.st_blocks == 0,
	      "a listed disk's image is made sparse, of its size, owner only (%s)", err.msg);
	CHECK(ferry_spawn_check_files(&cmd, &vm, &err) == 0, "and passes the check: %s", err.msg);
	ferry_spawn_remove_ram(&cmd);
	ferry_spawn_remove_images(&cmd);
	CHECK(access(img, F_OK) != 0, "the image made is removed again");
	CHECK(symlink("/nonexistent/ferry-spawn-target", img) == 0, "a dangling link where the image goes");
	ferry_err_clear(&err);
	CHECK(ferry_spawn_make_images(&cmd, &ck, &err) == -EEXIST || ferry_spawn_check_files(&cmd, &vm, &err) == -EPERM,
	      "the link is neither followed nor accepted: %s", err.msg);
	CHECK(access("/nonexistent/ferry-spawn-target", F_OK) != 0, "nothing was made through the link");
	unlink(img);
	unlink(ram);
	rmdir(dir);
}

/* Gone, or a zombie its new parent has not reaped yet. */
static bool gone(pid_t pid)
{
	char stat[256];
	long n = ferry_proc_read(pid, "stat", stat, sizeof(stat) - 1);
	if (n < 0)
		return n != -E2BIG;
	stat[n] = '\0';
	const char *p = strrchr(stat, ')');
	return p && (p[2] == 'Z' || p[2] == 'X');
}

static void test_start(void)
{
	/* A real start and kill, with a stand-in for QEMU. */
	struct ferry_spawn_cmd c = { 0 };
	char *argv[] = { (char *)"sleep", (char *)"30", NULL };
	c.argv = argv;
	c.argc = 2;
	char log[] = "/tmp/ferry-spawn-log.XXXXXX";
	int fd = mkstemp(log);
	CHECK(fd >= 0, "log file");
	close(fd);
	struct ferry_spawned s;
	ferry_err_clear(&err);
	CHECK(ferry_spawn_start(&c, log, &s, &err) == 0 && s.pid > 0, "started (%s)", err.msg);
	CHECK(ferry_spawn_alive(&s), "it runs");
	CHECK(getpgid(s.pid) == s.pid || getsid(s.pid) != getsid(0), "in a session of its own");
	pid_t pid = s.pid;
	ferry_spawn_kill(&s, 5000);
	CHECK(s.pid == -1 && gone(pid), "killed and gone");
	char big[4];
	CHECK(ferry_proc_read(getpid(), "cmdline", big, sizeof(big)) == -E2BIG, "a /proc file over the buffer: -E2BIG");
	CHECK(ferry_proc_read(999999999, "cmdline", big, sizeof(big)) == -ENOENT, "no such process: -ENOENT");
	char *bad[] = { (char *)"/nonexistent/qemu", NULL };
	c.argv = bad;
	c.argc = 1;
	CHECK(ferry_spawn_start(&c, log, &s, &err) == 0, "a missing binary still forks");
	for (int i = 0; i < 500 && ferry_spawn_alive(&s); i++)
		usleep(10000);
	CHECK(!ferry_spawn_alive(&s), "and is gone at once");
	ferry_spawn_release(&s);
	char text[512] = "";
	FILE *f = fopen(log, "r");
	if (f) {
		size_t n = fread(text, 1, sizeof(text) - 1, f);
		text[n] = '\0';
		fclose(f);
	}
	CHECK(strstr(text, "cannot run /nonexistent/qemu") != NULL, "the log says why: %s", text);
	unlink(log);
}

int main(void)
{
	test_good();
	test_hostile();
	test_files();
	test_start();
	ferry_spawn_cmd_free(&cmd);
	CHECK_DONE();
}
