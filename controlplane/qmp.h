/* QMP client: talks to one QEMU monitor socket (unix stream), JSON via jansson.
 *
 * Thread model: one ferry_qmp is used by one thread at a time. Commands are
 * synchronous: ferry_qmp_execute() sends {"execute":..,"arguments":..,"id":N}
 * and reads until the reply carrying id N arrives; asynchronous events read
 * meanwhile are queued and handed out by ferry_qmp_next_event(). */
#ifndef FERRY_QMP_H
#define FERRY_QMP_H

#include <jansson.h>
#include <stdint.h>

#include "../drivers/err.h"

struct ferry_qmp;

struct ferry_qmp_version {
	int major, minor, micro;
};

/* Connect to a QMP unix socket, read the greeting (must be a QMP greeting:
 * {"QMP":{"version":{"qemu":{...}},"capabilities":[...]}}, anything else is
 * "not a QEMU monitor") and negotiate with qmp_capabilities.
 * timeout_ms bounds every wait (connect, greeting, each reply). */
int ferry_qmp_connect(const char *socket_path, int timeout_ms, struct ferry_qmp **out,
		      struct ferry_err *err);

/* Same, on an already connected fd (takes ownership); used by unit tests. */
int ferry_qmp_open_fd(int fd, int timeout_ms, struct ferry_qmp **out, struct ferry_err *err);

void ferry_qmp_close(struct ferry_qmp *qmp);

const struct ferry_qmp_version *ferry_qmp_version(const struct ferry_qmp *qmp);

/* Run a command. args may be NULL (not stolen; caller keeps its reference).
 * On success *result gets a new reference to the "return" value (may be
 * NULL if result is NULL). A QMP error reply returns -EREMOTEIO with the
 * error class and desc in err->msg ("qmp migrate: GenericError: ..."). A
 * closed socket returns -ECONNRESET ("QEMU closed the monitor"), a timeout
 * -ETIMEDOUT, a malformed reply -EPROTO naming what was wrong. */
int ferry_qmp_execute(struct ferry_qmp *qmp, const char *command, json_t *args,
		      json_t **result, struct ferry_err *err);

/* n commands in one write, their replies read in order: one round trip to
 * QEMU instead of n (QEMU answers a monitor's commands in order). args[i] may
 * be NULL (args itself may be NULL); results[i] gets a new reference to each
 * "return" value. Errors as ferry_qmp_execute, naming the first command that
 * failed; then every results[i] is NULL. At most FERRY_QMP_BATCH_MAX. */
#define FERRY_QMP_BATCH_MAX 16
int ferry_qmp_execute_batch(struct ferry_qmp *qmp, size_t n, const char *const commands[], json_t *const args[],
			    json_t *results[], struct ferry_err *err);

/* Convenience: args built by json_pack() format (e.g. "{s:s, s:b}", ...). */
int ferry_qmp_executef(struct ferry_qmp *qmp, json_t **result, struct ferry_err *err,
		       const char *command, const char *args_fmt, ...);

/* Pop the oldest queued event (new reference, or NULL if none queued).
 * With wait_ms > 0 it reads from the socket for up to wait_ms if the queue
 * is empty. Returns 0 with *event NULL on timeout. */
int ferry_qmp_next_event(struct ferry_qmp *qmp, int wait_ms, json_t **event, struct ferry_err *err);

/* Wait for QEMU's next event (dropped) or wait_ms, whichever comes first: a
 * poll loop's pause that ends at once on a status change. A broken monitor
 * still waits wait_ms; the caller's next command reports why. */
void ferry_qmp_wait_event(struct ferry_qmp *qmp, int wait_ms);

/* The process on the other end of the monitor socket (SO_PEERCRED): the
 * QEMU itself, for reading its command line. */
int ferry_qmp_peer_pid(const struct ferry_qmp *qmp, int *pid, struct ferry_err *err);

/* Pass an fd to QEMU (SCM_RIGHTS) with the getfd command under fdname. */
int ferry_qmp_getfd(struct ferry_qmp *qmp, int fd, const char *fdname, struct ferry_err *err);

/* Parse one complete QMP message line (exposed for unit tests). Classifies it:
 * FERRY_QMP_MSG_GREETING, _RETURN, _ERROR, _EVENT; fills *id (or -1) and
 * returns -EPROTO with a message for anything malformed. */
enum ferry_qmp_msg_kind {
	FERRY_QMP_MSG_GREETING = 1,
	FERRY_QMP_MSG_RETURN,
	FERRY_QMP_MSG_ERROR,
	FERRY_QMP_MSG_EVENT,
};
int ferry_qmp_parse_message(const char *line, size_t len, json_t **msg,
			    enum ferry_qmp_msg_kind *kind, int64_t *id, struct ferry_err *err);

#endif
