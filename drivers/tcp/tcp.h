/* Kernel TCP driver: the fallback that runs everywhere. One TCP connection
 * per lane; stream payload moves with splice() so it never enters user space.
 * Options: bind=HOST:PORT (default 127.0.0.1:0), splice=on|off. */
#ifndef FERRY_TCP_H
#define FERRY_TCP_H

#include "../driver.h"

extern const struct ferry_driver_ops ferry_tcp_driver;

#endif
