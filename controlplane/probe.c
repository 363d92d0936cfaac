#include "probe.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "spawn.h"

int ferry_host_identity(const char *configured_uuid, char hostname[FERRY_COOKIE_HOSTNAME_MAX + 1],
			char hostuuid[FERRY_COOKIE_UUID_LEN + 1], struct ferry_err *err)
{
	if (gethostname(hostname, FERRY_COOKIE_HOSTNAME_MAX) != 0)
		return ferry_err_set(err, errno, "gethostname: %s", strerror(errno));
	hostname[FERRY_COOKIE_HOSTNAME_MAX] = '\0';
	for (char *p = hostname; *p; p++)
		if (!isgraph((unsigned char)*p))
			*p = '_'; /* the cookie wants printable ASCII without spaces */
	if (!hostname[0])
		strcpy(hostname, "localhost");
	if (configured_uuid) {
		if (strlen(configured_uuid) != FERRY_COOKIE_UUID_LEN)
			return ferry_err_set(err, EINVAL, "host uuid '%s' is not of the form 8-4-4-4-12", configured_uuid);
		for (int i = 0; i < FERRY_COOKIE_UUID_LEN; i++) {
			bool dash = i == 8 || i == 13 || i == 18 || i == 23;
			if (dash ? configured_uuid[i] != '-' : !isxdigit((unsigned char)configured_uuid[i]))
				return ferry_err_set(err, EINVAL, "host uuid '%s' is not of the form 8-4-4-4-12",
						     configured_uuid);
			hostuuid[i] = (char)tolower((unsigned char)configured_uuid[i]);
		}
		hostuuid[FERRY_COOKIE_UUID_LEN] = '\0';
		return 0;
	}
	FILE *f = fopen("/etc/machine-id", "r");
	char id[64] = "";
	if (!f || !fgets(id, sizeof(id), f)) {
		if (f)
			fclose(f);
		return ferry_err_set(err, ENOENT, "no /etc/machine-id to derive the host uuid from: give --host-uuid");
	}
	fclose(f);
	id[strcspn(id, "\n")] = '\0';
	if (strlen(id) != 32 || strspn(id, "0123456789abcdef") != 32)
		return ferry_err_set(err, EINVAL, "/etc/machine-id is not 32 hex digits: give --host-uuid");
	snprintf(hostuuid, FERRY_COOKIE_UUID_LEN + 1, "%.8s-%.4s-%.4s-%.4s-%.12s", id, id + 8, id + 12, id + 16, id + 20);
	return 0;
}

/* Begin's probe asks QEMU these in one batch (ferry_qmp_execute_batch): one
 * round trip instead of eight. The order is the index into the results. */
enum { P_NAME, P_UUID, P_CAPS, P_CMDS, P_MEM, P_CPUS, P_TYPE, P_BLOCK, P_COUNT };
static const char *const probe_cmds[P_COUNT] = {
	[P_NAME] = "query-name", [P_UUID] = "query-uuid", [P_CAPS] = "query-migrate-capabilities",
	[P_CMDS] = "query-commands", [P_MEM] = "query-memory-size-summary", [P_CPUS] = "query-cpus-fast",
	[P_TYPE] = "qom-get", [P_BLOCK] = "query-block",
};

/* Run every probe command in one batch into res. */
static int probe_run(struct ferry_qmp *q, json_t *res[P_COUNT], struct ferry_err *err)
{
	json_t *args[P_COUNT] = { NULL };
	if (!(args[P_TYPE] = json_pack("{s:s, s:s}", "path", "/machine", "property", "type")))
		return ferry_err_set(err, ENOMEM, "out of memory");
	int rc = ferry_qmp_execute_batch(q, P_COUNT, probe_cmds, args, res, err);
	json_decref(args[P_TYPE]);
	return rc;
}

static void probe_free(json_t *res[P_COUNT])
{
	for (int i = 0; i < P_COUNT; i++)
		json_decref(res[i]);
}

static int identity_from(json_t *name, json_t *uuid, const char *hostname, const char *hostuuid, struct ferry_cookie *c,
			 struct ferry_err *err)
{
	const char *n = json_string_value(json_object_get(name, "name"));
	const char *u = json_string_value(json_object_get(uuid, "UUID"));
	snprintf(c->name, sizeof(c->name), "%s", n && *n ? n : "unnamed");
	if (!u || strlen(u) != FERRY_COOKIE_UUID_LEN)
		return ferry_err_set(err, EPROTO, "QEMU answered query-uuid without a valid UUID");
	for (int i = 0; i <= FERRY_COOKIE_UUID_LEN; i++)
		c->uuid[i] = (char)tolower((unsigned char)u[i]);
	snprintf(c->hostname, sizeof(c->hostname), "%s", hostname);
	snprintf(c->hostuuid, sizeof(c->hostuuid), "%s", hostuuid);
	return 0;
}

enum ferry_cookie_driver_kind ferry_probe_driver_kind(struct ferry_dp *dp)
{
	return ferry_cookie_driver_kind(ferry_dp_driver_name(dp));
}

/* Is the QEMU behind q in this daemon's network namespace? Not knowing
 * (no peer pid, no access to its /proc) counts as no. */
static bool shares_our_network(struct ferry_qmp *q)
{
	int pid;
	struct ferry_err e = { 0 };
	struct stat mine, its;
	char path[64];
	if (ferry_qmp_peer_pid(q, &pid, &e))
		return false;
	snprintf(path, sizeof(path), "/proc/%d/ns/net", pid);
	return stat("/proc/self/ns/net", &mine) == 0 && stat(path, &its) == 0 && mine.st_ino == its.st_ino &&
	       mine.st_dev == its.st_dev;
}

static void caps_from(json_t *caps, json_t *cmds, struct ferry_qmp *q, struct ferry_dp *dp, uint32_t disabled,
		      struct ferry_side_caps *out)
{
	out->features = 0;
	out->drivers = 0;
	out->qemu = 0;
	size_t i;
	json_t *c;
	json_array_foreach(caps, i, c) {
		const char *name = json_string_value(json_object_get(c, "capability"));
		if (name && strcmp(name, "multifd") == 0)
			out->features |= FERRY_F_MULTIFD;
		/* ferry's guard gives the set-up acknowledgement on any QEMU
		 * with postcopy (controlplane/pcguard.h). */
		if (name && strcmp(name, "postcopy-ram") == 0)
			out->features |= FERRY_F_POSTCOPY | FERRY_F_POSTCOPY_SETUP;
		if (name && strcmp(name, "postcopy-preempt") == 0)
			out->features |= FERRY_F_POSTCOPY_PREEMPT;
	}
	/* Storage migration: ferry's NBD path is built in; the QEMU must export
	 * (destination) and mirror into an NBD node (source). */
	unsigned have = 0;
	json_array_foreach(cmds, i, c) {
		const char *name = json_string_value(json_object_get(c, "name"));
		have |= name && strcmp(name, "nbd-server-start") == 0 ? 1 : 0;
		have |= name && strcmp(name, "block-export-add") == 0 ? 2 : 0;
		have |= name && strcmp(name, "blockdev-mirror") == 0 ? 4 : 0;
	}
	if (have == 7)
		out->features |= FERRY_F_NBD;
	/* Multifd handoff hands QEMU a listening socket (tcp:fd:NAME), which
	 * QEMU 7.2 takes on any build; the source QEMU then connects by itself,
	 * so it must see the network this daemon sees. */
	if (ferry_dp_can_handoff(dp))
		out->features |= FERRY_F_HANDOFF | (shares_our_network(q) ? FERRY_F_HANDOFF_MULTIFD : 0);
	out->qemu = out->features;
	out->features &= ~disabled;
	enum ferry_cookie_driver_kind k = ferry_probe_driver_kind(dp);
	if (k)
		out->drivers |= 1u << k;
}

/* The VM's shape for <vm>: base memory, vCPUs, machine type, block devices. */
static int shape_from(json_t *mem, json_t *cpus, json_t *type, json_t *blk, struct ferry_cookie_vm *vm,
		      struct ferry_err *err)
{
	json_t *base = json_object_get(mem, "base-memory");
	vm->memory = json_is_integer(base) ? (uint64_t)json_integer_value(base) : 0;
	vm->vcpus = json_is_array(cpus) ? json_array_size(cpus) : 0;
	snprintf(vm->machine, sizeof(vm->machine), "%s", json_is_string(type) ? json_string_value(type) : "");
	if (!vm->memory || !vm->vcpus || !vm->machine[0])
		return ferry_err_set(err, EPROTO, "QEMU did not say its memory size, vCPUs and machine type");
	size_t i;
	json_t *b;
	vm->nblockdevs = 0;
	json_array_foreach(blk, i, b) {
		const char *dev = json_string_value(json_object_get(b, "device"));
		json_t *size = json_object_get(json_object_get(json_object_get(b, "inserted"), "image"), "virtual-size");
		size_t n = dev ? strlen(dev) : 0;
		/* Legacy drive names only: they are what both QEMUs' command lines share. */
		if (!n || n > FERRY_COOKIE_TOKEN_MAX || strspn(dev, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
								"0123456789._-") != n ||
		    !json_is_integer(size) || vm->nblockdevs == FERRY_COOKIE_MAX_BLOCKDEVS)
			continue;
		struct ferry_cookie_blockdev *d = &vm->blockdevs[vm->nblockdevs++];
		memcpy(d->name, dev, n + 1);
		d->capacity = (uint64_t)json_integer_value(size);
	}
	return 0;
}

/* The source QEMU's argv for <qemu-cmdline>, from /proc of the process
 * behind its monitor. Best effort: a command line that does not fit the
 * cookie's bounds is left out (a destination QEMU started by a management
 * layer does not need it). */
static void probe_cmdline(struct ferry_qmp *q, struct ferry_cookie_vm *vm)
{
	int pid;
	struct ferry_err e = { 0 };
	vm->nargs = vm->cmdline_len = 0;
	if (ferry_qmp_peer_pid(q, &pid, &e))
		return;
	long got = ferry_proc_read(pid, "cmdline", vm->cmdline, sizeof(vm->cmdline));
	size_t n = got > 0 ? (size_t)got : 0;
	if (n == 0 || vm->cmdline[n - 1] != '\0')
		return; /* unreadable, over 16 KiB, or cut */
	size_t nargs = 0;
	for (size_t off = 0; off < n; off += strlen(vm->cmdline + off) + 1) {
		size_t len = strlen(vm->cmdline + off);
		if (++nargs > FERRY_COOKIE_MAX_ARGS || !ferry_cookie_arg_ok(vm->cmdline + off, len))
			return; /* the cookie cannot carry it */
	}
	vm->nargs = nargs;
	vm->cmdline_len = n;
}

int ferry_probe_cookie(struct ferry_qmp *q, struct ferry_dp *dp, const char *endpoint, uint32_t disabled,
		       const char *hostname, const char *hostuuid, struct ferry_cookie *c, struct ferry_side_caps *caps,
		       struct ferry_err *err)
{
	ferry_cookie_clear(c);
	json_t *res[P_COUNT] = { NULL };
	int rc = probe_run(q, res, err);
	if (!rc)
		rc = identity_from(res[P_NAME], res[P_UUID], hostname, hostuuid, c, err);
	if (!rc) {
		caps_from(res[P_CAPS], res[P_CMDS], q, dp, disabled, caps);
		rc = ferry_caps_to_cookie(caps, c, err);
	}
	if (!rc && (rc = shape_from(res[P_MEM], res[P_CPUS], res[P_TYPE], res[P_BLOCK], &c->vm, err)) == 0) {
		c->flags |= FERRY_COOKIE_VM;
		probe_cmdline(q, &c->vm);
	}
	probe_free(res);
	if (rc)
		return rc;
	enum ferry_cookie_driver_kind k = ferry_probe_driver_kind(dp);
	if (k) {
		c->flags |= FERRY_COOKIE_TRANSPORT;
		c->ndrivers = 1;
		c->drivers[0].kind = k;
		/* The endpoint's scheme is the driver's name; the cookie names the driver itself. */
		const char *colon = strchr(endpoint, ':');
		snprintf(c->drivers[0].endpoint, sizeof(c->drivers[0].endpoint), "%s", colon ? colon + 1 : endpoint);
		c->drivers[0].handoff = (caps->features & FERRY_F_HANDOFF) != 0;
	}
	return 0;
}
