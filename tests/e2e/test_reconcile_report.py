"""Reconciliation that reports (issue 24 section 5), through a real `paystream serve`, the
CLI as a subprocess and the test emulator, in a database of each test's own:
`paystream reconcile --report` says nothing of a window that agrees with Stripe (exit 0)
and prints each difference when a webhook was lost or a row was changed behind paystream's
back (exit 1), changing nothing; the server's periodic report counts differences in
paystream_reconcile_differences_total; paystream_transactions_stuck counts a transaction
left unsettled past PAYSTREAM_STUCK_AFTER until the sweeper settles it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from paystream import db as paystream_db
from paystream.dev.localstripe import LocalStripe
from tests import harness, stripe_emulator
from tests.conftest import ARTIFACTS, Server
from tests.support import Paystream, StripeJs, wait_until

pytestmark = pytest.mark.e2e

VISA = "4242424242424242"


@pytest.fixture
def own_stripe() -> Iterator[LocalStripe]:
    """The test emulator, of this test's own: its webhooks reach only this test's server."""
    stripe = LocalStripe(harness.free_port(), ARTIFACTS, module=stripe_emulator.MODULE, cwd=harness.ROOT).start()
    yield stripe
    stripe.stop()


def lose_webhooks(stripe: LocalStripe, server: Server) -> None:
    """From now on the emulator posts its events to a port nobody listens on."""
    stripe.register_webhook(f"http://127.0.0.1:{harness.free_port()}/v1/stripe/webhook", server.webhook_secret)


def report(server: Server, *args: str) -> tuple[int, list[dict], dict]:
    out = subprocess.run([sys.executable, "-m", "paystream", "reconcile", "--report", *args], env=server.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines and "summary" in lines[-1], out.stdout
    return out.returncode, lines[:-1], lines[-1]["summary"]


async def metric(ps: Paystream, name: str, labels: str) -> float | None:
    for line in (await ps.http.get("/metrics")).text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def paid(ps: Paystream, stripe_js: StripeJs, amount: int) -> dict:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "payment", "amount": amount, "currency": "usd"})
    assert resp.status_code == 201, resp.text
    txn = resp.json()["transaction"]
    assert (await stripe_js.pay(txn["stripe_id"], VISA)).status_code == 200
    return txn


async def test_report_says_nothing_of_agreement_and_each_difference_otherwise(
        own_database: str, own_stripe: LocalStripe) -> None:
    await paystream_db.migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": own_stripe.url, "PAYSTREAM_RECONCILE_INTERVAL": "1"})
    own_stripe.register_webhook(f"{server.base_url}/v1/stripe/webhook", server.webhook_secret)
    await asyncio.to_thread(server.start)
    db = await asyncpg.connect(own_database)
    try:
        async with Paystream(server) as ps, StripeJs(own_stripe.url) as stripe_js:
            whole = await paid(ps, stripe_js, 1500)
            refunded = await paid(ps, stripe_js, 2500)

            async def settled() -> bool:
                return ((await ps.get(whole["id"])).json()["status"] == "succeeded"
                        and (await ps.get(refunded["id"])).json()["status"] == "succeeded")

            await wait_until(settled, timeout=20, what="both payments to succeed")
            resp = await ps.http.post(f"/v1/transactions/{refunded['id']}/refunds", headers=ps.backend,
                                      json={"amount": 1000})
            assert resp.status_code == 201, resp.text

            async def partly_refunded() -> bool:
                got = (await ps.get(refunded["id"])).json()
                return got["status"] == "partially_refunded" and got["amount_refunded"] == 1000

            await wait_until(partly_refunded, timeout=20, what="the refund to be applied")

            code, differences, summary = await asyncio.to_thread(report, server, "--since", "1h")
            assert (code, differences) == (0, []), (differences, summary)
            assert summary["checked"] == 2 and summary["differences"] == 0 and summary["complete"] is True

            # A payment whose webhooks never arrive, and a row changed behind paystream's back.
            lose_webhooks(own_stripe, server)
            lost = await paid(ps, stripe_js, 3500)
            assert (await stripe_js.payment_intent(lost["stripe_id"]))["status"] == "succeeded"
            await db.execute("UPDATE transactions SET amount = amount + 1, updated_at = clock_timestamp()"
                             " WHERE id = $1", whole["id"])
            differing = [lost["id"], whole["id"]]
            state = "SELECT id, status, seq, amount FROM transactions WHERE id = ANY($1) ORDER BY id"
            before = [tuple(r) for r in await db.fetch(state, differing)]

            code, differences, summary = await asyncio.to_thread(report, server, "--since", "1h")
            assert code == 1, (differences, summary)
            found = {(d["transaction_id"], d["stripe_id"], d["field"], d["ours"], d["stripe"]) for d in differences}
            assert found == {(lost["id"], lost["stripe_id"], "status", "requires_payment_method", "succeeded"),
                             (whole["id"], whole["stripe_id"], "amount", 1501, 1500)}, differences
            assert len(differences) == 2
            assert summary["differences"] == 2 and summary["fields"] == {"status": 1, "amount": 1}
            assert summary["checked"] == 3 and summary["complete"] is True
            assert [tuple(r) for r in await db.fetch(state, differing)] == before  # a report changes nothing

            # A window that does not reach back to them reports nothing.
            code, differences, summary = await asyncio.to_thread(report, server, "--since", "2099-01-01T00:00:00Z")
            assert (code, differences, summary["checked"]) == (0, [], 0)

            # The server's own periodic report (every second here) counts and logs the
            # difference made after a report began.
            async def counted() -> bool:
                return (await metric(ps, "paystream_reconcile_differences_total", 'field="amount"') or 0) >= 1

            await wait_until(counted, timeout=30, what="the periodic report to count the amount difference")
            logged = f"reconcile: {whole['id']} amount differs from Stripe: ours 1501, Stripe's 1500"
            assert logged in server.log_path.read_text(), server.log_tail()
            assert await db.fetchval("SELECT value->>'ran_at' FROM paystream_config WHERE key = 'reconcile_report'")
            assert (await ps.get(lost["id"])).json()["status"] == "requires_payment_method"  # still only reported
    finally:
        await db.close()
        server.stop()


async def test_stuck_gauge_counts_a_transaction_left_unsettled(own_database: str, own_stripe: LocalStripe) -> None:
    await paystream_db.migrate(own_database)
    server = Server(own_database, {"STRIPE_API_BASE": own_stripe.url, "PAYSTREAM_STUCK_AFTER": "1",
                                   "PAYSTREAM_RECOVERY_INTERVAL": "0.2", "PAYSTREAM_RECONCILE_INTERVAL": "0"})
    lose_webhooks(own_stripe, server)
    await asyncio.to_thread(server.start)
    try:
        async with Paystream(server) as ps, StripeJs(own_stripe.url) as stripe_js:
            resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                                      json={"kind": "payment", "amount": 1800, "currency": "usd"})
            assert resp.status_code == 201, resp.text
            txn = resp.json()["transaction"]

            async def stuck(count: float) -> bool:
                return await metric(ps, "paystream_transactions_stuck", 'status="requires_payment_method"') == count

            await wait_until(lambda: stuck(1.0), timeout=20, what="the gauge to count the unsettled transaction")
            # Paid at Stripe, its webhook lost: the sweeper reads it, and it is stuck no more.
            assert (await stripe_js.pay(txn["stripe_id"], VISA)).status_code == 200

            async def settled() -> bool:
                return (await ps.get(txn["id"])).json()["status"] == "succeeded" and await stuck(0.0)

            await wait_until(settled, timeout=30, what="the sweeper to settle it and the gauge to drop")
    finally:
        server.stop()


def test_alert_rules_parse_and_name_metrics_that_exist() -> None:
    """docs/alerts.yml: valid YAML in Prometheus's rule-file shape, every expression naming
    only metrics paystream serves."""
    import re

    import yaml
    from prometheus_client import REGISTRY

    from paystream.ops import metrics  # noqa: F401  # registers paystream's metrics

    rules = yaml.safe_load((harness.ROOT / "docs" / "alerts.yml").read_text())
    # A labelled metric with no child yet has no samples: its family names it (a
    # counter's family without _total).
    served = {name for family in REGISTRY.collect() for name in
              {family.name, f"{family.name}_total" if family.type == "counter" else family.name,
               *(s.name for s in family.samples)}}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {"PaystreamTransactionsStuck", "PaystreamOutboundDeliveriesFailed", "PaystreamStripeBreakerOpen",
            "PaystreamReconcileDifferences"} <= {rule["alert"] for rule in alerts}
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        named = set(re.findall(r"\bpaystream_[a-z_]+", rule["expr"]))
        assert named and named <= served, (rule["alert"], named - served)
