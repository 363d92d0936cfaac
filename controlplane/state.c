#include "state.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RECORD_MAX_BYTES 8192

static const char *const phase_names[] = {
	[FERRY_PHASE_BEGIN] = "begin",         [FERRY_PHASE_PREPARED] = "prepared",
	[FERRY_PHASE_PERFORMING] = "performing", [FERRY_PHASE_SENT] = "sent",
	[FERRY_PHASE_DONE] = "done",           [FERRY_PHASE_FAILED] = "failed",
	[FERRY_PHASE_CANCELLED] = "cancelled", [FERRY_PHASE_UNKNOWN] = "unknown",
};

const char *ferry_state_phase_name(enum ferry_state_phase p)
{
	if (p >= FERRY_PHASE_BEGIN && p <= FERRY_PHASE_UNKNOWN)
		return phase_names[p];
	return "?";
}

enum ferry_state_phase ferry_state_phase_parse(const char *name)
{
	for (int p = FERRY_PHASE_BEGIN; name && p <= FERRY_PHASE_UNKNOWN; p++)
		if (strcmp(name, phase_names[p]) == 0)
			return (enum ferry_state_phase)p;
	return 0;
}

bool ferry_state_phase_final(enum ferry_state_phase p)
{
	return p == FERRY_PHASE_DONE || p == FERRY_PHASE_FAILED || p == FERRY_PHASE_CANCELLED;
}

static const char *role_name(enum ferry_state_role r)
{
	return r == FERRY_ROLE_SOURCE ? "source" : "destination";
}

static int record_path(const char *dir, enum ferry_state_role role, uint32_t id, char *buf, size_t len,
		       struct ferry_err *err)
{
	if ((size_t)snprintf(buf, len, "%s/%s-%" PRIu32 ".json", dir, role_name(role), id) >= len)
		return ferry_err_set(err, ENAMETOOLONG, "state directory path too long");
	return 0;
}

int ferry_state_init(const char *dir, struct ferry_err *err)
{
	if (mkdir(dir, 0700) && errno != EEXIST)
		return ferry_err_set(err, errno, "cannot create the state directory %s: %s", dir, strerror(errno));
	struct stat st;
	if (stat(dir, &st) || !S_ISDIR(st.st_mode))
		return ferry_err_set(err, ENOTDIR, "state directory %s is not a directory", dir);
	return 0;
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int rc = fsync(fd) ? -errno : 0;
	close(fd);
	return rc;
}

int ferry_state_write(const char *dir, const struct ferry_state_record *r, struct ferry_err *err)
{
	char path[FERRY_STATE_PATH_MAX + 64], tmp[FERRY_STATE_PATH_MAX + 80];
	int rc = record_path(dir, r->role, r->id, path, sizeof(path), err);
	if (rc)
		return rc;
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	json_t *j = json_pack("{s:I, s:I, s:s, s:s, s:s, s:s, s:s, s:s, s:b, s:I, s:s}", "id", (json_int_t)r->id,
			      "session", (json_int_t)r->session, "role", role_name(r->role), "phase",
			      ferry_state_phase_name(r->phase), "vm", r->vm, "peer", r->peer, "qmp", r->qmp, "peer_qmp",
			      r->peer_qmp, "was_running", r->was_running, "updated", (json_int_t)time(NULL), "note",
			      r->note);
	if (j && r->spawned_pid > 0)
		json_object_set_new(j, "spawned_pid", json_integer((json_int_t)r->spawned_pid));
	char *text = j ? json_dumps(j, JSON_INDENT(1) | JSON_SORT_KEYS) : NULL;
	json_decref(j);
	if (!text)
		return ferry_err_set(err, ENOMEM, "out of memory");
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		rc = ferry_err_set(err, errno, "cannot write %s: %s", tmp, strerror(errno));
		free(text);
		return rc;
	}
	size_t len = strlen(text), off = 0;
	while (off < len) {
		ssize_t w = write(fd, text + off, len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			rc = ferry_err_set(err, errno ? errno : EIO, "cannot write %s: %s", tmp, strerror(errno));
			break;
		}
		off += (size_t)w;
	}
	free(text);
	if (!rc && fsync(fd))
		rc = ferry_err_set(err, errno, "fsync %s: %s", tmp, strerror(errno));
	if (close(fd) && !rc)
		rc = ferry_err_set(err, errno, "close %s: %s", tmp, strerror(errno));
	if (!rc && rename(tmp, path))
		rc = ferry_err_set(err, errno, "rename %s: %s", tmp, strerror(errno));
	if (rc) {
		unlink(tmp);
		return rc;
	}
	/* The rename itself must survive a crash too. */
	int drc = fsync_dir(dir);
	return drc ? ferry_err_set(err, -drc, "fsync %s: %s", dir, strerror(-drc)) : 0;
}

static void copy_str(char *dst, size_t len, json_t *v)
{
	snprintf(dst, len, "%s", json_is_string(v) ? json_string_value(v) : "");
}

static int parse_record(const char *text, struct ferry_state_record *r, struct ferry_err *err)
{
	json_error_t je;
	json_t *j = json_loads(text, 0, &je);
	if (!json_is_object(j)) {
		json_decref(j);
		return ferry_err_set(err, EPROTO, "not a JSON object (%s)", je.text);
	}
	memset(r, 0, sizeof(*r));
	json_t *id = json_object_get(j, "id"), *sess = json_object_get(j, "session");
	const char *role = json_string_value(json_object_get(j, "role"));
	r->phase = ferry_state_phase_parse(json_string_value(json_object_get(j, "phase")));
	int rc = 0;
	if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) > UINT32_MAX || !role ||
	    (strcmp(role, "source") && strcmp(role, "destination")) || !r->phase)
		rc = ferry_err_set(err, EPROTO, "record lacks a valid id, role or phase");
	if (!rc) {
		r->id = (uint32_t)json_integer_value(id);
		r->session = json_is_integer(sess) ? (uint32_t)json_integer_value(sess) : 0;
		r->role = strcmp(role, "source") == 0 ? FERRY_ROLE_SOURCE : FERRY_ROLE_DESTINATION;
		copy_str(r->vm, sizeof(r->vm), json_object_get(j, "vm"));
		copy_str(r->peer, sizeof(r->peer), json_object_get(j, "peer"));
		copy_str(r->qmp, sizeof(r->qmp), json_object_get(j, "qmp"));
		copy_str(r->peer_qmp, sizeof(r->peer_qmp), json_object_get(j, "peer_qmp"));
		copy_str(r->note, sizeof(r->note), json_object_get(j, "note"));
		r->was_running = json_is_true(json_object_get(j, "was_running"));
		json_t *sp = json_object_get(j, "spawned_pid");
		r->spawned_pid = json_is_integer(sp) && json_integer_value(sp) > 0 ? (int64_t)json_integer_value(sp) : 0;
		json_t *u = json_object_get(j, "updated");
		r->updated = json_is_integer(u) ? (int64_t)json_integer_value(u) : 0;
	}
	json_decref(j);
	return rc;
}

static int read_file(const char *path, struct ferry_state_record *r, struct ferry_err *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return ferry_err_set(err, errno, "%s: %s", path, strerror(errno));
	char buf[RECORD_MAX_BYTES + 1];
	ssize_t n = read(fd, buf, sizeof(buf));
	int e = errno;
	close(fd);
	if (n < 0)
		return ferry_err_set(err, e, "%s: %s", path, strerror(e));
	if (n > RECORD_MAX_BYTES)
		return ferry_err_set(err, EFBIG, "%s: larger than %d bytes", path, RECORD_MAX_BYTES);
	buf[n] = '\0';
	int rc = parse_record(buf, r, err);
	return rc ? ferry_err_prefix(err, "%s", path) : 0;
}

int ferry_state_read(const char *dir, enum ferry_state_role role, uint32_t id, struct ferry_state_record *r,
		     struct ferry_err *err)
{
	char path[FERRY_STATE_PATH_MAX + 64];
	int rc = record_path(dir, role, id, path, sizeof(path), err);
	return rc ? rc : read_file(path, r, err);
}

int ferry_state_remove(const char *dir, enum ferry_state_role role, uint32_t id, struct ferry_err *err)
{
	char path[FERRY_STATE_PATH_MAX + 64];
	int rc = record_path(dir, role, id, path, sizeof(path), err);
	if (rc)
		return rc;
	if (unlink(path) && errno != ENOENT)
		return ferry_err_set(err, errno, "cannot remove %s: %s", path, strerror(errno));
	return 0;
}

int ferry_state_list(const char *dir, struct ferry_state_record **out, unsigned *n, unsigned *bad,
		     struct ferry_err *err)
{
	*out = NULL;
	*n = *bad = 0;
	DIR *d = opendir(dir);
	if (!d)
		return ferry_err_set(err, errno, "cannot read the state directory %s: %s", dir, strerror(errno));
	unsigned cap = 0;
	struct dirent *de;
	int rc = 0;
	while ((de = readdir(d))) {
		size_t len = strlen(de->d_name);
		if (len < 6 || strcmp(de->d_name + len - 5, ".json") != 0 ||
		    (strncmp(de->d_name, "source-", 7) && strncmp(de->d_name, "destination-", 12)))
			continue;
		if (*n == cap) {
			unsigned ncap = cap ? 2 * cap : 16;
			struct ferry_state_record *g = realloc(*out, ncap * sizeof(**out));
			if (!g) {
				rc = ferry_err_set(err, ENOMEM, "out of memory");
				break;
			}
			*out = g;
			cap = ncap;
		}
		char path[FERRY_STATE_PATH_MAX + 300];
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		struct ferry_err ignored = { 0 };
		if (read_file(path, &(*out)[*n], &ignored))
			(*bad)++;
		else
			(*n)++;
	}
	closedir(d);
	if (rc) {
		free(*out);
		*out = NULL;
		*n = 0;
	}
	return rc;
}
