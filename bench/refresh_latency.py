"""Faster than the webhook (issue 12): a customer's browser time from confirming a card
payment to seeing `succeeded` pushed, with and without POST /refresh right after
confirm, against localstripe (which posts its webhooks about a second late, as Stripe's
1-5 s in miniature).  Both variants run in the same process, interleaved, so the noisy
machine affects them alike.  Prints one JSON line.

    .venv/bin/python bench/refresh_latency.py [--payments 100] [--concurrency 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, and the root for tests.harness

from common import machine, save, summary  # noqa: E402

from paystream.dev.localstripe import LocalStripe  # noqa: E402
from tests.harness import FreshDatabase, Server, free_port  # noqa: E402
from tests.support import Paystream, StripeJs  # noqa: E402

VISA = "4242424242424242"


async def one(ps: Paystream, stripe_js: StripeJs, refresh: bool) -> float:
    resp = await ps.http.post("/v1/transactions", headers=ps.backend,
                              json={"kind": "payment", "amount": 1000, "currency": "usd"})
    created = resp.json()
    txn, token = created["transaction"], created["stream_token"]
    async with ps.sse(txn["id"], token=token) as stream:
        await stream.event()  # the snapshot: the page is waiting
        await stripe_js.attach_card(txn["stripe_id"], VISA)
        started = time.perf_counter()
        confirmed = await stripe_js.http.post(f"/v1/payment_intents/{txn['stripe_id']}/confirm")
        assert confirmed.status_code == 200, confirmed.text
        if refresh:  # what the SDK's `refresh: true` does on the page Stripe.js returns to
            await ps.http.post(f"/v1/transactions/{txn['id']}/refresh",
                               headers={"Authorization": f"Bearer {token}"})
        while (frame := await stream.event(timeout=30)) is not None:
            if frame.json["status"] == "succeeded":
                return (time.perf_counter() - started) * 1000
    raise AssertionError("the stream ended before succeeded")


async def run(args: argparse.Namespace, stripe: LocalStripe, server: Server) -> dict:
    async with Paystream(server) as ps, StripeJs(stripe.url) as stripe_js:
        ps.http.timeout = httpx.Timeout(30)
        samples: dict[bool, list[float]] = {False: [], True: []}
        queue = [i % 2 == 1 for i in range(2 * args.payments)]  # interleaved

        async def worker() -> None:
            while queue:
                refresh = queue.pop()
                samples[refresh].append(await one(ps, stripe_js, refresh))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    without, with_ = summary(samples[False]), summary(samples[True])
    line = {"scenario": "refresh_latency", "payments_each": args.payments, "concurrency": args.concurrency,
            "confirm_to_succeeded_ms": {"webhook_only": without, "with_refresh": with_},
            "p50_ratio_with_over_without": round(with_["p50"] / without["p50"], 3), "machine": machine()}
    save("refresh_latency", line, samples[True])
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=100, help="payments per variant (default 100)")
    parser.add_argument("--concurrency", type=int, default=5)
    args = parser.parse_args()
    stripe = LocalStripe(free_port()).start()
    database = FreshDatabase("system")
    server = Server(database.url, {"STRIPE_API_BASE": stripe.url, "PAYSTREAM_REFRESH_RATE": "1000"})
    stripe.register_webhook(f"{server.base_url}/v1/stripe/webhook", server.webhook_secret)
    server.start()
    try:
        print(json.dumps(asyncio.run(run(args, stripe, server))))
    finally:
        server.stop()
        database.drop()
        stripe.stop()


if __name__ == "__main__":
    main()
