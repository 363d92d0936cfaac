/* Starting a destination QEMU from the source's description (Prepare,
 * protocol step 2, when no QEMU waits for the VM on this host).
 *
 * The source's command line comes from the peer's cookie: untrusted.
 * ferry_spawn_build() is a pure function that turns it into the command line
 * this host runs, through an allowlist: options that shape the VM (machine,
 * accel, cpu, smp, memory, name, uuid, devices of known drivers, drives and
 * block nodes, memory backends, user networking) are kept; disk image paths
 * are remapped to STORAGE_DIR/basename and RAM files to MEM_DIR/basename;
 * the source's monitors, character devices, pid file, logs and -incoming
 * are dropped (character devices become null ones, serial ports null
 * backends, so the device set stays the same); anything else, or any
 * property that could make this host read, write or run something outside
 * its configured directories, is refused with an error naming it. Then ferry
 * adds `-display none -S -incoming defer` and its own QMP socket.
 *
 * ferry_spawn_start() runs it detached from the daemon (its own session, not
 * our child), so the VM outlives ferryd once the migration succeeded;
 * ferry_spawn_kill() ends it when the migration failed. */
#ifndef FERRY_SPAWN_H
#define FERRY_SPAWN_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "../drivers/err.h"
#include "cookie.h"

#define FERRY_SPAWN_MAX_FILES 64

struct ferry_spawn_config {
	const char *qemu;        /* the binary this host runs (a name on PATH or a path) */
	const char *storage_dir; /* disk images: STORAGE_DIR/basename of the source's path */
	const char *mem_dir;     /* RAM files of memory-backend-file; NULL: such backends refused */
	const char *qmp_path;    /* the monitor socket ferry adds */
	const char *pidfile;     /* NULL: none */
	bool prealloc;           /* prealloc=on for every memory backend (fault RAM in before it arrives) */
};

enum ferry_spawn_file_kind {
	FERRY_SPAWN_IMAGE = 1,   /* must exist in the storage dir */
	FERRY_SPAWN_RAM,         /* created by ferry in the mem dir, must not exist */
};

struct ferry_spawn_file {
	enum ferry_spawn_file_kind kind;
	char *path;              /* remapped, malloc'ed */
	char *source_path;       /* as the source named it, malloc'ed */
	/* IMAGE: the block device name QEMU will give it where the command line
	 * says ("ide0-hd0", an id=), to compare with the cookie's size; "" if
	 * unknown (the shape check after start still compares every device). */
	char device[FERRY_COOKIE_TOKEN_MAX + 1];
	bool made;               /* IMAGE created by ferry_spawn_make_images */
};

struct ferry_spawn_cmd {
	char **argv;             /* NULL-terminated, malloc'ed */
	size_t argc;
	size_t nfiles;
	struct ferry_spawn_file files[FERRY_SPAWN_MAX_FILES];
};

/* Build the destination's command line from vm's <qemu-cmdline>. Pure: no
 * file is looked at. -EPERM naming the option (and property) for anything
 * refused, -EINVAL for a malformed or missing command line, -ENOMEM. On
 * error *out is empty (free it all the same: harmless). */
int ferry_spawn_build(const struct ferry_spawn_config *cfg, const struct ferry_cookie_vm *vm,
		      struct ferry_spawn_cmd *out, struct ferry_err *err);
void ferry_spawn_cmd_free(struct ferry_spawn_cmd *c);

/* Storage migration: create each missing IMAGE whose device is one of the
 * cookie's <nbd> disks, as an empty (sparse) raw image of the disk's
 * capacity, ready for the mirror. An existing file is left to
 * ferry_spawn_check_files. On error the images made are removed again. */
int ferry_spawn_make_images(struct ferry_spawn_cmd *c, const struct ferry_cookie *cookie, struct ferry_err *err);
/* Remove the images ferry_spawn_make_images made (a migration that failed). */
void ferry_spawn_remove_images(struct ferry_spawn_cmd *c);

/* Check the files before starting: every image exists as a regular file
 * (not a link) and, where its device is known and it is raw, has the size
 * the cookie gives that device; every RAM file is created here (O_EXCL, mode
 * 0600), so it can never be another VM's. Errors name the file. */
int ferry_spawn_check_files(struct ferry_spawn_cmd *c, const struct ferry_cookie_vm *vm, struct ferry_err *err);
/* Remove the RAM files ferry_spawn_check_files created. */
void ferry_spawn_remove_ram(const struct ferry_spawn_cmd *c);

/* Read /proc/PID/FILE (e.g. "cmdline") into buf: the number of bytes, or
 * -errno; -E2BIG when it holds more than len bytes. */
long ferry_proc_read(long pid, const char *file, char *buf, size_t len);

/* A started destination QEMU. */
struct ferry_spawned {
	pid_t pid;
	int pidfd;               /* -1 where pidfd_open is missing */
};

/* Start argv detached (own session, reparented to init: ferryd's exit
 * leaves it running), stdin from /dev/null, stdout and stderr appended to
 * log_path. */
int ferry_spawn_start(const struct ferry_spawn_cmd *c, const char *log_path, struct ferry_spawned *out,
		      struct ferry_err *err);
/* Whether it still runs. */
bool ferry_spawn_alive(const struct ferry_spawned *s);
/* SIGKILL it (through its pidfd, so never another process that reused the
 * pid) and wait up to timeout_ms for it to be gone. */
void ferry_spawn_kill(struct ferry_spawned *s, int timeout_ms);
/* Forget it (it keeps running); closes the pidfd. */
void ferry_spawn_release(struct ferry_spawned *s);

#endif
