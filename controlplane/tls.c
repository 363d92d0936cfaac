#include "tls.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/x509.h>

#define PSK_MAX_ENTRIES 4096
#define PSK_MIN_KEY_BYTES 16       /* 128 bits; psktool makes 32 bytes */
#define PSK_MAX_KEY_BYTES 512
#define PSK_FILE_MAX (1 << 20)
#define IDENTITY_MAX 128

/* TLS 1.3 only: both ends are ferryd, there is nothing older to talk to. PSK
 * is combined with (EC)DHE so a leaked key does not expose recorded traffic. */
static const char PRIO_PSK[] = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-KX-ALL:+ECDHE-PSK:+DHE-PSK";
static const char PRIO_X509[] = "NORMAL:-VERS-ALL:+VERS-TLS1.3";

struct psk_entry {
	char *identity;
	gnutls_datum_t key;
};

struct ferry_tls {
	bool psk;
	bool name_check;
	gnutls_priority_t prio;
	gnutls_psk_client_credentials_t psk_cli;
	gnutls_psk_server_credentials_t psk_srv;
	struct psk_entry *keys;
	size_t nkeys;
	gnutls_certificate_credentials_t x509;
	char desc[600];
};

/* What the server's PSK lookup saw during one handshake, for the message. */
struct hs_info {
	struct ferry_tls *t;
	char identity[IDENTITY_MAX];
	bool asked, known;
};

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Peer-supplied text goes into logs: no control characters, bounded. */
static void printable(char *out, size_t outlen, const char *in, size_t inlen)
{
	size_t o = 0;
	for (size_t i = 0; i < inlen && o + 1 < outlen; i++)
		out[o++] = (in[i] >= 32 && in[i] < 127) ? in[i] : '?';
	out[o] = '\0';
}

static void strip_period(char *s)
{
	size_t n = strlen(s);
	while (n && (s[n - 1] == '.' || s[n - 1] == ' ' || s[n - 1] == '\n'))
		s[--n] = '\0';
}

/* ---------------------------------------------------------------- loading */

/* Open a secret for reading; refuse it when group or others may touch it. */
static int open_secret(const char *path, const char *what, struct ferry_err *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ferry_err_set(err, errno, "%s %s: %s", what, path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st)) {
		int e = errno;
		close(fd);
		return ferry_err_set(err, e, "%s %s: %s", what, path, strerror(e));
	}
	if (!S_ISREG(st.st_mode)) {
		close(fd);
		return ferry_err_set(err, EINVAL, "%s %s is not a regular file", what, path);
	}
	if (st.st_mode & 077) {
		close(fd);
		return ferry_err_set(err, EPERM, "%s %s is accessible by group or others (mode %03o); chmod 600 %s",
				     what, path, (unsigned)(st.st_mode & 0777), path);
	}
	return fd;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* One "identity:hexkey" line (psktool's format) into t->keys. */
static int psk_add(struct ferry_tls *t, const char *path, unsigned lineno, char *line, struct ferry_err *err)
{
	char *colon = strchr(line, ':');
	if (!colon || colon == line)
		return ferry_err_set(err, EINVAL, "--tls-psk %s line %u: expected IDENTITY:HEXKEY (as psktool writes)",
				     path, lineno);
	*colon = '\0';
	const char *id = line, *hex = colon + 1;
	size_t idlen = strlen(id), hexlen = strlen(hex);
	if (idlen >= IDENTITY_MAX)
		return ferry_err_set(err, EINVAL, "--tls-psk %s line %u: identity longer than %d bytes", path, lineno,
				     IDENTITY_MAX - 1);
	for (size_t i = 0; i < idlen; i++)
		if (id[i] < 33 || id[i] > 126)
			return ferry_err_set(err, EINVAL, "--tls-psk %s line %u: the identity must be printable, no spaces",
					     path, lineno);
	if (hexlen % 2 || hexlen / 2 < PSK_MIN_KEY_BYTES || hexlen / 2 > PSK_MAX_KEY_BYTES)
		return ferry_err_set(err, EINVAL,
				     "--tls-psk %s line %u: the key must be %d to %d bytes written in hex (psktool makes 32)",
				     path, lineno, PSK_MIN_KEY_BYTES, PSK_MAX_KEY_BYTES);
	for (size_t i = 0; i < t->nkeys; i++)
		if (strcmp(t->keys[i].identity, id) == 0)
			return ferry_err_set(err, EINVAL, "--tls-psk %s line %u: identity '%s' appears twice", path,
					     lineno, id);
	if (t->nkeys >= PSK_MAX_ENTRIES)
		return ferry_err_set(err, EINVAL, "--tls-psk %s: more than %d keys", path, PSK_MAX_ENTRIES);
	struct psk_entry e = { .identity = strdup(id), .key.size = (unsigned)(hexlen / 2) };
	e.key.data = malloc(e.key.size);
	if (!e.identity || !e.key.data) {
		free(e.identity);
		free(e.key.data);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	for (size_t i = 0; i < e.key.size; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			free(e.identity);
			explicit_bzero(e.key.data, e.key.size);
			free(e.key.data);
			return ferry_err_set(err, EINVAL, "--tls-psk %s line %u: the key is not hex", path, lineno);
		}
		e.key.data[i] = (unsigned char)(hi << 4 | lo);
	}
	struct psk_entry *nk = realloc(t->keys, (t->nkeys + 1) * sizeof(*nk));
	if (!nk) {
		free(e.identity);
		explicit_bzero(e.key.data, e.key.size);
		free(e.key.data);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	t->keys = nk;
	t->keys[t->nkeys++] = e;
	return 0;
}

static int psk_read(struct ferry_tls *t, const char *path, struct ferry_err *err)
{
	int fd = open_secret(path, "--tls-psk", err);
	if (fd < 0)
		return fd;
	char *buf = malloc(PSK_FILE_MAX + 2); /* one byte over the limit tells "too large", one for the NUL */
	if (!buf) {
		close(fd);
		return ferry_err_set(err, ENOMEM, "out of memory");
	}
	size_t len = 0;
	int rc = 0;
	for (;;) {
		ssize_t r = read(fd, buf + len, PSK_FILE_MAX + 1 - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			rc = ferry_err_set(err, errno, "--tls-psk %s: %s", path, strerror(errno));
			break;
		}
		if (r == 0)
			break;
		len += (size_t)r;
		if (len > PSK_FILE_MAX) {
			rc = ferry_err_set(err, EFBIG, "--tls-psk %s is larger than %d bytes", path, PSK_FILE_MAX);
			break;
		}
	}
	close(fd);
	buf[len] = '\0';
	unsigned lineno = 0;
	for (char *line = buf, *next; rc == 0 && line && *line; line = next) {
		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		lineno++;
		size_t n = strlen(line);
		while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
			line[--n] = '\0';
		if (n == 0 || line[0] == '#')
			continue;
		rc = psk_add(t, path, lineno, line, err);
	}
	if (rc == 0 && t->nkeys == 0)
		rc = ferry_err_set(err, EINVAL, "--tls-psk %s has no IDENTITY:HEXKEY line (make one with: psktool -u NAME -p %s)",
				   path, path);
	explicit_bzero(buf, len);
	free(buf);
	return rc;
}

/* Server side: the key of a listed identity; recorded for the failure message. */
static int psk_lookup(gnutls_session_t s, const char *identity, gnutls_datum_t *key)
{
	struct hs_info *hs = gnutls_session_get_ptr(s);
	if (!hs)
		return -1;
	hs->asked = true;
	printable(hs->identity, sizeof(hs->identity), identity, strlen(identity));
	for (size_t i = 0; i < hs->t->nkeys; i++) {
		const struct psk_entry *e = &hs->t->keys[i];
		if (strcmp(e->identity, identity) != 0)
			continue;
		key->data = gnutls_malloc(e->key.size);
		if (!key->data)
			return -1;
		memcpy(key->data, e->key.data, e->key.size);
		key->size = e->key.size;
		hs->known = true;
		return 0;
	}
	return -1;
}

static int gnutls_fail(struct ferry_err *err, int rc, const char *fmt, const char *arg)
{
	char what[PATH_MAX + 64];
	snprintf(what, sizeof(what), fmt, arg);
	return ferry_err_set(err, EINVAL, "%s: %s", what, gnutls_strerror(rc));
}

static int x509_load(struct ferry_tls *t, const char *dir, struct ferry_err *err)
{
	char ca[PATH_MAX], cert[PATH_MAX], key[PATH_MAX];
	if ((size_t)snprintf(ca, sizeof(ca), "%s/ca-cert.pem", dir) >= sizeof(ca) ||
	    (size_t)snprintf(cert, sizeof(cert), "%s/server-cert.pem", dir) >= sizeof(cert) ||
	    (size_t)snprintf(key, sizeof(key), "%s/server-key.pem", dir) >= sizeof(key))
		return ferry_err_set(err, ENAMETOOLONG, "--tls-x509 %s: path too long", dir);
	snprintf(t->desc, sizeof(t->desc), "TLS 1.3, X.509 certificate %.150s (CA %.150s%s)", cert, ca,
		 t->name_check ? "" : ", peer names not checked");
	int fd = open_secret(key, "--tls-x509 key", err);
	if (fd < 0)
		return fd;
	close(fd);
	int rc = gnutls_certificate_allocate_credentials(&t->x509);
	if (rc < 0)
		return ferry_err_set(err, ENOMEM, "gnutls: %s", gnutls_strerror(rc));
	if (access(ca, R_OK))
		return ferry_err_set(err, errno, "--tls-x509 CA %s: %s", ca, strerror(errno));
	rc = gnutls_certificate_set_x509_trust_file(t->x509, ca, GNUTLS_X509_FMT_PEM);
	if (rc < 0)
		return gnutls_fail(err, rc, "--tls-x509 CA %s", ca);
	if (rc == 0)
		return ferry_err_set(err, EINVAL, "--tls-x509 CA %s holds no certificate", ca);
	if (access(cert, R_OK))
		return ferry_err_set(err, errno, "--tls-x509 certificate %s: %s", cert, strerror(errno));
	rc = gnutls_certificate_set_x509_key_file(t->x509, cert, key, GNUTLS_X509_FMT_PEM);
	if (rc < 0)
		return gnutls_fail(err, rc, "--tls-x509 certificate and key %s", cert);

	/* Our own certificate must pass the check the peers will make: a
	 * mismatched CA is a start-up error, not a mystery at the first peer. */
	gnutls_x509_crt_t *chain = NULL;
	unsigned nchain = 0;
	rc = gnutls_certificate_get_x509_crt(t->x509, 0, &chain, &nchain);
	if (rc < 0 || nchain == 0)
		return gnutls_fail(err, rc < 0 ? rc : GNUTLS_E_NO_CERTIFICATE_FOUND, "--tls-x509 certificate %s", cert);
	gnutls_x509_trust_list_t tl = NULL;
	unsigned status = 0;
	rc = gnutls_x509_trust_list_init(&tl, 0);
	if (rc >= 0)
		rc = gnutls_x509_trust_list_add_trust_file(tl, ca, NULL, GNUTLS_X509_FMT_PEM, 0, 0);
	if (rc >= 0)
		rc = gnutls_x509_trust_list_verify_crt(tl, chain, nchain, 0, &status, NULL);
	gnutls_datum_t dn = { 0 };
	if (rc >= 0 && status == 0 && gnutls_x509_crt_get_dn3(chain[0], &dn, 0) >= 0) {
		char name[200];
		printable(name, sizeof(name), (const char *)dn.data, dn.size);
		snprintf(t->desc, sizeof(t->desc), "TLS 1.3, X.509 certificate '%s' (CA %.150s%s)", name, ca,
			 t->name_check ? "" : ", peer names not checked");
	}
	gnutls_free(dn.data);
	if (tl)
		gnutls_x509_trust_list_deinit(tl, 1);
	for (unsigned i = 0; i < nchain; i++)
		gnutls_x509_crt_deinit(chain[i]);
	gnutls_free(chain);
	if (rc < 0)
		return gnutls_fail(err, rc, "--tls-x509 checking %s", cert);
	if (status) {
		gnutls_datum_t txt = { 0 };
		char why[300] = "";
		if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &txt, 0) >= 0)
			snprintf(why, sizeof(why), "%s", (const char *)txt.data);
		gnutls_free(txt.data);
		strip_period(why);
		return ferry_err_set(err, EINVAL, "--tls-x509 %s does not verify against %s: %s", cert, ca, why);
	}
	return 0;
}

int ferry_tls_load(const struct ferry_tls_config *cfg, struct ferry_tls **out, struct ferry_err *err)
{
	*out = NULL;
	int given = (cfg->psk_file != NULL) + (cfg->x509_dir != NULL) + (cfg->insecure ? 1 : 0);
	if (given == 0)
		return ferry_err_set(err, EINVAL,
				     "the control connection needs credentials: --tls-psk FILE or --tls-x509 DIR "
				     "(or --insecure-no-tls for plain TCP; see docs/security.md)");
	if (given > 1)
		return ferry_err_set(err, EINVAL, "give only one of --tls-psk, --tls-x509 and --insecure-no-tls");
	if (cfg->insecure)
		return 0;
	struct ferry_tls *t = calloc(1, sizeof(*t));
	if (!t)
		return ferry_err_set(err, ENOMEM, "out of memory");
	t->psk = cfg->psk_file != NULL;
	t->name_check = !cfg->no_name_check;
	int rc;
	const char *errpos = NULL;
	if ((rc = gnutls_priority_init(&t->prio, t->psk ? PRIO_PSK : PRIO_X509, &errpos)) < 0) {
		t->prio = NULL;
		rc = ferry_err_set(err, EINVAL, "gnutls priority at '%s': %s", errpos ? errpos : "?",
				   gnutls_strerror(rc));
		goto fail;
	}
	if (t->psk) {
		if ((rc = psk_read(t, cfg->psk_file, err)))
			goto fail;
		if ((rc = gnutls_psk_allocate_client_credentials(&t->psk_cli)) < 0 ||
		    (rc = gnutls_psk_allocate_server_credentials(&t->psk_srv)) < 0) {
			rc = ferry_err_set(err, ENOMEM, "gnutls: %s", gnutls_strerror(rc));
			goto fail;
		}
		if ((rc = gnutls_psk_set_client_credentials(t->psk_cli, t->keys[0].identity, &t->keys[0].key,
							    GNUTLS_PSK_KEY_RAW)) < 0) {
			rc = gnutls_fail(err, rc, "--tls-psk %s", cfg->psk_file);
			goto fail;
		}
		gnutls_psk_set_server_credentials_function(t->psk_srv, psk_lookup);
		snprintf(t->desc, sizeof(t->desc), "TLS 1.3, PSK identity '%s' (%zu identit%s accepted, from %.150s)",
			 t->keys[0].identity, t->nkeys, t->nkeys == 1 ? "y" : "ies", cfg->psk_file);
	} else {
		if ((rc = x509_load(t, cfg->x509_dir, err)))
			goto fail;
	}
	*out = t;
	return 0;
fail:
	ferry_tls_free(t);
	return rc < 0 ? rc : -EINVAL;
}

void ferry_tls_free(struct ferry_tls *t)
{
	if (!t)
		return;
	if (t->prio)
		gnutls_priority_deinit(t->prio);
	if (t->psk_cli)
		gnutls_psk_free_client_credentials(t->psk_cli);
	if (t->psk_srv)
		gnutls_psk_free_server_credentials(t->psk_srv);
	if (t->x509)
		gnutls_certificate_free_credentials(t->x509);
	for (size_t i = 0; i < t->nkeys; i++) {
		free(t->keys[i].identity);
		explicit_bzero(t->keys[i].key.data, t->keys[i].key.size);
		free(t->keys[i].key.data);
	}
	free(t->keys);
	free(t);
}

const char *ferry_tls_describe(const struct ferry_tls *t)
{
	return t ? t->desc : "plain TCP (--insecure-no-tls)";
}

/* -------------------------------------------------------------- transport */

/* Our own transport: never blocks, whatever the fd's mode, and never raises
 * SIGPIPE; the callers poll with their deadlines. GnuTLS reads errno. */
static ssize_t tr_push(gnutls_transport_ptr_t p, const void *buf, size_t n)
{
	return send((int)(intptr_t)p, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
}

static ssize_t tr_pull(gnutls_transport_ptr_t p, void *buf, size_t n)
{
	return recv((int)(intptr_t)p, buf, n, MSG_DONTWAIT);
}

static int tr_pull_timeout(gnutls_transport_ptr_t p, unsigned int ms)
{
	struct pollfd pf = { .fd = (int)(intptr_t)p, .events = POLLIN };
	int t = ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : ms > INT_MAX ? INT_MAX : (int)ms;
	return poll(&pf, 1, t);
}

/* Wait until the socket is ready the way GnuTLS last wanted; -ETIMEDOUT
 * past the deadline (< 0: none). */
static int wait_session(gnutls_session_t s, int fd, long long deadline)
{
	int left = -1;
	if (deadline >= 0) {
		long long l = deadline - now_ms();
		if (l <= 0)
			return -ETIMEDOUT;
		left = (int)l;
	}
	struct pollfd p = { .fd = fd, .events = gnutls_record_get_direction(s) ? POLLOUT : POLLIN };
	int r = poll(&p, 1, left);
	if (r < 0 && errno != EINTR)
		return -errno;
	return 0;
}

/* ------------------------------------------------------------- handshake */

static bool is_auth_alert(gnutls_alert_description_t a)
{
	switch (a) {
	case GNUTLS_A_BAD_CERTIFICATE:
	case GNUTLS_A_UNSUPPORTED_CERTIFICATE:
	case GNUTLS_A_CERTIFICATE_REVOKED:
	case GNUTLS_A_CERTIFICATE_EXPIRED:
	case GNUTLS_A_CERTIFICATE_UNKNOWN:
	case GNUTLS_A_UNKNOWN_CA:
	case GNUTLS_A_ACCESS_DENIED:
	case GNUTLS_A_DECRYPT_ERROR:
	case GNUTLS_A_UNKNOWN_PSK_IDENTITY:
	case GNUTLS_A_CERTIFICATE_REQUIRED:
	case GNUTLS_A_ILLEGAL_PARAMETER:
	case GNUTLS_A_HANDSHAKE_FAILURE:
	case GNUTLS_A_INSUFFICIENT_SECURITY:
		return true;
	default:
		return false;
	}
}

/* Why a handshake failed, in words an operator can act on. */
static int handshake_error(struct ferry_tls *t, gnutls_session_t s, bool server, const struct hs_info *hs, int rc,
			   struct ferry_err *err)
{
	char lib[200];
	snprintf(lib, sizeof(lib), "%s", gnutls_strerror(rc));
	strip_period(lib);
	if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
		unsigned status = gnutls_session_get_verify_cert_status(s);
		gnutls_datum_t txt = { 0 };
		char why[300] = "certificate not trusted";
		if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &txt, 0) >= 0)
			snprintf(why, sizeof(why), "%s", (const char *)txt.data);
		gnutls_free(txt.data);
		strip_period(why);
		return ferry_err_set(err, EACCES, "authentication failed: the peer's certificate is refused: %s", why);
	}
	/* TLS 1.3: a client whose certificates are all from other CAs than
	 * the ones we named sends none at all. */
	if (rc == GNUTLS_E_NO_CERTIFICATE_FOUND || rc == GNUTLS_E_CERTIFICATE_REQUIRED)
		return ferry_err_set(err, EACCES,
				     "authentication failed: the peer sent no certificate from our CA (%s)", lib);
	if (server && t->psk && hs->asked && !hs->known)
		return ferry_err_set(err, EACCES, "authentication failed: unknown PSK identity '%s'", hs->identity);
	if (server && t->psk && hs->known &&
	    (rc == GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER || rc == GNUTLS_E_DECRYPTION_FAILED ||
	     rc == GNUTLS_E_ILLEGAL_PARAMETER || rc == GNUTLS_E_INSUFFICIENT_CREDENTIALS))
		return ferry_err_set(err, EACCES, "authentication failed: PSK identity '%s' used a different key (%s)",
				     hs->identity, lib);
	if (server && t->psk && !hs->asked && rc == GNUTLS_E_INSUFFICIENT_CREDENTIALS)
		return ferry_err_set(err, EACCES, "authentication failed: the peer offered no PSK (%s)", lib);
	if (!server && rc == GNUTLS_E_INSUFFICIENT_CREDENTIALS)
		return ferry_err_set(err, EACCES,
				     "authentication failed: the peer wants other credentials (%s; PSK on one side, "
				     "X.509 on the other?)",
				     lib);
	if (rc == GNUTLS_E_FATAL_ALERT_RECEIVED) {
		gnutls_alert_description_t a = gnutls_alert_get(s);
		const char *name = gnutls_alert_get_name(a);
		const char *me = t->psk && t->nkeys ? t->keys[0].identity : "";
		if (!server && t->psk && a == GNUTLS_A_UNKNOWN_PSK_IDENTITY)
			return ferry_err_set(err, EACCES, "authentication failed: the peer does not know our PSK identity '%s'",
					     me);
		if (!server && t->psk && a == GNUTLS_A_DECRYPT_ERROR)
			return ferry_err_set(err, EACCES,
					     "authentication failed: the peer has a different key for our PSK identity '%s'",
					     me);
		if (is_auth_alert(a))
			return ferry_err_set(err, EACCES, "authentication failed: the peer refused us (TLS alert '%s')",
					     name ? name : "?");
		return ferry_err_set(err, EPROTO, "the peer sent TLS alert '%s'", name ? name : "?");
	}
	if (rc == GNUTLS_E_PREMATURE_TERMINATION || rc == GNUTLS_E_PULL_ERROR || rc == GNUTLS_E_PUSH_ERROR)
		return ferry_err_set(err, ECONNRESET,
				     "the peer closed the connection during the TLS handshake (%s; is it a ferryd with "
				     "the same kind of credentials?)",
				     lib);
	if (rc == GNUTLS_E_UNEXPECTED_PACKET_LENGTH || rc == GNUTLS_E_UNEXPECTED_PACKET ||
	    rc == GNUTLS_E_UNSUPPORTED_VERSION_PACKET || rc == GNUTLS_E_UNEXPECTED_HANDSHAKE_PACKET)
		return ferry_err_set(err, EPROTO, "the peer does not speak TLS (%s; plain TCP or --insecure-no-tls?)",
				     lib);
	return ferry_err_set(err, EPROTO, "%s", lib);
}

/* Tell the peer why we give up, so its operator sees it too (best effort,
 * never waits). */
static void send_alert(struct ferry_tls *t, gnutls_session_t s, bool server, const struct hs_info *hs, int rc)
{
	if (server && t->psk && hs->asked)
		(void)gnutls_alert_send(s, GNUTLS_AL_FATAL, hs->known ? GNUTLS_A_DECRYPT_ERROR : GNUTLS_A_UNKNOWN_PSK_IDENTITY);
	else
		(void)gnutls_alert_send_appropriate(s, rc);
}

/* Read away what already arrived: closing a socket with unread bytes sends
 * a reset, which could overtake our alert. */
static void drain(int fd)
{
	char buf[4096];
	for (int i = 0; i < 64; i++)
		if (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) <= 0)
			break;
}

int ferry_tls_handshake(struct ferry_tls *t, int fd, bool server, const char *peer_name, int timeout_ms,
			gnutls_session_t *out, struct ferry_err *err)
{
	gnutls_session_t s = NULL;
	int rc = gnutls_init(&s, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NONBLOCK | GNUTLS_NO_TICKETS);
	if (rc < 0)
		return ferry_err_set(err, ENOMEM, "gnutls_init: %s", gnutls_strerror(rc));
	struct hs_info hs = { .t = t };
	if ((rc = gnutls_priority_set(s, t->prio)) < 0)
		goto gnutls_err;
	if (t->psk) {
		rc = server ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, t->psk_srv)
			    : gnutls_credentials_set(s, GNUTLS_CRD_PSK, t->psk_cli);
		if (rc < 0)
			goto gnutls_err;
	} else {
		if ((rc = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->x509)) < 0)
			goto gnutls_err;
		if (server)
			gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
		/* The chain is always verified; the name only where we dialled one. */
		gnutls_session_set_verify_cert(s, !server && t->name_check ? peer_name : NULL, 0);
	}
	gnutls_transport_set_ptr(s, (gnutls_transport_ptr_t)(intptr_t)fd);
	gnutls_transport_set_push_function(s, tr_push);
	gnutls_transport_set_pull_function(s, tr_pull);
	gnutls_transport_set_pull_timeout_function(s, tr_pull_timeout);
	gnutls_session_set_ptr(s, &hs);

	long long deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
	for (;;) {
		rc = gnutls_handshake(s);
		if (rc == GNUTLS_E_SUCCESS)
			break;
		if (rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED && gnutls_error_is_fatal(rc)) {
			handshake_error(t, s, server, &hs, rc, err);
			send_alert(t, s, server, &hs, rc);
			drain(fd);
			goto fail;
		}
		int w = wait_session(s, fd, deadline);
		if (w == -ETIMEDOUT) {
			ferry_err_set(err, ETIMEDOUT,
				      server ? "no TLS handshake within %d ms"
					     : "the peer did not complete the TLS handshake within %d ms (is it running "
					       "with --insecure-no-tls?)",
				      timeout_ms);
			goto fail;
		}
		if (w) {
			ferry_err_set(err, -w, "poll: %s", strerror(-w));
			goto fail;
		}
	}
	gnutls_session_set_ptr(s, NULL);
	*out = s;
	return 0;
gnutls_err:
	ferry_err_set(err, EPROTO, "gnutls: %s", gnutls_strerror(rc));
fail:
	gnutls_deinit(s);
	return -(err && err->code ? err->code : EPROTO);
}

void ferry_tls_peer_describe(gnutls_session_t s, char *out, size_t outlen)
{
	if (outlen == 0)
		return;
	out[0] = '\0';
	if (gnutls_auth_get_type(s) == GNUTLS_CRD_PSK) {
		const char *id = gnutls_psk_server_get_username(s);
		char safe[IDENTITY_MAX];
		if (id) {
			printable(safe, sizeof(safe), id, strlen(id));
			snprintf(out, outlen, "PSK identity '%s'", safe);
		} else {
			snprintf(out, outlen, "PSK");
		}
		return;
	}
	unsigned n = 0;
	const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
	gnutls_x509_crt_t crt;
	if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0) {
		snprintf(out, outlen, "certificate");
		return;
	}
	gnutls_datum_t dn = { 0 };
	if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) >= 0 && gnutls_x509_crt_get_dn3(crt, &dn, 0) >= 0) {
		char safe[200];
		printable(safe, sizeof(safe), (const char *)dn.data, dn.size);
		snprintf(out, outlen, "certificate '%s'", safe);
	} else {
		snprintf(out, outlen, "certificate");
	}
	gnutls_free(dn.data);
	gnutls_x509_crt_deinit(crt);
}

void ferry_tls_close(gnutls_session_t s, int timeout_ms)
{
	if (!s)
		return;
	int fd = (int)(intptr_t)gnutls_transport_get_ptr(s);
	long long deadline = now_ms() + (timeout_ms < 0 ? 0 : timeout_ms);
	/* SHUT_WR: send close_notify, do not wait for the peer's. */
	for (;;) {
		int rc = gnutls_bye(s, GNUTLS_SHUT_WR);
		if (rc != GNUTLS_E_AGAIN && rc != GNUTLS_E_INTERRUPTED)
			break;
		if (wait_session(s, fd, deadline))
			break;
	}
	gnutls_deinit(s);
}

int ferry_tls_io_error(gnutls_session_t s, int rc, const char *what, struct ferry_err *err)
{
	if (rc == GNUTLS_E_PREMATURE_TERMINATION || rc == GNUTLS_E_PULL_ERROR || rc == GNUTLS_E_PUSH_ERROR)
		return ferry_err_set(err, ECONNRESET, "%s: peer closed the connection", what);
	if (rc == GNUTLS_E_FATAL_ALERT_RECEIVED) {
		gnutls_alert_description_t a = gnutls_alert_get(s);
		const char *name = gnutls_alert_get_name(a);
		/* TLS 1.3: a client learns that the server refused its
		 * certificate only here, after its own handshake ended. */
		if (is_auth_alert(a))
			return ferry_err_set(err, EACCES, "%s: authentication failed: the peer refused us (TLS alert '%s')",
					     what, name ? name : "?");
		return ferry_err_set(err, EPROTO, "%s: the peer sent TLS alert '%s'", what, name ? name : "?");
	}
	char lib[200];
	snprintf(lib, sizeof(lib), "%s", gnutls_strerror(rc));
	strip_period(lib);
	return ferry_err_set(err, EPROTO, "%s: TLS: %s", what, lib);
}
