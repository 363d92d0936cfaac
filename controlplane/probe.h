/* What this side brings to a migration, read from its QEMU (over QMP), its
 * data plane and its configuration: the VM's identity and this host's, for
 * the cookie, and the capabilities the plan is chosen from. */
#ifndef FERRY_PROBE_H
#define FERRY_PROBE_H

#include <stdint.h>

#include "../dataplane/dataplane.h"
#include "../drivers/err.h"
#include "cookie.h"
#include "plan.h"
#include "qmp.h"

/* This host's identity: hostname from the kernel; hostuuid as configured, or
 * derived from /etc/machine-id. Two daemons on one machine (tests, demos)
 * pass distinct --host-uuid, or a migration between them is refused as a
 * migration to the same host. */
int ferry_host_identity(const char *configured_uuid, char hostname[FERRY_COOKIE_HOSTNAME_MAX + 1],
			char hostuuid[FERRY_COOKIE_UUID_LEN + 1], struct ferry_err *err);

/* The cookie kind of a data plane's driver ("tcp" -> FERRY_COOKIE_DRIVER_TCP), 0 if unknown. */
enum ferry_cookie_driver_kind ferry_probe_driver_kind(struct ferry_dp *dp);

/* A whole cookie for this side: identity, capabilities, and the transport
 * endpoint of the data plane. */
int ferry_probe_cookie(struct ferry_qmp *q, struct ferry_dp *dp, const char *endpoint, uint32_t disabled,
		       const char *hostname, const char *hostuuid, struct ferry_cookie *c, struct ferry_side_caps *caps,
		       struct ferry_err *err);

#endif
