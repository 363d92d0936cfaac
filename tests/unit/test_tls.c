/* Unit tests for the TLS control connection (controlplane/tls.c and the TLS
 * path of controlplane/jsonline.c): PSK and X.509 pairs that must talk, and
 * wrong keys, foreign CAs, wrong names, plain TCP and silent peers that must
 * be refused with a message saying why. Certificates are made here with the
 * GnuTLS API, in a temporary directory removed at the end. */
#include "controlplane/jsonline.h"
#include "controlplane/tls.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/x509.h>

#include "check.h"

static char tmpdir[] = "/tmp/ferry-test-tls.XXXXXX";

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void die(const char *what)
{
	fprintf(stderr, "test_tls: %s\n", what);
	exit(2);
}

static void write_file(const char *path, const void *data, size_t len, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0 || write(fd, data, len) != (ssize_t)len || fchmod(fd, mode) || close(fd))
		die(path);
}

static void path_in(char *out, size_t n, const char *a, const char *b)
{
	if ((size_t)snprintf(out, n, "%s/%s", a, b) >= n)
		die("path too long");
}

/* ---- certificates -------------------------------------------------------- */

struct ca {
	gnutls_x509_crt_t crt;
	gnutls_x509_privkey_t key;
};

static gnutls_x509_privkey_t new_key(void)
{
	gnutls_x509_privkey_t k;
	if (gnutls_x509_privkey_init(&k) < 0 ||
	    gnutls_x509_privkey_generate(k, GNUTLS_PK_ECDSA, GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0) < 0)
		die("key generation");
	return k;
}

/* A certificate for key, signed by issuer (NULL: self-signed CA). */
static gnutls_x509_crt_t new_cert(gnutls_x509_privkey_t key, const struct ca *issuer, const char *cn, const char *dns,
				  const char *ip)
{
	gnutls_x509_crt_t c;
	unsigned char serial[8];
	if (gnutls_x509_crt_init(&c) < 0 || getrandom(serial, sizeof(serial), 0) != sizeof(serial))
		die("cert init");
	serial[0] &= 0x7f;
	time_t now = time(NULL);
	int rc = gnutls_x509_crt_set_version(c, 3);
	rc |= gnutls_x509_crt_set_serial(c, serial, sizeof(serial));
	rc |= gnutls_x509_crt_set_activation_time(c, now - 3600);
	rc |= gnutls_x509_crt_set_expiration_time(c, now + 86400);
	rc |= gnutls_x509_crt_set_dn_by_oid(c, GNUTLS_OID_X520_COMMON_NAME, 0, cn, (unsigned)strlen(cn));
	rc |= gnutls_x509_crt_set_key(c, key);
	if (!issuer) {
		rc |= gnutls_x509_crt_set_basic_constraints(c, 1, -1);
		rc |= gnutls_x509_crt_set_key_usage(c, GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN);
	} else {
		rc |= gnutls_x509_crt_set_basic_constraints(c, 0, -1);
		rc |= gnutls_x509_crt_set_key_usage(c, GNUTLS_KEY_DIGITAL_SIGNATURE);
		/* one certificate serves both ends of the control connection */
		rc |= gnutls_x509_crt_set_key_purpose_oid(c, GNUTLS_KP_TLS_WWW_SERVER, 0);
		rc |= gnutls_x509_crt_set_key_purpose_oid(c, GNUTLS_KP_TLS_WWW_CLIENT, 0);
		if (dns)
			rc |= gnutls_x509_crt_set_subject_alt_name(c, GNUTLS_SAN_DNSNAME, dns, (unsigned)strlen(dns),
								   GNUTLS_FSAN_APPEND);
		if (ip) {
			struct in_addr a;
			if (inet_pton(AF_INET, ip, &a) != 1)
				die("ip");
			rc |= gnutls_x509_crt_set_subject_alt_name(c, GNUTLS_SAN_IPADDRESS, &a, sizeof(a),
								   GNUTLS_FSAN_APPEND);
		}
	}
	if (rc < 0)
		die("cert fields");
	if (gnutls_x509_crt_sign2(c, issuer ? issuer->crt : c, issuer ? issuer->key : key, GNUTLS_DIG_SHA256, 0) < 0)
		die("cert sign");
	return c;
}

static struct ca new_ca(const char *cn)
{
	struct ca ca = { .key = new_key() };
	ca.crt = new_cert(ca.key, NULL, cn, NULL, NULL);
	return ca;
}

static void free_ca(struct ca *ca)
{
	gnutls_x509_crt_deinit(ca->crt);
	gnutls_x509_privkey_deinit(ca->key);
}

static void append_pem(gnutls_datum_t *all, gnutls_x509_crt_t c)
{
	gnutls_datum_t d;
	if (gnutls_x509_crt_export2(c, GNUTLS_X509_FMT_PEM, &d) < 0)
		die("export cert");
	unsigned char *n = realloc(all->data, all->size + d.size);
	if (!n)
		die("oom");
	memcpy(n + all->size, d.data, d.size);
	all->data = n;
	all->size += d.size;
	gnutls_free(d.data);
}

/* DIR/ca-cert.pem (trust: the CAs given), server-cert.pem and server-key.pem
 * (a fresh key, certified by issuer for dns/ip). */
static void make_x509_dir(const char *name, const struct ca *issuer, const struct ca *trust1, const struct ca *trust2,
			  const char *dns, const char *ip, char *dir, size_t dirlen)
{
	path_in(dir, dirlen, tmpdir, name);
	if (mkdir(dir, 0700))
		die("mkdir");
	char p[512];
	gnutls_datum_t cas = { 0 };
	append_pem(&cas, trust1->crt);
	if (trust2)
		append_pem(&cas, trust2->crt);
	path_in(p, sizeof(p), dir, "ca-cert.pem");
	write_file(p, cas.data, cas.size, 0644);
	free(cas.data);
	gnutls_x509_privkey_t k = new_key();
	gnutls_x509_crt_t c = new_cert(k, issuer, name, dns, ip);
	gnutls_datum_t d;
	if (gnutls_x509_crt_export2(c, GNUTLS_X509_FMT_PEM, &d) < 0)
		die("export");
	path_in(p, sizeof(p), dir, "server-cert.pem");
	write_file(p, d.data, d.size, 0644);
	gnutls_free(d.data);
	if (gnutls_x509_privkey_export2(k, GNUTLS_X509_FMT_PEM, &d) < 0)
		die("export key");
	path_in(p, sizeof(p), dir, "server-key.pem");
	write_file(p, d.data, d.size, 0600);
	gnutls_free(d.data);
	gnutls_x509_crt_deinit(c);
	gnutls_x509_privkey_deinit(k);
}

static struct ferry_tls *load(const struct ferry_tls_config *cfg, const char *what)
{
	struct ferry_err err = { 0 };
	struct ferry_tls *t = NULL;
	int rc = ferry_tls_load(cfg, &t, &err);
	CHECK(rc == 0 && t, "load %s (%s)", what, rc ? err.msg : ferry_tls_describe(t));
	if (rc)
		die("cannot go on without the context");
	return t;
}

static struct ferry_tls *load_psk(const char *name, const char *content)
{
	char p[512];
	path_in(p, sizeof(p), tmpdir, name);
	write_file(p, content, strlen(content), 0600);
	struct ferry_tls_config cfg = { .psk_file = p };
	return load(&cfg, name);
}

static struct ferry_tls *load_x509(const char *dir, bool no_name_check)
{
	struct ferry_tls_config cfg = { .x509_dir = dir, .no_name_check = no_name_check };
	return load(&cfg, dir);
}

/* ---- a one-connection server --------------------------------------------- */

struct server {
	int lfd;
	int port;
	struct ferry_tls *tls;
	int timeout_ms;
	pthread_t thread;
	/* results */
	int rc;
	struct ferry_err err;
	char who[300];
	char recv_err[FERRY_ERR_MSG_MAX];
	long long handshake_ms;
};

/* Accept one connection, handshake, then echo requests until EOF. */
static void *server_main(void *arg)
{
	struct server *s = arg;
	int fd = accept4(s->lfd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		s->rc = -errno;
		return NULL;
	}
	struct ferry_jl jl;
	ferry_jl_init(&jl, fd);
	long long t0 = now_ms();
	s->rc = ferry_jl_accept_tls(&jl, s->tls, s->timeout_ms, &s->err);
	s->handshake_ms = now_ms() - t0;
	if (s->rc == 0 && jl.tls)
		ferry_tls_peer_describe(jl.tls, s->who, sizeof(s->who));
	while (s->rc == 0) {
		json_t *req = NULL;
		struct ferry_err e = { 0 };
		if (ferry_jl_recv(&jl, 5000, &req, &e)) {
			/* like the daemon: an error reply, then close */
			snprintf(s->recv_err, sizeof(s->recv_err), "%s", e.msg);
			json_t *rep = json_pack("{s:b, s:s}", "ok", 0, "error", e.msg);
			if (rep)
				(void)ferry_jl_send(&jl, rep, 1000, &e);
			json_decref(rep);
			break;
		}
		json_t *rep = json_pack("{s:b, s:O}", "ok", 1, "echo", json_object_get(req, "data"));
		json_decref(req);
		int rc = rep ? ferry_jl_send(&jl, rep, 5000, &e) : -ENOMEM;
		json_decref(rep);
		if (rc)
			break;
	}
	ferry_jl_close(&jl);
	return NULL;
}

static void server_start(struct server *s, struct ferry_tls *tls, int timeout_ms)
{
	memset(s, 0, sizeof(*s));
	s->tls = tls;
	s->timeout_ms = timeout_ms;
	s->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sa);
	if (s->lfd < 0 || bind(s->lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(s->lfd, 4) ||
	    getsockname(s->lfd, (struct sockaddr *)&sa, &sl))
		die("listen");
	s->port = ntohs(sa.sin_port);
	if (pthread_create(&s->thread, NULL, server_main, s))
		die("pthread_create");
}

static void server_join(struct server *s)
{
	pthread_join(s->thread, NULL);
	close(s->lfd);
}

/* Connect with client context cli (NULL: plain TCP) to a server with srv
 * through host (127.0.0.1 or localhost) and make one call. */
struct outcome {
	int connect_rc, call_rc;
	struct ferry_err err;  /* the client's first failure */
	struct server srv;
};

static void talk(struct outcome *o, struct ferry_tls *cli, struct ferry_tls *srv, const char *host, size_t payload)
{
	memset(o, 0, sizeof(*o));
	server_start(&o->srv, srv, 3000);
	char hp[300];
	snprintf(hp, sizeof(hp), "%s:%d", host, o->srv.port);
	struct ferry_jl jl = { .fd = -1 };
	o->connect_rc = ferry_jl_connect_tcp_tls(hp, 5000, cli, &jl, &o->err);
	o->call_rc = -1;
	if (o->connect_rc == 0) {
		char *data = malloc(payload + 1);
		if (!data)
			die("oom");
		memset(data, 'x', payload);
		data[payload] = '\0';
		json_t *req = json_pack("{s:s, s:s}", "cmd", "echo", "data", data);
		json_t *rep = NULL;
		o->call_rc = ferry_jl_call(&jl, req, 5000, &rep, &o->err);
		if (o->call_rc == 0) {
			const char *back = json_string_value(json_object_get(rep, "echo"));
			if (!back || strcmp(back, data) != 0)
				o->call_rc = -EBADMSG;
		}
		json_decref(req);
		json_decref(rep);
		free(data);
		ferry_jl_close(&jl);
	}
	server_join(&o->srv);
}

static void print_outcome(const char *what, const struct outcome *o)
{
	printf("   # %s: client connect %d call %d '%s'; server %d '%s' (%s)\n", what, o->connect_rc, o->call_rc,
	       o->err.msg, o->srv.rc, o->srv.err.msg, o->srv.who);
}

/* ---- tests ---------------------------------------------------------------- */

#define KEY_A "6f1c6bfa8f2c44f5a0e3d9c1b2a39485766e5f4d3c2b1a099887766554433221"
#define KEY_B "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define KEY_X "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"

static void test_psk(void)
{
	struct ferry_tls *srv = load_psk("srv.psk", "# the cluster\nsrv:" KEY_A "\nhost-b:" KEY_B "\n");
	struct ferry_tls *good = load_psk("b.psk", "host-b:" KEY_B "\n");
	struct ferry_tls *wrongkey = load_psk("b-wrong.psk", "host-b:" KEY_X "\n");
	struct ferry_tls *unknown = load_psk("z.psk", "host-z:" KEY_B "\n");
	struct outcome o;

	talk(&o, good, srv, "127.0.0.1", 10);
	print_outcome("psk good", &o);
	CHECK(o.connect_rc == 0 && o.call_rc == 0 && o.srv.rc == 0, "PSK: a listed identity with its key talks");
	CHECK(strstr(o.srv.who, "PSK identity 'host-b'") != NULL, "PSK: the server knows who connected");

	/* more than one TLS record each way, and the newline framing across them */
	talk(&o, good, srv, "127.0.0.1", 300000);
	CHECK(o.connect_rc == 0 && o.call_rc == 0, "PSK: a 300 kB message crosses whole (%d %d)", o.connect_rc,
	      o.call_rc);

	/* the server's own first line is also a client identity (two daemons sharing one file) */
	talk(&o, srv, srv, "127.0.0.1", 10);
	CHECK(o.connect_rc == 0 && o.call_rc == 0, "PSK: two daemons with the same file talk");

	talk(&o, wrongkey, srv, "127.0.0.1", 10);
	print_outcome("psk wrong key", &o);
	CHECK(o.connect_rc == -EACCES && strstr(o.err.msg, "authentication failed: the peer has a different key for our PSK identity 'host-b'"),
	      "PSK wrong key: the client is refused and says authentication failed: %s", o.err.msg);
	CHECK(strstr(o.err.msg, "TLS handshake with 127.0.0.1:") != NULL, "PSK wrong key: the client names the peer");
	CHECK(o.srv.rc == -EACCES && strstr(o.srv.err.msg, "'host-b'") && strstr(o.srv.err.msg, "different key"),
	      "PSK wrong key: the server names the identity and the wrong key: %s", o.srv.err.msg);

	talk(&o, unknown, srv, "127.0.0.1", 10);
	print_outcome("psk unknown identity", &o);
	CHECK(o.connect_rc == -EACCES && strstr(o.err.msg, "authentication failed: the peer does not know our PSK identity 'host-z'"),
	      "PSK unknown identity: the client is refused: %s", o.err.msg);
	CHECK(o.srv.rc == -EACCES && strstr(o.srv.err.msg, "unknown PSK identity 'host-z'"),
	      "PSK unknown identity: the server says so: %s", o.srv.err.msg);

	/* a plain-TCP peer (an old ferryd, a stray client) against a TLS server */
	talk(&o, NULL, srv, "127.0.0.1", 10);
	print_outcome("plain client", &o);
	CHECK(o.connect_rc == 0 && o.call_rc != 0, "plain TCP client: its request gets no answer (%d %s)", o.call_rc,
	      o.err.msg);
	CHECK(o.srv.rc != 0 && strstr(o.srv.err.msg, "does not speak TLS"),
	      "plain TCP client: the server refuses it: %s", o.srv.err.msg);

	/* and a TLS client against a plain-TCP server: both sides say why, at once */
	long long t0 = now_ms();
	talk(&o, good, NULL, "127.0.0.1", 10);
	print_outcome("plain server", &o);
	CHECK(o.connect_rc == -EPROTO && strstr(o.err.msg, "does not speak TLS"),
	      "plain TCP server: the TLS client says it does not speak TLS: %s", o.err.msg);
	CHECK(strstr(o.srv.recv_err, "the peer speaks TLS and this end is plain TCP"),
	      "plain TCP server: ... and the server that it speaks TLS: %s", o.srv.recv_err);
	CHECK(now_ms() - t0 < 2000, "... at once (%lld ms)", now_ms() - t0);

	ferry_tls_free(wrongkey);
	ferry_tls_free(unknown);
	ferry_tls_free(good);
	ferry_tls_free(srv);
}

static void test_silent(void)
{
	struct ferry_tls *srv = load_psk("silent.psk", "srv:" KEY_A "\n");
	struct server s;
	server_start(&s, srv, 400);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)s.port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		die("connect");
	server_join(&s); /* returns once the server gave up */
	close(fd);
	CHECK(s.rc == -ETIMEDOUT && strstr(s.err.msg, "no TLS handshake within 400 ms"),
	      "a silent client is dropped after the handshake timeout: %s", s.err.msg);
	CHECK(s.handshake_ms >= 350 && s.handshake_ms < 3000, "... in %lld ms", s.handshake_ms);

	/* and a TLS client facing a listener that never answers */
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	socklen_t sl = sizeof(sa);
	sa.sin_port = 0;
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 4) ||
	    getsockname(lfd, (struct sockaddr *)&sa, &sl))
		die("listen");
	char hp[64];
	snprintf(hp, sizeof(hp), "127.0.0.1:%d", ntohs(sa.sin_port));
	struct ferry_jl jl = { .fd = -1 };
	struct ferry_err err = { 0 };
	long long t0 = now_ms();
	int rc = ferry_jl_connect_tcp_tls(hp, 400, srv, &jl, &err);
	long long el = now_ms() - t0;
	CHECK(rc == -ETIMEDOUT && strstr(err.msg, "did not complete the TLS handshake"),
	      "a silent server times the client out: %s", err.msg);
	CHECK(el >= 350 && el < 3000, "... in %lld ms", el);
	CHECK(jl.fd == -1 && jl.tls == NULL, "... and leaves the connection untouched");
	close(lfd);
	ferry_tls_free(srv);
}

static void test_x509(void)
{
	struct ca ca1 = new_ca("ferry test CA 1"), ca2 = new_ca("ferry test CA 2");
	char d1[512], d1b[512], dname[512], d2[512], dmixed[512], dbad[512];
	make_x509_dir("host-a", &ca1, &ca1, NULL, "localhost", "127.0.0.1", d1, sizeof(d1));
	make_x509_dir("host-b", &ca1, &ca1, NULL, "localhost", "127.0.0.1", d1b, sizeof(d1b));
	make_x509_dir("named", &ca1, &ca1, NULL, "ferry.example", NULL, dname, sizeof(dname));
	make_x509_dir("other-ca", &ca2, &ca2, NULL, "localhost", "127.0.0.1", d2, sizeof(d2));
	/* trusts both CAs, but its own certificate is from CA 2 */
	make_x509_dir("mixed", &ca2, &ca2, &ca1, "localhost", "127.0.0.1", dmixed, sizeof(dmixed));
	/* claims CA 1 but holds a CA 2 certificate: refused at load */
	make_x509_dir("bad", &ca2, &ca1, NULL, "localhost", "127.0.0.1", dbad, sizeof(dbad));

	struct ferry_tls *a = load_x509(d1, false), *b = load_x509(d1b, false), *named = load_x509(dname, false),
			 *named_nocheck = load_x509(dname, true), *other = load_x509(d2, false),
			 *mixed = load_x509(dmixed, false);
	struct outcome o;

	talk(&o, a, b, "127.0.0.1", 10);
	print_outcome("x509 good", &o);
	CHECK(o.connect_rc == 0 && o.call_rc == 0 && o.srv.rc == 0, "X.509: same CA, IP in the certificate: talks");
	CHECK(strstr(o.srv.who, "CN=host-a") != NULL, "X.509: the server sees the client's certificate");
	talk(&o, a, b, "localhost", 10);
	CHECK(o.connect_rc == 0 && o.call_rc == 0, "X.509: by DNS name: talks (%s)", o.err.msg);

	talk(&o, a, named, "127.0.0.1", 10);
	print_outcome("x509 wrong name", &o);
	CHECK(o.connect_rc == -EACCES && strstr(o.err.msg, "does not match"),
	      "X.509: a certificate for another name is refused: %s", o.err.msg);
	struct ferry_tls *a_nocheck = load_x509(d1, true);
	talk(&o, a_nocheck, named_nocheck, "127.0.0.1", 10);
	CHECK(o.connect_rc == 0 && o.call_rc == 0, "X.509: --tls-no-name-check accepts it (%s)", o.err.msg);

	talk(&o, other, b, "127.0.0.1", 10);
	print_outcome("x509 other CA client", &o);
	CHECK(o.connect_rc == -EACCES && strstr(o.err.msg, "NOT trusted"),
	      "X.509 other CA: the client does not trust the server: %s", o.err.msg);
	CHECK(o.srv.rc == -EACCES && strstr(o.srv.err.msg, "authentication failed: the peer refused us"),
	      "X.509 other CA: the server hears the client's refusal: %s", o.srv.err.msg);

	/* the server must refuse a client certificate from a CA it does not
	 * trust, even when the client trusts the server */
	talk(&o, mixed, b, "127.0.0.1", 10);
	print_outcome("x509 untrusted client", &o);
	CHECK(o.srv.rc == -EACCES && strstr(o.srv.err.msg, "no certificate from our CA"),
	      "X.509: the server refuses a client certificate of another CA: %s", o.srv.err.msg);
	CHECK(o.call_rc != 0 && strstr(o.err.msg, "authentication failed"),
	      "X.509: ... and the client hears why: %s", o.err.msg);

	/* PSK client against an X.509 server */
	struct ferry_tls *psk = load_psk("x.psk", "x:" KEY_B "\n");
	talk(&o, psk, b, "127.0.0.1", 10);
	print_outcome("psk vs x509", &o);
	CHECK(o.connect_rc != 0 && o.srv.rc != 0, "PSK client against an X.509 server: refused (%s / %s)", o.err.msg,
	      o.srv.err.msg);

	struct ferry_tls_config cfg = { .x509_dir = dbad };
	struct ferry_tls *t = NULL;
	struct ferry_err err = { 0 };
	CHECK(ferry_tls_load(&cfg, &t, &err) == -EINVAL && strstr(err.msg, "does not verify against"),
	      "X.509: a certificate not from the configured CA is refused at load: %s", err.msg);
	char p[600];
	path_in(p, sizeof(p), d1, "server-key.pem");
	chmod(p, 0640);
	cfg.x509_dir = d1;
	ferry_err_clear(&err);
	CHECK(ferry_tls_load(&cfg, &t, &err) == -EPERM && strstr(err.msg, "chmod 600"),
	      "X.509: a key readable by the group is refused: %s", err.msg);
	cfg.x509_dir = tmpdir;
	ferry_err_clear(&err);
	CHECK(ferry_tls_load(&cfg, &t, &err) == -ENOENT && strstr(err.msg, "server-key.pem"),
	      "X.509: a directory without the files is refused: %s", err.msg);

	ferry_tls_free(psk);
	ferry_tls_free(a);
	ferry_tls_free(a_nocheck);
	ferry_tls_free(b);
	ferry_tls_free(named);
	ferry_tls_free(named_nocheck);
	ferry_tls_free(other);
	ferry_tls_free(mixed);
	free_ca(&ca1);
	free_ca(&ca2);
}

static void load_fails(const char *name, const char *content, mode_t mode, int want, const char *needle)
{
	char p[512];
	path_in(p, sizeof(p), tmpdir, name);
	write_file(p, content, strlen(content), mode);
	struct ferry_tls_config cfg = { .psk_file = p };
	struct ferry_tls *t = NULL;
	struct ferry_err err = { 0 };
	int rc = ferry_tls_load(&cfg, &t, &err);
	CHECK(rc == want && t == NULL && strstr(err.msg, needle), "PSK file %s refused: %s", name, err.msg);
}

static void test_config(void)
{
	struct ferry_tls_config none = { 0 }, insecure = { .insecure = true }, both = { .psk_file = "x", .x509_dir = "y" };
	struct ferry_tls *t = (struct ferry_tls *)1;
	struct ferry_err err = { 0 };
	CHECK(ferry_tls_load(&none, &t, &err) == -EINVAL && strstr(err.msg, "--tls-psk") &&
		      strstr(err.msg, "--tls-x509") && strstr(err.msg, "--insecure-no-tls"),
	      "no credentials: refused, naming the three options: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_tls_load(&insecure, &t, &err) == 0 && t == NULL, "--insecure-no-tls: no context (plain TCP)");
	CHECK(strstr(ferry_tls_describe(NULL), "plain TCP") != NULL, "... described as plain TCP");
	CHECK(ferry_tls_load(&both, &t, &err) == -EINVAL && strstr(err.msg, "only one"), "two kinds: refused");

	load_fails("open.psk", "a:" KEY_A "\n", 0644, -EPERM, "accessible by group or others");
	load_fails("empty.psk", "# nothing\n\n", 0600, -EINVAL, "no IDENTITY:HEXKEY");
	load_fails("nocolon.psk", "a " KEY_A "\n", 0600, -EINVAL, "line 1: expected IDENTITY:HEXKEY");
	load_fails("short.psk", "a:00112233\n", 0600, -EINVAL, "16 to 512 bytes");
	load_fails("nothex.psk", "a:" KEY_A "\nb:zz23456789abcdef0123456789abcdef\n", 0600, -EINVAL,
		   "line 2: the key is not hex");
	load_fails("twice.psk", "a:" KEY_A "\na:" KEY_B "\n", 0600, -EINVAL, "'a' appears twice");
	char *big = malloc((1 << 20) + 2);
	if (!big)
		die("oom");
	memset(big, '#', (1 << 20) + 1);
	big[(1 << 20) + 1] = '\0';
	load_fails("big.psk", big, 0600, -EFBIG, "larger than 1048576 bytes");
	big[1 << 20] = '\0'; /* exactly the limit: read whole, and only comments */
	load_fails("limit.psk", big, 0600, -EINVAL, "no IDENTITY:HEXKEY");
	free(big);
	struct ferry_tls_config missing = { .psk_file = "/nonexistent/ferry.psk" };
	ferry_err_clear(&err);
	CHECK(ferry_tls_load(&missing, &t, &err) == -ENOENT && strstr(err.msg, "/nonexistent/ferry.psk"),
	      "a missing PSK file: %s", err.msg);
	/* CRLF and surrounding blank lines are fine */
	struct ferry_tls *ok = load_psk("crlf.psk", "\r\nsrv:" KEY_A "\r\n\r\n");
	CHECK(strstr(ferry_tls_describe(ok), "PSK identity 'srv'") != NULL, "described: %s", ferry_tls_describe(ok));
	ferry_tls_free(ok);
}

static void test_peer_gone(void)
{
	struct ferry_tls *t = load_psk("gone.psk", "g:" KEY_A "\n");
	struct server s;
	server_start(&s, t, 3000);
	char hp[64];
	snprintf(hp, sizeof(hp), "127.0.0.1:%d", s.port);
	struct ferry_jl jl = { .fd = -1 };
	struct ferry_err err = { 0 };
	int rc = ferry_jl_connect_tcp_tls(hp, 5000, t, &jl, &err);
	CHECK(rc == 0, "peer-gone: connected (%s)", err.msg);
	CHECK(!ferry_jl_peer_gone(&jl), "peer-gone: not while the server is there");
	/* a request answered while we are not reading: still not gone, and the answer is kept */
	json_t *req = json_pack("{s:s, s:s}", "cmd", "echo", "data", "kept");
	rc = ferry_jl_send(&jl, req, 5000, &err);
	json_decref(req);
	long long deadline = now_ms() + 3000;
	bool gone = false;
	while (!jl.len && now_ms() < deadline && !(gone = ferry_jl_peer_gone(&jl)))
		usleep(10000);
	CHECK(rc == 0 && !gone && jl.len > 0, "peer-gone: a reply that arrives is buffered, not taken for EOF");
	json_t *rep = NULL;
	rc = ferry_jl_recv(&jl, 1000, &rep, &err);
	CHECK(rc == 0 && strcmp(json_string_value(json_object_get(rep, "echo")) ?: "", "kept") == 0,
	      "peer-gone: ... and read by the next recv");
	json_decref(rep);
	shutdown(jl.fd, SHUT_WR); /* the server sees EOF and closes with close_notify */
	server_join(&s);
	deadline = now_ms() + 3000;
	while (!(gone = ferry_jl_peer_gone(&jl)) && now_ms() < deadline)
		usleep(10000);
	CHECK(gone, "peer-gone: true once the server closed");
	ferry_jl_close(&jl);
	ferry_tls_free(t);
}

int main(void)
{
	if (!mkdtemp(tmpdir))
		die("mkdtemp");
	test_config();
	test_psk();
	test_silent();
	test_x509();
	test_peer_gone();
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf -- '%s'", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "test_tls: could not remove %s\n", tmpdir);
	CHECK_DONE();
}
