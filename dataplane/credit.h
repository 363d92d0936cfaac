/* Per-stream end-to-end flow control (credits).
 *
 * The receiver grants a window of bytes; the sender never has more than
 * 'window' bytes outstanding beyond what the receiver reported consumed
 * (delivered to its local socket). So a slow destination QEMU back-pressures
 * the source QEMU, and each stream's receive buffering is bounded by the
 * window. Pure logic, no I/O. */
#ifndef FERRY_CREDIT_H
#define FERRY_CREDIT_H

#include <stdbool.h>
#include <stdint.h>

#include "../drivers/err.h"

struct ferry_credit_tx {
	uint64_t sent;      /* bytes framed and handed to the lane */
	uint64_t consumed;  /* peer's last cumulative consumption report */
	uint64_t window;
};

struct ferry_credit_rx {
	uint64_t received;    /* bytes arrived from the wire */
	uint64_t consumed;    /* bytes delivered to the local socket */
	uint64_t advertised;  /* consumption last reported to the sender */
	uint64_t window;
};

void ferry_credit_tx_init(struct ferry_credit_tx *c, uint64_t window);
uint64_t ferry_credit_tx_avail(const struct ferry_credit_tx *c);
void ferry_credit_tx_sent(struct ferry_credit_tx *c, uint64_t n);
/* Apply a CREDIT report; rejects one that goes backwards or claims more than was sent. */
int ferry_credit_tx_update(struct ferry_credit_tx *c, uint64_t consumed, struct ferry_err *err);

void ferry_credit_rx_init(struct ferry_credit_rx *c, uint64_t window);
/* n bytes arrive; rejects a sender that overruns the window. */
int ferry_credit_rx_arrive(struct ferry_credit_rx *c, uint64_t n, struct ferry_err *err);
void ferry_credit_rx_consumed(struct ferry_credit_rx *c, uint64_t n);
/* Whether a CREDIT report is due (a quarter window consumed since the last one). */
bool ferry_credit_rx_report_due(const struct ferry_credit_rx *c);
/* Value to report, and remember it was reported. */
uint64_t ferry_credit_rx_report(struct ferry_credit_rx *c);

#endif
