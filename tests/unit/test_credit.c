/* Flow control: the sender's window, the receiver's reports, and hostile peers. */
#include <errno.h>

#include "check.h"
#include "dataplane/credit.h"

int main(void)
{
	struct ferry_err err = { 0 };
	struct ferry_credit_tx tx;
	struct ferry_credit_rx rx;
	const uint64_t W = 1000;

	ferry_credit_tx_init(&tx, W);
	ferry_credit_rx_init(&rx, W);
	CHECK(ferry_credit_tx_avail(&tx) == W, "a fresh sender may send one window");

	ferry_credit_tx_sent(&tx, 600);
	CHECK(ferry_credit_tx_avail(&tx) == 400, "sending consumes credit");
	CHECK(ferry_credit_rx_arrive(&rx, 600, &err) == 0, "receiver accepts bytes within the window");
	ferry_credit_tx_sent(&tx, 400);
	CHECK(ferry_credit_tx_avail(&tx) == 0, "a full window blocks the sender (back-pressure)");
	CHECK(ferry_credit_rx_arrive(&rx, 400, &err) == 0, "exactly one window outstanding is fine");

	CHECK(!ferry_credit_rx_report_due(&rx), "nothing consumed: no report due");
	ferry_credit_rx_consumed(&rx, 200);
	CHECK(!ferry_credit_rx_report_due(&rx), "less than a quarter window consumed: no report yet");
	ferry_credit_rx_consumed(&rx, 100);
	CHECK(ferry_credit_rx_report_due(&rx), "a quarter window consumed: report due");
	uint64_t v = ferry_credit_rx_report(&rx);
	CHECK(v == 300 && !ferry_credit_rx_report_due(&rx), "report carries the cumulative count and resets");
	CHECK(ferry_credit_tx_update(&tx, v, &err) == 0 && ferry_credit_tx_avail(&tx) == 300,
	      "the sender regains exactly what was consumed");

	/* liveness: a blocked sender is always unblocked once the window drains */
	ferry_credit_tx_sent(&tx, 300);
	CHECK(ferry_credit_rx_arrive(&rx, 300, &err) == 0, "refill to a full window");
	ferry_credit_rx_consumed(&rx, 1000);
	CHECK(ferry_credit_rx_report_due(&rx), "a drained full window always produces a report");
	CHECK(ferry_credit_tx_update(&tx, ferry_credit_rx_report(&rx), &err) == 0 && ferry_credit_tx_avail(&tx) == W,
	      "after the report the sender has a whole window again");

	/* hostile or broken peers */
	ferry_err_clear(&err);
	CHECK(ferry_credit_rx_arrive(&rx, W + 1, &err) == -EPROTO, "a sender overrunning the window is caught");
	CHECK_MSG(err, "overran", "message says the window was overrun: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_credit_tx_update(&tx, 10, &err) == -EPROTO, "a credit report going backwards is rejected");
	CHECK_MSG(err, "backwards", "message: %s", err.msg);
	ferry_err_clear(&err);
	CHECK(ferry_credit_tx_update(&tx, tx.sent + 1, &err) == -EPROTO, "a report of more than was sent is rejected");
	CHECK_MSG(err, "only", "message: %s", err.msg);

	/* large counters: no overflow in 64-bit offsets */
	ferry_credit_tx_init(&tx, 4u << 20);
	tx.sent = tx.consumed = (1ull << 62);
	CHECK(ferry_credit_tx_avail(&tx) == (4u << 20), "windows work at huge stream offsets");
	CHECK_DONE();
}
