#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_OUT_ARGS (FERRY_COOKIE_MAX_ARGS + 16)
#define MAX_PROPS    64

/* ---- QEMU's key=value option syntax ----------------------------------------- */

/* One option argument split at commas (",," is a literal comma). The first
 * element may lack "=": it is the option's implied key (-device DRIVER); a
 * later bare "flag" means flag=on, as in QEMU. */
struct props {
	size_t n;
	char *key[MAX_PROPS];
	char *val[MAX_PROPS];
	char *buf;
};

static void props_free(struct props *p)
{
	free(p->buf);
	p->buf = NULL;
	p->n = 0;
}

static const char *prop_get(const struct props *p, const char *key)
{
	for (size_t i = 0; i < p->n; i++)
		if (strcmp(p->key[i], key) == 0)
			return p->val[i];
	return NULL;
}

static int props_parse(const char *opt, const char *arg, const char *implied, struct props *p, struct ferry_err *err)
{
	size_t len = strlen(arg);
	p->n = 0;
	/* Room for the characters, a NUL and an "on" per element, the implied key. */
	p->buf = malloc(5 * len + 64);
	if (!p->buf)
		return ferry_err_set(err, ENOMEM, "out of memory");
	char *o = p->buf;
	const char *s = arg;
	while (*s || s == arg) {
		if (p->n == MAX_PROPS)
			return ferry_err_set(err, EPERM, "-%s '%.64s' has more than %d properties", opt, arg, MAX_PROPS);
		char *elem = o;
		while (*s) {
			if (*s == ',' && s[1] == ',') {
				*o++ = ',';
				s += 2;
			} else if (*s == ',') {
				break;
			} else {
				*o++ = *s++;
			}
		}
		*o++ = '\0';
		char *eq = strchr(elem, '=');
		if (eq) {
			*eq = '\0';
			p->key[p->n] = elem;
			p->val[p->n] = eq + 1;
		} else if (p->n == 0 && implied) {
			p->key[p->n] = strcpy(o, implied);
			o += strlen(implied) + 1;
			p->val[p->n] = elem;
		} else {
			p->key[p->n] = elem;
			p->val[p->n] = strcpy(o, "on");
			o += 3;
		}
		if (!p->key[p->n][0])
			return ferry_err_set(err, EPERM, "-%s '%.64s' has an empty property name", opt, arg);
		for (size_t i = 0; i < p->n; i++)
			if (strcmp(p->key[i], p->key[p->n]) == 0)
				return ferry_err_set(err, EPERM, "-%s '%.64s' sets '%s' twice", opt, arg, p->key[i]);
		p->n++;
		if (!*s)
			break;
		s++; /* the separating comma */
		if (!*s)
			break;
	}
	return 0;
}

static bool in_list(const char *s, const char *const *list)
{
	for (; *list; list++)
		if (strcmp(s, *list) == 0)
			return true;
	return false;
}

/* Every property must be in allowed. */
static int props_allow(const char *opt, const char *what, const struct props *p, const char *const *allowed,
		       struct ferry_err *err)
{
	for (size_t i = 0; i < p->n; i++)
		if (!in_list(p->key[i], allowed))
			return ferry_err_set(err, EPERM, "-%s %s: property '%s' is not allowed when this host starts the "
					     "QEMU", opt, what, p->key[i]);
	return 0;
}

/* ---- building the output ------------------------------------------------------ */

struct builder {
	const struct ferry_spawn_config *cfg;
	struct ferry_spawn_cmd *out;
	struct ferry_err *err;
	bool display_added;
};

static int add_arg(struct builder *b, const char *s)
{
	if (b->out->argc + 1 >= MAX_OUT_ARGS)
		return ferry_err_set(b->err, EPERM, "the command line has too many arguments");
	char *d = strdup(s);
	if (!d)
		return ferry_err_set(b->err, ENOMEM, "out of memory");
	b->out->argv[b->out->argc++] = d;
	b->out->argv[b->out->argc] = NULL;
	return 0;
}

static int add_pair(struct builder *b, const char *opt, const char *arg)
{
	int rc = add_arg(b, opt);
	return rc ? rc : add_arg(b, arg);
}

/* Append s to a growing string, commas doubled (QEMU's escape). */
static int cat_escaped(char **buf, size_t *len, const char *s, bool escape)
{
	size_t add = strlen(s) * 2 + 1;
	char *n = realloc(*buf, *len + add + 1);
	if (!n)
		return -ENOMEM;
	*buf = n;
	for (; *s; s++) {
		n[(*len)++] = *s;
		if (escape && *s == ',')
			n[(*len)++] = ',';
	}
	n[*len] = '\0';
	return 0;
}

/* -OPT k=v,... from props (the implied key first, bare). */
static int add_props(struct builder *b, const char *opt, const struct props *p, const char *implied)
{
	char *s = NULL;
	size_t len = 0;
	int rc = 0;
	for (size_t i = 0; i < p->n && !rc; i++) {
		if (i && (rc = cat_escaped(&s, &len, ",", false)))
			break;
		if (!(i == 0 && implied && strcmp(p->key[0], implied) == 0))
			rc = cat_escaped(&s, &len, p->key[i], true) || cat_escaped(&s, &len, "=", false) ? -ENOMEM : 0;
		if (!rc)
			rc = cat_escaped(&s, &len, p->val[i], true);
	}
	if (rc) {
		free(s);
		return ferry_err_set(b->err, ENOMEM, "out of memory");
	}
	rc = add_pair(b, opt, s ? s : "");
	free(s);
	return rc;
}

/* A file name from the source, to be found (or made) in one of our
 * directories: its last component, plain. */
static int plain_basename(const char *opt, const char *key, const char *path, const char **base, struct ferry_err *err)
{
	const char *s = strrchr(path, '/');
	s = s ? s + 1 : path;
	size_t n = strlen(s);
	if (n == 0 || n > 255 || s[0] == '.' ||
	    strspn(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-") != n)
		return ferry_err_set(err, EPERM, "-%s %s='%.200s': the file name must be 1-255 of [A-Za-z0-9._+-], "
				     "not starting with '.'", opt, key, path);
	*base = s;
	return 0;
}

static int add_file(struct builder *b, enum ferry_spawn_file_kind kind, const char *opt, const char *key,
		    const char *src, const char *dir, const char *device, char **remapped)
{
	const char *base = NULL;
	int rc = plain_basename(opt, key, src, &base, b->err);
	if (rc)
		return rc;
	struct ferry_spawn_cmd *c = b->out;
	for (size_t i = 0; i < c->nfiles; i++)
		if (strcmp(strrchr(c->files[i].path, '/') + 1, base) == 0)
			return ferry_err_set(b->err, EPERM, "-%s %s='%.200s': a second file named '%s'", opt, key, src, base);
	if (c->nfiles == FERRY_SPAWN_MAX_FILES)
		return ferry_err_set(b->err, EPERM, "more than %d files on the command line", FERRY_SPAWN_MAX_FILES);
	struct ferry_spawn_file *f = &c->files[c->nfiles];
	size_t n = strlen(dir) + strlen(base) + 2;
	f->path = malloc(n);
	f->source_path = strdup(src);
	if (!f->path || !f->source_path) {
		free(f->path);
		free(f->source_path);
		f->path = f->source_path = NULL;
		return ferry_err_set(b->err, ENOMEM, "out of memory");
	}
	snprintf(f->path, n, "%s/%s", dir, base);
	f->kind = kind;
	snprintf(f->device, sizeof(f->device), "%s", device ? device : "");
	c->nfiles++;
	*remapped = f->path;
	return 0;
}

/* ---- the options ----------------------------------------------------------------- */

/* Properties that name host files, sockets or descriptors: never from a peer. */
static const char *const host_props[] = { "romfile", "file", "filename", "path", "fd", "fds", "vhostfd", "vhostfds",
					  "socket", "sock", "script", "downscript", "mem-path", "logfile", NULL };

static const char *const safe_devices[] = {
	"virtio-blk-pci", "virtio-scsi-pci", "scsi-hd", "scsi-cd", "ide-hd", "ide-cd", "virtio-net-pci", "e1000",
	"e1000e", "rtl8139", "virtio-balloon-pci", "virtio-rng-pci", "virtio-serial-pci", "virtserialport",
	"isa-serial", "piix3-usb-uhci", "piix4-usb-uhci", "qemu-xhci", "nec-usb-xhci", "usb-tablet", "usb-kbd",
	"usb-mouse", "VGA", "cirrus-vga", "virtio-vga", "virtio-gpu-pci", "bochs-display", "pcie-root-port",
	"pci-bridge", "pcie-pci-bridge", "i6300esb", "ich9-ahci", "ahci", "pvpanic", "isa-debug-exit",
	"virtio-keyboard-pci", "virtio-mouse-pci", "virtio-tablet-pci", NULL };

static int host_prop_check(const char *opt, const char *what, const struct props *p, struct ferry_err *err)
{
	for (size_t i = 0; i < p->n; i++) {
		/* romfile= (empty) means "no option ROM": harmless and common. */
		if (strcmp(p->key[i], "romfile") == 0 && !p->val[i][0])
			continue;
		if (in_list(p->key[i], host_props) || strncmp(p->key[i], "x-", 2) == 0)
			return ferry_err_set(err, EPERM, "-%s %s: property '%s' names something on the host; not allowed "
					     "when this host starts the QEMU", opt, what, p->key[i]);
	}
	return 0;
}

static int opt_device(struct builder *b, const char *opt, const char *arg)
{
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "driver", &p, b->err);
	const char *drv = rc ? NULL : prop_get(&p, "driver");
	if (!rc && !drv)
		rc = ferry_err_set(b->err, EPERM, "-device '%.64s' names no driver", arg);
	if (!rc && !in_list(drv, safe_devices))
		rc = ferry_err_set(b->err, EPERM, "-device %.64s: this driver is not on the list this host starts", drv);
	if (!rc && !(rc = host_prop_check(opt, drv, &p, b->err)))
		rc = add_props(b, "-device", &p, "driver");
	props_free(&p);
	return rc;
}

static int opt_global(struct builder *b, const char *opt, const char *arg)
{
	/* DRIVER.PROP=VALUE, or driver=,property=,value= */
	struct props p = { 0 };
	int rc = props_parse(opt, arg, NULL, &p, b->err);
	if (rc == 0) {
		const char *prop = prop_get(&p, "property");
		if (!prop && p.n == 1) {
			const char *dot = strrchr(p.key[0], '.');
			prop = dot ? dot + 1 : "";
		}
		struct props one = { .n = 1, .key = { (char *)(prop ? prop : "") }, .val = { (char *)"x" } };
		if (!prop || !prop[0])
			rc = ferry_err_set(b->err, EPERM, "-global '%.64s' is not DRIVER.PROPERTY=VALUE", arg);
		else
			rc = host_prop_check(opt, arg, &one, b->err);
	}
	props_free(&p);
	return rc ? rc : add_pair(b, "-global", arg);
}

static int opt_drive(struct builder *b, const char *opt, const char *arg)
{
	static const char *const allowed[] = { "file", "format", "if", "index", "bus", "unit", "media", "id", "cache",
					       "aio", "discard", "detect-zeroes", "readonly", "read-only", "werror",
					       "rerror", "serial", "copy-on-read", "node-name", "cache.direct",
					       "cache.no-flush", "auto-read-only", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, NULL, &p, b->err);
	if (!rc)
		rc = props_allow(opt, "", &p, allowed, b->err);
	const char *file = rc ? NULL : prop_get(&p, "file");
	const char *fmt = rc ? NULL : prop_get(&p, "format");
	if (!rc && file && (!fmt || strcmp(fmt, "raw") != 0))
		rc = ferry_err_set(b->err, EPERM, "-drive file=%.200s: only format=raw images are started here (%s)", file,
				   fmt ? "an image format may name backing files outside the storage directory"
				       : "without format= QEMU would probe the image");
	if (!rc && file) {
		/* The block device's name, to check the image's size before starting. */
		char dev[FERRY_COOKIE_TOKEN_MAX + 1] = "";
		const char *id = prop_get(&p, "id"), *iface = prop_get(&p, "if"), *idx = prop_get(&p, "index");
		const char *media = prop_get(&p, "media");
		bool cd = media && strcmp(media, "cdrom") == 0;
		if (id)
			snprintf(dev, sizeof(dev), "%s", id);
		else if ((!iface || strcmp(iface, "ide") == 0) && idx && strspn(idx, "0123456789") == strlen(idx) &&
			 strlen(idx) <= 3)
			snprintf(dev, sizeof(dev), "ide%d-%s%d", atoi(idx) / 2, cd ? "cd" : "hd", atoi(idx) % 2);
		else if (iface && strcmp(iface, "virtio") == 0 && idx && strspn(idx, "0123456789") == strlen(idx) &&
			 strlen(idx) <= 3)
			snprintf(dev, sizeof(dev), "virtio%d", atoi(idx));
		char *path;
		if ((rc = add_file(b, FERRY_SPAWN_IMAGE, opt, "file", file, b->cfg->storage_dir, dev, &path)) == 0)
			for (size_t i = 0; i < p.n; i++)
				if (strcmp(p.key[i], "file") == 0)
					p.val[i] = path;
	}
	if (!rc)
		rc = add_props(b, "-drive", &p, NULL);
	props_free(&p);
	return rc;
}

static int opt_blockdev(struct builder *b, const char *opt, const char *arg)
{
	static const char *const allowed[] = { "driver", "node-name", "filename", "file", "file.driver",
					       "file.filename", "read-only", "auto-read-only", "discard", "cache.direct",
					       "cache.no-flush", "detect-zeroes", "aio", "locking", "force-share",
					       "offset", "size", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, NULL, &p, b->err);
	const char *drv = rc ? NULL : prop_get(&p, "driver");
	const char *fdrv = rc ? NULL : prop_get(&p, "file.driver");
	if (!rc && (!drv || (strcmp(drv, "file") != 0 && strcmp(drv, "raw") != 0)))
		rc = ferry_err_set(b->err, EPERM, "-blockdev driver=%s: only the file and raw drivers are started here",
				   drv ? drv : "(none)");
	if (!rc)
		rc = props_allow(opt, drv, &p, allowed, b->err);
	if (!rc && (fdrv ? strcmp(fdrv, "file") != 0 : prop_get(&p, "file.filename") != NULL))
		rc = ferry_err_set(b->err, EPERM, "-blockdev file.driver=%s: only the file driver is started here",
				   fdrv ? fdrv : "(none)");
	if (!rc && strcmp(drv, "file") == 0 && !prop_get(&p, "filename"))
		rc = ferry_err_set(b->err, EPERM, "-blockdev driver=file without filename=");
	for (size_t i = 0; !rc && i < p.n; i++) {
		if (strcmp(p.key[i], "filename") != 0 && strcmp(p.key[i], "file.filename") != 0)
			continue;
		char *path;
		if ((rc = add_file(b, FERRY_SPAWN_IMAGE, opt, p.key[i], p.val[i], b->cfg->storage_dir, NULL, &path)) == 0)
			p.val[i] = path;
	}
	if (!rc)
		rc = add_props(b, "-blockdev", &p, NULL);
	props_free(&p);
	return rc;
}

static int opt_object(struct builder *b, const char *opt, const char *arg)
{
	static const char *const mem[] = { "qom-type", "id", "size", "share", "prealloc", "prealloc-threads", "merge",
					   "dump", "policy", "host-nodes", "reserve", "hugetlb", "hugetlbsize", "seal",
					   "mem-path", "discard-data", "align", NULL };
	static const char *const simple[] = { "qom-type", "id", "poll-max-ns", "poll-grow", "poll-shrink", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "qom-type", &p, b->err);
	const char *type = rc ? NULL : prop_get(&p, "qom-type");
	if (!rc && !type)
		rc = ferry_err_set(b->err, EPERM, "-object '%.64s' names no type", arg);
	if (rc)
		goto out;
	if (strncmp(type, "memory-backend-", 15) == 0) {
		bool file = strcmp(type, "memory-backend-file") == 0;
		if (!file && strcmp(type, "memory-backend-ram") != 0 && strcmp(type, "memory-backend-memfd") != 0) {
			rc = ferry_err_set(b->err, EPERM, "-object %s is not started here", type);
			goto out;
		}
		if ((rc = props_allow(opt, type, &p, mem, b->err)))
			goto out;
		const char *mp = prop_get(&p, "mem-path");
		if (file != (mp != NULL)) {
			rc = ferry_err_set(b->err, EPERM, "-object %s: mem-path %s", type, file ? "missing" : "not allowed");
			goto out;
		}
		if (file && !b->cfg->mem_dir) {
			rc = ferry_err_set(b->err, EPERM, "-object memory-backend-file mem-path=%.200s: this host has no "
					   "directory for RAM files (ferryd --mem-dir)", mp);
			goto out;
		}
		for (size_t i = 0; i < p.n; i++) {
			if (strcmp(p.key[i], "mem-path") == 0) {
				char *path;
				if ((rc = add_file(b, FERRY_SPAWN_RAM, opt, "mem-path", mp, b->cfg->mem_dir, NULL, &path)))
					goto out;
				p.val[i] = path;
			}
			if (strcmp(p.key[i], "prealloc") == 0 && b->cfg->prealloc)
				p.val[i] = (char *)"on";
		}
		if (b->cfg->prealloc && !prop_get(&p, "prealloc") && p.n < MAX_PROPS) {
			p.key[p.n] = (char *)"prealloc";
			p.val[p.n++] = (char *)"on";
		}
	} else if (strcmp(type, "iothread") == 0 || strcmp(type, "rng-builtin") == 0) {
		if ((rc = props_allow(opt, type, &p, simple, b->err)))
			goto out;
	} else {
		rc = ferry_err_set(b->err, EPERM, "-object %.64s is not started here", type);
		goto out;
	}
	rc = add_props(b, "-object", &p, "qom-type");
out:
	props_free(&p);
	return rc;
}

static int opt_netdev(struct builder *b, const char *opt, const char *arg)
{
	static const char *const user[] = { "type", "id", "net", "host", "restrict", "hostname", "dhcpstart", "dns",
					    "dnssearch", "domainname", "ipv4", "ipv6", "ipv6-net", "ipv6-prefix",
					    "ipv6-prefixlen", "ipv6-host", "ipv6-dns", "hostfwd", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "type", &p, b->err);
	const char *type = rc ? NULL : prop_get(&p, "type");
	if (!rc && (!type || strcmp(type, "user") != 0))
		rc = ferry_err_set(b->err, EPERM, "-netdev %.32s: only user networking is started here (a tap's scripts "
				   "and the host's interfaces are the management layer's)", type ? type : "(none)");
	if (!rc)
		rc = props_allow(opt, "user", &p, user, b->err);
	if (!rc)
		rc = add_props(b, "-netdev", &p, "type");
	props_free(&p);
	return rc;
}

/* -machine: a type and properties that do not name host files. */
static int opt_machine(struct builder *b, const char *opt, const char *arg)
{
	static const char *const allowed[] = { "type", "accel", "memory-backend", "usb", "vmport", "smm",
					       "kernel-irqchip", "kernel_irqchip", "dump-guest-core", "mem-merge",
					       "graphics", "suppress-vmdesc", "hpet", "pit", "pic", "sata", "smbus",
					       "i8042", "acpi", "max-ram-below-4g", "nvdimm", "hmat", "pflash0",
					       "pflash1", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "type", &p, b->err);
	if (!rc)
		rc = props_allow(opt, "", &p, allowed, b->err);
	if (!rc)
		rc = add_props(b, "-machine", &p, "type");
	props_free(&p);
	return rc;
}

static int opt_accel(struct builder *b, const char *opt, const char *arg)
{
	static const char *const allowed[] = { "accel", "thread", "tb-size", "split-wx", "kernel-irqchip",
					       "dirty-ring-size", "one-insn-per-tb", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "accel", &p, b->err);
	const char *a = rc ? NULL : prop_get(&p, "accel");
	if (!rc && (!a || (strcmp(a, "kvm") != 0 && strcmp(a, "tcg") != 0)))
		rc = ferry_err_set(b->err, EPERM, "-accel %.32s: only kvm and tcg", a ? a : "(none)");
	if (!rc)
		rc = props_allow(opt, a, &p, allowed, b->err);
	if (!rc)
		rc = add_props(b, "-accel", &p, "accel");
	props_free(&p);
	return rc;
}

static int opt_boot(struct builder *b, const char *opt, const char *arg)
{
	static const char *const allowed[] = { "order", "once", "menu", "strict", "reboot-timeout", "splash-time", NULL };
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "order", &p, b->err);
	if (!rc)
		rc = props_allow(opt, "", &p, allowed, b->err);
	props_free(&p);
	return rc ? rc : add_pair(b, "-boot", arg);
}

/* -chardev ID...: kept as a null one of the same id, so devices using it
 * still find it; the source's sockets and files are not ours. */
static int opt_chardev(struct builder *b, const char *opt, const char *arg)
{
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "backend", &p, b->err);
	const char *id = rc ? NULL : prop_get(&p, "id");
	if (!rc && !id)
		rc = ferry_err_set(b->err, EPERM, "-chardev '%.64s' has no id", arg);
	if (!rc) {
		struct props np = { .n = 2, .key = { (char *)"backend", (char *)"id" }, .val = { (char *)"null", (char *)id } };
		rc = add_props(b, "-chardev", &np, "backend");
	}
	props_free(&p);
	return rc;
}

/* A serial or parallel port keeps its device, with a null backend. */
static int opt_port(struct builder *b, const char *opt, const char *arg)
{
	char o[16];
	snprintf(o, sizeof(o), "-%s", opt);
	return add_pair(b, o, strcmp(arg, "none") == 0 ? "none" : "null");
}

static int opt_bios(struct builder *b, const char *opt, const char *arg)
{
	size_t n = strlen(arg);
	/* A bare name is looked up in this host's own firmware directories. */
	if (!n || arg[0] == '.' || strspn(arg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") != n)
		return ferry_err_set(b->err, EPERM, "-%s %.200s: only a firmware name, not a path", opt, arg);
	return add_pair(b, "-bios", arg);
}

static int opt_vga(struct builder *b, const char *opt, const char *arg)
{
	static const char *const allowed[] = { "none", "std", "cirrus", "virtio", "qxl", NULL };
	if (!in_list(arg, allowed))
		return ferry_err_set(b->err, EPERM, "-%s %.32s is not started here", opt, arg);
	return add_pair(b, "-vga", arg);
}

static int opt_smbios(struct builder *b, const char *opt, const char *arg)
{
	struct props p = { 0 };
	int rc = props_parse(opt, arg, "type", &p, b->err);
	if (!rc && prop_get(&p, "file"))
		rc = ferry_err_set(b->err, EPERM, "-smbios file=: names a host file");
	props_free(&p);
	return rc ? rc : add_pair(b, "-smbios", arg);
}

static int opt_nic(struct builder *b, const char *opt, const char *arg)
{
	if (strcmp(arg, "none") != 0)
		return ferry_err_set(b->err, EPERM, "-%s %.64s: write it as -netdev user and -device", opt, arg);
	return add_pair(b, "-nic", "none");
}

static int opt_keep(struct builder *b, const char *opt, const char *arg)
{
	char o[40];
	snprintf(o, sizeof(o), "-%s", opt);
	return arg ? add_pair(b, o, arg) : add_arg(b, o);
}

enum action { KEEP, DROP, REFUSE, CALL };

struct option_rule {
	const char *name;
	bool has_arg;
	enum action action;
	int (*fn)(struct builder *b, const char *opt, const char *arg);
	const char *why; /* REFUSE */
};

static const struct option_rule rules[] = {
	{ "name", true, KEEP, NULL, NULL },        { "uuid", true, KEEP, NULL, NULL },
	{ "cpu", true, KEEP, NULL, NULL },         { "smp", true, KEEP, NULL, NULL },
	{ "m", true, KEEP, NULL, NULL },           { "numa", true, KEEP, NULL, NULL },
	{ "rtc", true, KEEP, NULL, NULL },         { "msg", true, KEEP, NULL, NULL },
	{ "overcommit", true, KEEP, NULL, NULL },  { "action", true, KEEP, NULL, NULL },
	{ "watchdog-action", true, KEEP, NULL, NULL }, { "sandbox", true, KEEP, NULL, NULL },
	{ "nodefaults", false, KEEP, NULL, NULL }, { "no-user-config", false, KEEP, NULL, NULL },
	{ "no-hpet", false, KEEP, NULL, NULL },    { "no-acpi", false, KEEP, NULL, NULL },
	{ "no-reboot", false, KEEP, NULL, NULL },  { "no-shutdown", false, KEEP, NULL, NULL },
	{ "enable-kvm", false, KEEP, NULL, NULL }, { "mem-prealloc", false, KEEP, NULL, NULL },
	{ "usb", false, KEEP, NULL, NULL },
	{ "machine", true, CALL, opt_machine, NULL }, { "M", true, CALL, opt_machine, NULL },
	{ "accel", true, CALL, opt_accel, NULL },  { "device", true, CALL, opt_device, NULL },
	{ "global", true, CALL, opt_global, NULL }, { "drive", true, CALL, opt_drive, NULL },
	{ "blockdev", true, CALL, opt_blockdev, NULL }, { "object", true, CALL, opt_object, NULL },
	{ "netdev", true, CALL, opt_netdev, NULL }, { "nic", true, CALL, opt_nic, NULL },
	{ "boot", true, CALL, opt_boot, NULL },    { "chardev", true, CALL, opt_chardev, NULL },
	{ "serial", true, CALL, opt_port, NULL },  { "parallel", true, CALL, opt_port, NULL },
	{ "bios", true, CALL, opt_bios, NULL },    { "vga", true, CALL, opt_vga, NULL },
	{ "smbios", true, CALL, opt_smbios, NULL },
	/* The source's monitors, logs, display and process handling: ferry
	 * brings its own (or none). */
	{ "qmp", true, DROP, NULL, NULL },         { "qmp-pretty", true, DROP, NULL, NULL },
	{ "monitor", true, DROP, NULL, NULL },     { "mon", true, DROP, NULL, NULL },
	{ "pidfile", true, DROP, NULL, NULL },     { "incoming", true, DROP, NULL, NULL },
	{ "D", true, DROP, NULL, NULL },           { "d", true, DROP, NULL, NULL },
	{ "trace", true, DROP, NULL, NULL },       { "display", true, DROP, NULL, NULL },
	{ "vnc", true, DROP, NULL, NULL },         { "daemonize", false, DROP, NULL, NULL },
	{ "S", false, DROP, NULL, NULL },          { "nographic", false, DROP, NULL, NULL },
	{ "plugin", true, REFUSE, NULL, "loads a host library" },
	{ "add-fd", true, REFUSE, NULL, "passes host file descriptors" },
	{ "fsdev", true, REFUSE, NULL, "exports a host directory" },
	{ "virtfs", true, REFUSE, NULL, "exports a host directory" },
	{ "L", true, REFUSE, NULL, "names a host data directory" },
	{ "kernel", true, REFUSE, NULL, "names a host file" },
	{ "initrd", true, REFUSE, NULL, "names a host file" },
	{ "dtb", true, REFUSE, NULL, "names a host file" },
	{ "pflash", true, REFUSE, NULL, "names a host file" },
	{ "option-rom", true, REFUSE, NULL, "names a host file" },
	{ "fw_cfg", true, REFUSE, NULL, "may name a host file" },
	{ "acpitable", true, REFUSE, NULL, "may name a host file" },
	{ "readconfig", true, REFUSE, NULL, "reads a host file" },
	{ "writeconfig", true, REFUSE, NULL, "writes a host file" },
	{ "mem-path", true, REFUSE, NULL, "names a host path (use -object memory-backend-file)" },
	{ "chroot", true, REFUSE, NULL, "changes the host process" },
	{ "runas", true, REFUSE, NULL, "changes the host process" },
	{ "run-with", true, REFUSE, NULL, "changes the host process" },
	{ "loadvm", true, REFUSE, NULL, "loads a snapshot" },
	{ "spice", true, REFUSE, NULL, "opens host sockets" },
	{ "audiodev", true, REFUSE, NULL, "uses host audio" },
	{ "usbdevice", true, REFUSE, NULL, "may pass host devices" },
	{ "hda", true, REFUSE, NULL, "write it as -drive" },
	{ "cdrom", true, REFUSE, NULL, "write it as -drive" },
	{ NULL, false, REFUSE, NULL, NULL },
};

static bool qemu_system_name(const char *argv0)
{
	const char *base = strrchr(argv0, '/');
	base = base ? base + 1 : argv0;
	size_t n = strlen(base);
	return strncmp(base, "qemu-system-", 12) == 0 && n > 12 && n <= 40 &&
	       strspn(base + 12, "abcdefghijklmnopqrstuvwxyz0123456789_") == n - 12;
}

int ferry_spawn_build(const struct ferry_spawn_config *cfg, const struct ferry_cookie_vm *vm,
		      struct ferry_spawn_cmd *out, struct ferry_err *err)
{
	memset(out, 0, sizeof(*out));
	if (!cfg || !cfg->qemu || !cfg->storage_dir || !cfg->qmp_path || !vm)
		return ferry_err_set(err, EINVAL, "spawn: missing configuration");
	if (vm->nargs == 0 || vm->cmdline_len == 0 || vm->cmdline_len > sizeof(vm->cmdline) ||
	    vm->cmdline[vm->cmdline_len - 1] != '\0')
		return ferry_err_set(err, EINVAL, "the source's cookie carries no QEMU command line to start one from");
	const char *args[FERRY_COOKIE_MAX_ARGS];
	size_t n = 0;
	for (size_t off = 0; off < vm->cmdline_len && n < FERRY_COOKIE_MAX_ARGS; off += strlen(vm->cmdline + off) + 1)
		args[n++] = vm->cmdline + off;
	if (n != vm->nargs)
		return ferry_err_set(err, EINVAL, "the source's QEMU command line holds %zu arguments, not %zu", n, vm->nargs);
	if (!qemu_system_name(args[0]))
		return ferry_err_set(err, EPERM, "the source runs '%.200s', not a qemu-system-* binary", args[0]);
	/* Another target architecture cannot load the state. */
	const char *sb = strrchr(args[0], '/'), *mb = strrchr(cfg->qemu, '/');
	sb = sb ? sb + 1 : args[0];
	mb = mb ? mb + 1 : cfg->qemu;
	if (qemu_system_name(cfg->qemu) && strcmp(sb, mb) != 0)
		return ferry_err_set(err, EPERM, "the source runs %s, this host's QEMU is %s", sb, mb);
	out->argv = calloc(MAX_OUT_ARGS + 1, sizeof(char *));
	if (!out->argv)
		return ferry_err_set(err, ENOMEM, "out of memory");
	struct builder b = { .cfg = cfg, .out = out, .err = err };
	int rc = add_arg(&b, cfg->qemu);
	for (size_t i = 1; !rc && i < n; i++) {
		const char *a = args[i];
		if (a[0] != '-' || !a[1]) {
			rc = ferry_err_set(err, EPERM, "argument '%.200s' is not an option; not started here", a);
			break;
		}
		const char *name = a + (a[1] == '-' ? 2 : 1);
		const struct option_rule *r;
		for (r = rules; r->name && strcmp(r->name, name) != 0; r++)
			;
		if (!r->name) {
			rc = ferry_err_set(err, EPERM, "option '%.64s' is not on the list this host starts QEMU with", a);
			break;
		}
		if (r->action == REFUSE) {
			rc = ferry_err_set(err, EPERM, "option -%s is refused: it %s", r->name, r->why);
			break;
		}
		const char *arg = NULL;
		if (r->has_arg) {
			if (i + 1 >= n) {
				rc = ferry_err_set(err, EINVAL, "option -%s lacks its argument", r->name);
				break;
			}
			arg = args[++i];
		}
		if (arg && arg[0] == '{' && r->action != DROP) {
			/* QEMU's JSON option syntax: not parsed here, so not passed on. */
			rc = ferry_err_set(err, EPERM, "option -%s in JSON form is not read here: write it as key=value",
					   r->name);
			break;
		}
		if (r->action == KEEP)
			rc = opt_keep(&b, r->name, arg);
		else if (r->action == CALL)
			rc = r->fn(&b, r->name, arg);
	}
	if (!rc) {
		char qmp[4200];
		char *esc = NULL;
		size_t len = 0;
		if (cat_escaped(&esc, &len, cfg->qmp_path, true))
			rc = ferry_err_set(err, ENOMEM, "out of memory");
		else if ((size_t)snprintf(qmp, sizeof(qmp), "unix:%s,server=on,wait=off", esc) >= sizeof(qmp))
			rc = ferry_err_set(err, ENAMETOOLONG, "QMP socket path too long");
		free(esc);
		if (!rc)
			rc = add_pair(&b, "-display", "none");
		if (!rc)
			rc = add_arg(&b, "-S");
		if (!rc)
			rc = add_pair(&b, "-incoming", "defer");
		if (!rc)
			rc = add_pair(&b, "-qmp", qmp);
		if (!rc && cfg->pidfile)
			rc = add_pair(&b, "-pidfile", cfg->pidfile);
	}
	if (rc) {
		struct ferry_err keep = *err;
		ferry_spawn_cmd_free(out);
		*err = keep;
	}
	return rc;
}

void ferry_spawn_cmd_free(struct ferry_spawn_cmd *c)
{
	if (!c)
		return;
	for (size_t i = 0; c->argv && i < c->argc; i++)
		free(c->argv[i]);
	free(c->argv);
	for (size_t i = 0; i < c->nfiles; i++) {
		free(c->files[i].path);
		free(c->files[i].source_path);
	}
	memset(c, 0, sizeof(*c));
}

/* ---- files ------------------------------------------------------------------------ */

int ferry_spawn_check_files(struct ferry_spawn_cmd *c, const struct ferry_cookie_vm *vm, struct ferry_err *err)
{
	size_t made = 0;
	int rc = 0;
	for (size_t i = 0; i < c->nfiles && !rc; i++) {
		struct ferry_spawn_file *f = &c->files[i];
		struct stat st;
		if (f->kind == FERRY_SPAWN_IMAGE) {
			if (lstat(f->path, &st) != 0) {
				rc = ferry_err_set(err, errno == ENOENT ? ENOENT : errno, "disk image %s (the source's %.200s): %s",
						   f->path, f->source_path, strerror(errno));
			} else if (!S_ISREG(st.st_mode)) {
				rc = ferry_err_set(err, EPERM, "disk image %s is not a regular file", f->path);
			} else if (f->device[0]) {
				for (size_t k = 0; k < vm->nblockdevs; k++)
					if (strcmp(vm->blockdevs[k].name, f->device) == 0 &&
					    (uint64_t)st.st_size != vm->blockdevs[k].capacity)
						rc = ferry_err_set(err, EINVAL, "disk image %s holds %" PRIu64 " bytes, the "
								   "source's %s %" PRIu64, f->path, (uint64_t)st.st_size,
								   f->device, vm->blockdevs[k].capacity);
			}
		} else {
			int fd = open(f->path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
			if (fd < 0) {
				rc = ferry_err_set(err, errno, "RAM file %s: %s%s", f->path, strerror(errno),
						   errno == EEXIST ? " (another VM's? it is never reused)" : "");
			} else {
				close(fd);
				made = i + 1;
			}
		}
	}
	if (rc) {
		for (size_t i = 0; i < made; i++)
			if (c->files[i].kind == FERRY_SPAWN_RAM)
				unlink(c->files[i].path);
	}
	return rc;
}

int ferry_spawn_make_images(struct ferry_spawn_cmd *c, const struct ferry_cookie *cookie, struct ferry_err *err)
{
	if (!(cookie->flags & FERRY_COOKIE_NBD))
		return 0;
	for (size_t i = 0; i < c->nfiles; i++) {
		struct ferry_spawn_file *f = &c->files[i];
		if (f->kind != FERRY_SPAWN_IMAGE || !f->device[0])
			continue;
		size_t k;
		for (k = 0; k < cookie->nbd.ndisks && strcmp(cookie->nbd.disks[k].target, f->device) != 0; k++)
			;
		if (k == cookie->nbd.ndisks)
			continue;
		int fd = open(f->path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
		if (fd < 0 && errno == EEXIST)
			continue; /* an image put there ahead: checked like any other */
		if (fd < 0 || ftruncate(fd, (off_t)cookie->nbd.disks[k].capacity) != 0) {
			int e = errno;
			if (fd >= 0) {
				close(fd);
				unlink(f->path);
			}
			ferry_spawn_remove_images(c);
			return ferry_err_set(err, e, "creating disk image %s for %s: %s", f->path, f->device, strerror(e));
		}
		close(fd);
		f->made = true;
	}
	return 0;
}

void ferry_spawn_remove_images(struct ferry_spawn_cmd *c)
{
	for (size_t i = 0; i < c->nfiles; i++)
		if (c->files[i].made) {
			unlink(c->files[i].path);
			c->files[i].made = false;
		}
}

void ferry_spawn_remove_ram(const struct ferry_spawn_cmd *c)
{
	for (size_t i = 0; i < c->nfiles; i++)
		if (c->files[i].kind == FERRY_SPAWN_RAM)
			unlink(c->files[i].path);
}

/* ---- the process ------------------------------------------------------------------ */

long ferry_proc_read(long pid, const char *file, char *buf, size_t len)
{
	char path[96];
	snprintf(path, sizeof(path), "/proc/%ld/%s", pid, file);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	size_t n = 0;
	char extra;
	for (;;) {
		ssize_t r = n < len ? read(fd, buf + n, len - n) : read(fd, &extra, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 || (n == len && r > 0)) {
			int e = r < 0 ? errno : E2BIG;
			close(fd);
			return -e;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	return (long)n;
}

int ferry_spawn_start(const struct ferry_spawn_cmd *c, const char *log_path, struct ferry_spawned *out,
		      struct ferry_err *err)
{
	out->pid = -1;
	out->pidfd = -1;
	int logfd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (logfd < 0)
		return ferry_err_set(err, errno, "QEMU log %s: %s", log_path, strerror(errno));
	int nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	int p[2];
	if (nullfd < 0 || pipe2(p, O_CLOEXEC) != 0) {
		int e = errno;
		close(logfd);
		if (nullfd >= 0)
			close(nullfd);
		return ferry_err_set(err, e, "cannot start QEMU: %s", strerror(e));
	}
	/* Fork twice: the QEMU is init's child, in its own session, so ferryd
	 * neither reaps it nor takes it along when it exits. */
	pid_t mid = fork();
	if (mid < 0) {
		int e = errno;
		close(logfd);
		close(nullfd);
		close(p[0]);
		close(p[1]);
		return ferry_err_set(err, e, "fork: %s", strerror(e));
	}
	if (mid == 0) {
		setsid();
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		pid_t q = fork();
		if (q == 0) {
			dup2(nullfd, 0);
			dup2(logfd, 1);
			dup2(logfd, 2);
			execvp(c->argv[0], c->argv);
			dprintf(2, "ferryd: cannot run %s: %s\n", c->argv[0], strerror(errno));
			_exit(127);
		}
		int32_t v = (int32_t)q;
		ssize_t w = write(p[1], &v, sizeof(v));
		_exit(w == (ssize_t)sizeof(v) ? 0 : 1);
	}
	close(p[1]);
	close(logfd);
	close(nullfd);
	int32_t v = -1;
	ssize_t r;
	do
		r = read(p[0], &v, sizeof(v));
	while (r < 0 && errno == EINTR);
	close(p[0]);
	int st;
	while (waitpid(mid, &st, 0) < 0 && errno == EINTR)
		;
	if (r != (ssize_t)sizeof(v) || v <= 0)
		return ferry_err_set(err, EIO, "cannot start %s (fork failed)", c->argv[0]);
	out->pid = (pid_t)v;
#ifdef SYS_pidfd_open
	out->pidfd = (int)syscall(SYS_pidfd_open, out->pid, 0);
#endif
	return 0;
}

bool ferry_spawn_alive(const struct ferry_spawned *s)
{
	if (s->pid <= 0)
		return false;
	if (s->pidfd >= 0) {
		struct pollfd pf = { .fd = s->pidfd, .events = POLLIN };
		return poll(&pf, 1, 0) == 0; /* readable once it exited */
	}
	return kill(s->pid, 0) == 0;
}

void ferry_spawn_kill(struct ferry_spawned *s, int timeout_ms)
{
	if (s->pid <= 0)
		return;
#ifdef SYS_pidfd_send_signal
	if (s->pidfd >= 0)
		(void)syscall(SYS_pidfd_send_signal, s->pidfd, SIGKILL, NULL, 0);
	else
#endif
		(void)kill(s->pid, SIGKILL);
	for (int waited = 0; waited < timeout_ms && ferry_spawn_alive(s); waited += 10) {
		struct timespec ts = { 0, 10 * 1000000L };
		nanosleep(&ts, NULL);
	}
	ferry_spawn_release(s);
}

void ferry_spawn_release(struct ferry_spawned *s)
{
	if (s->pidfd >= 0)
		close(s->pidfd);
	s->pidfd = -1;
	s->pid = -1;
}
