"""`paystream stripe-endpoint URL [--check]` against the emulator's /v1/webhook_endpoints:
the merchant's endpoint is created once (its secret printed once), updated in place,
checked, and Stripe's signed events then arrive at it."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import stripe

from paystream.dev.localstripe import LocalStripe
from paystream.payments import endpoint
from tests.support import StripeJs, wait_until

pytestmark = pytest.mark.e2e

KEY = "sk_test_paystream"


def paystream(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "paystream", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def stripe_env(local_stripe: LocalStripe, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "PAYSTREAM_"))}
    env.pop("DATABASE_URL", None)  # the command needs no database: none is started
    env["PAYSTREAM_DATA_DIR"] = "/nonexistent/paystream-test"
    return {**env, "STRIPE_API_KEY": KEY, "STRIPE_API_BASE": local_stripe.url, **extra}


class Receiver:
    """The merchant's public webhook URL: keeps every POST it gets."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((body, self.headers.get("Stripe-Signature")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/stripe/webhook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver(local_stripe: LocalStripe) -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    # The emulator posts every later event to a live endpoint: remove this test's.
    with httpx.Client(base_url=local_stripe.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for item in endpoints_for(http, rec.url):
            http.delete(f"/v1/webhook_endpoints/{item['id']}")
    rec.close()


def endpoints_for(http: httpx.Client, url: str) -> list[dict]:
    listed = http.get("/v1/webhook_endpoints", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    return [e for e in listed.json()["data"] if e["url"] == url]


def test_creates_once_updates_in_place_checks_and_events_arrive_signed(
        local_stripe: LocalStripe, receiver: Receiver) -> None:
    env = stripe_env(local_stripe)
    first = paystream("stripe-endpoint", receiver.url, env=env)
    assert first.returncode == 0, first.stderr
    found = re.findall(r"whsec_[0-9A-Za-z]+", first.stdout)
    assert len(found) == 1, first.stdout  # printed once
    secret = found[0]

    with httpx.Client(base_url=local_stripe.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        [made] = endpoints_for(http, receiver.url)
        assert sorted(made["enabled_events"]) == sorted(endpoint.event_types())
        assert made["api_version"] == endpoint.API_VERSION and made["status"] == "enabled"
        assert "secret" not in made  # Stripe shows it only on creation

        again = paystream("stripe-endpoint", receiver.url, env=env)
        assert again.returncode == 0, again.stderr
        assert "whsec_" not in again.stdout and made["id"] in again.stdout
        assert [e["id"] for e in endpoints_for(http, receiver.url)] == [made["id"]]  # no duplicate

        clean = paystream("stripe-endpoint", receiver.url, "--check", env=env)
        assert (clean.returncode, clean.stdout.strip()) == (0, f"{made['id']} is up to date"), clean.stderr

        # Someone narrows the endpoint and disables it by hand in the dashboard.
        changed = http.post(f"/v1/webhook_endpoints/{made['id']}",
                            data={"enabled_events[0]": "charge.succeeded", "enabled_events[1]": "customer.created",
                                  "disabled": "true"})
        assert changed.status_code == 200, changed.text
        drift = paystream("stripe-endpoint", receiver.url, "--check", env=env)
        assert drift.returncode == 1, drift.stdout
        lacks = re.search(r"enabled_events lacks (.*)", drift.stdout)
        assert lacks and "payment_intent.succeeded" in lacks.group(1).split(", ")
        assert "charge.succeeded" not in lacks.group(1)
        assert "types paystream does not use: customer.created" in drift.stdout
        assert "status is disabled" in drift.stdout
        after_check = http.get(f"/v1/webhook_endpoints/{made['id']}").json()
        assert after_check["enabled_events"] == ["charge.succeeded", "customer.created"]  # --check changed nothing

        fixed = paystream("stripe-endpoint", receiver.url, env=env)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert f"updated {made['id']}" in fixed.stdout and "whsec_" not in fixed.stdout
        assert paystream("stripe-endpoint", receiver.url, "--check", env=env).returncode == 0
        assert [e["id"] for e in endpoints_for(http, receiver.url)] == [made["id"]]

    # Stripe now sends this URL its events, signed with the secret printed at creation.
    asyncio.run(_pay_and_receive(local_stripe, receiver, secret))


async def _pay_and_receive(local_stripe: LocalStripe, receiver: Receiver, secret: str) -> None:
    async with StripeJs(local_stripe.url) as js:
        pi = (await js.http.post("/v1/payment_intents", data={
            "amount": "1200", "currency": "usd", "metadata[test]": secrets.token_hex(4)})).json()
        assert (await js.pay(pi["id"], "4242424242424242")).status_code == 200

    def arrived() -> list[dict]:
        events = []
        for body, signature in receiver.received:
            event = stripe.Webhook.construct_event(body.decode(), signature, secret)  # raises unless signed so
            if event["data"]["object"]["id"] == pi["id"]:
                events.append(event)
        return events

    async def succeeded() -> bool:
        return any(e["type"] == "payment_intent.succeeded" for e in arrived())

    await wait_until(succeeded, timeout=20, what="payment_intent.succeeded at the merchant's endpoint")
    assert {e["type"] for e in arrived()} <= set(endpoint.event_types())


def test_an_endpoint_on_another_api_version_is_reported_and_replaced_only_when_asked(
        local_stripe: LocalStripe, receiver: Receiver) -> None:
    with httpx.Client(base_url=local_stripe.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        old = http.post("/v1/webhook_endpoints", data={
            "url": receiver.url, "api_version": "2020-08-27",
            **{f"enabled_events[{i}]": t for i, t in enumerate(endpoint.event_types())}}).json()
        env = stripe_env(local_stripe)
        check = paystream("stripe-endpoint", receiver.url, "--check", env=env)
        assert check.returncode == 1
        assert f"api_version is 2020-08-27, paystream reads {endpoint.API_VERSION}" in check.stdout
        kept = paystream("stripe-endpoint", receiver.url, env=env)
        assert kept.returncode == 1 and "--recreate" in kept.stdout
        assert [e["id"] for e in endpoints_for(http, receiver.url)] == [old["id"]]
        replaced = paystream("stripe-endpoint", receiver.url, "--recreate", env=env)
        assert replaced.returncode == 0, replaced.stdout + replaced.stderr
        assert len(re.findall(r"whsec_[0-9A-Za-z]+", replaced.stdout)) == 1
        [new] = endpoints_for(http, receiver.url)
        assert new["id"] != old["id"] and new["api_version"] == endpoint.API_VERSION


def test_without_a_stripe_key_it_says_so_in_one_line(local_stripe: LocalStripe) -> None:
    env = stripe_env(local_stripe)
    del env["STRIPE_API_KEY"]
    result = paystream("stripe-endpoint", "https://pay.example.com/v1/stripe/webhook", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == "paystream stripe-endpoint: STRIPE_API_KEY is not set"
    assert result.stdout == ""


def test_every_supported_family_has_event_types_and_nothing_else_is_subscribed() -> None:
    from paystream.ingest.stripe_events import SUPPORTED_PREFIXES, is_supported

    types = endpoint.event_types()
    assert all(is_supported(t) for t in types)
    for prefix in SUPPORTED_PREFIXES:
        assert any(t.startswith(prefix) for t in types), prefix
