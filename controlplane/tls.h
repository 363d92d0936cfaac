/* TLS for the control connection between two daemons (GnuTLS, TLS 1.3),
 * authenticated both ways: with a pre-shared key (psktool's "identity:hexkey"
 * file) or with X.509 certificates signed by one CA. A loaded context is
 * read-only and shared by every connection of the daemon. See
 * docs/security.md. */
#ifndef FERRY_TLS_H
#define FERRY_TLS_H

#include <stdbool.h>

#include <gnutls/gnutls.h>

#include "../drivers/err.h"

/* Server side: a peer that connects and completes no handshake is dropped. */
#define FERRY_TLS_HANDSHAKE_MS 10000

struct ferry_tls_config {
	const char *psk_file;   /* --tls-psk FILE: first line is our identity, every line may connect */
	const char *x509_dir;   /* --tls-x509 DIR: ca-cert.pem, server-cert.pem, server-key.pem */
	bool no_name_check;     /* --tls-no-name-check: x509 chain only, not the name dialled */
	bool insecure;          /* --insecure-no-tls: plain TCP */
};

struct ferry_tls;

/* Exactly one of psk_file, x509_dir, insecure must be given; insecure gives
 * *out = NULL (plain TCP). Key files readable by group or others are refused. */
int ferry_tls_load(const struct ferry_tls_config *cfg, struct ferry_tls **out, struct ferry_err *err);
void ferry_tls_free(struct ferry_tls *t);
/* For the daemon's start line, e.g. "TLS 1.3, PSK identity 'a' (3 peers known)". */
const char *ferry_tls_describe(const struct ferry_tls *t);

/* Handshake on the connected socket fd (its blocking mode is left alone):
 * peer_name is the host dialled (client side; checked against the peer's
 * certificate unless no_name_check), NULL on the server side. On success
 * *out is the session (fd stays the caller's); on failure the message names
 * the reason ("unknown PSK identity 'x'", "certificate is NOT trusted", ...)
 * and the fd is left open. timeout_ms < 0: no deadline. */
int ferry_tls_handshake(struct ferry_tls *t, int fd, bool server, const char *peer_name, int timeout_ms,
			gnutls_session_t *out, struct ferry_err *err);
/* What the peer proved: "PSK identity 'x'" or the certificate's DN. */
void ferry_tls_peer_describe(gnutls_session_t s, char *out, size_t outlen);
/* Send close_notify (bounded by timeout_ms) and free the session. */
void ferry_tls_close(gnutls_session_t s, int timeout_ms);
/* Fill err for a failed record send/recv (rc a GNUTLS_E_ code). */
int ferry_tls_io_error(gnutls_session_t s, int rc, const char *what, struct ferry_err *err);

#endif
