#include "credit.h"

#include <errno.h>
#include <inttypes.h>

void ferry_credit_tx_init(struct ferry_credit_tx *c, uint64_t window)
{
	c->sent = 0;
	c->consumed = 0;
	c->window = window;
}

uint64_t ferry_credit_tx_avail(const struct ferry_credit_tx *c)
{
	uint64_t outstanding = c->sent - c->consumed;
	return outstanding >= c->window ? 0 : c->window - outstanding;
}

void ferry_credit_tx_sent(struct ferry_credit_tx *c, uint64_t n)
{
	c->sent += n;
}

int ferry_credit_tx_update(struct ferry_credit_tx *c, uint64_t consumed, struct ferry_err *err)
{
	if (consumed < c->consumed)
		return ferry_err_set(err, EPROTO, "credit went backwards (%" PRIu64 " after %" PRIu64 ")",
				     consumed, c->consumed);
	if (consumed > c->sent)
		return ferry_err_set(err, EPROTO, "peer claims %" PRIu64 " bytes consumed but only %" PRIu64 " were sent",
				     consumed, c->sent);
	c->consumed = consumed;
	return 0;
}

void ferry_credit_rx_init(struct ferry_credit_rx *c, uint64_t window)
{
	c->received = 0;
	c->consumed = 0;
	c->advertised = 0;
	c->window = window;
}

int ferry_credit_rx_arrive(struct ferry_credit_rx *c, uint64_t n, struct ferry_err *err)
{
	if (c->received + n - c->advertised > c->window)
		return ferry_err_set(err, EPROTO, "peer overran the flow-control window (%" PRIu64 " bytes outstanding, window %" PRIu64 ")",
				     c->received + n - c->advertised, c->window);
	c->received += n;
	return 0;
}

void ferry_credit_rx_consumed(struct ferry_credit_rx *c, uint64_t n)
{
	c->consumed += n;
}

bool ferry_credit_rx_report_due(const struct ferry_credit_rx *c)
{
	/* A quarter window is enough for liveness: a blocked sender has a full
	 * window outstanding, so once that arrives and drains the report is due. */
	uint64_t owed = c->consumed - c->advertised;
	return owed > 0 && owed >= c->window / 4;
}

uint64_t ferry_credit_rx_report(struct ferry_credit_rx *c)
{
	c->advertised = c->consumed;
	return c->consumed;
}
