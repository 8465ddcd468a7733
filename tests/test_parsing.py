"""Property-based: whatever arrives, the parsers answer with their own precise errors,
never a crash (which would be a 500 and, for a webhook, a lost precise answer)."""

from __future__ import annotations

import json
import time

import stripe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paystream.auth import tokens
from paystream.changes.lifecycle import RANK
from paystream.dev import trigger
from paystream.errors import ApiError
from paystream.ingest import webhooks
from paystream.ingest.stripe_events import MalformedEvent, check_envelope, interpret, is_supported
from paystream.push import streams

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
FIELDS = ["id", "status", "amount", "amount_due", "amount_paid", "amount_refunded", "currency", "customer",
          "metadata", "payment_intent", "charge", "invoice", "captured", "refunded", "last_payment_error",
          "last_setup_error", "payments", "failure_reason", "object"]
TYPES = ["payment_intent.created", "payment_intent.succeeded", "payment_intent.payment_failed",
         "payment_intent.requires_action", "payment_intent.amount_capturable_updated", "payment_intent.canceled",
         "charge.succeeded", "charge.refunded", "charge.dispute.created", "charge.refund.updated", "charge.expired",
         "refund.failed", "refund.updated", "invoice.paid", "invoice.payment_failed", "invoice.voided",
         "setup_intent.succeeded", "setup_intent.setup_failed", "customer.created"]


@st.composite
def events(draw: st.DrawFn) -> dict:
    obj = draw(st.fixed_dictionaries({}, optional={f: json_values for f in FIELDS}))
    obj["id"] = draw(st.text(min_size=1, max_size=30))
    return {"id": "evt_" + draw(st.text(max_size=20)), "type": draw(st.sampled_from(TYPES)),
            "created": draw(st.integers(0, 4_000_000_000)), "data": {"object": obj}}


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_any_signed_event_is_read_or_refused_never_crashes(event: dict) -> None:
    try:
        check_envelope(event)
    except MalformedEvent:
        return  # refused precisely (ids with NUL, say): a 400, not a crash
    if not is_supported(event["type"]):
        return
    meaning = interpret(event)
    assert meaning.stripe_id is None or isinstance(meaning.stripe_id, str)
    assert isinstance(meaning.amount, int) and meaning.amount >= 0
    assert isinstance(meaning.currency, str) and len(meaning.currency) == 3 and meaning.currency.islower()
    assert isinstance(meaning.metadata, dict)
    if meaning.change is not None:
        assert meaning.change.status in RANK
        json.dumps(meaning.change.last_error)  # storable


@given(json_values)
def test_any_json_is_an_envelope_or_a_malformed_event(body: object) -> None:
    try:
        check_envelope(body)
    except MalformedEvent:
        return
    interpret(body)  # type: ignore[arg-type]


@given(st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=200)))
def test_any_body_and_signature_header_gets_a_precise_400(body: bytes, header: str | None) -> None:
    try:
        webhooks.verify(body, header, ["whsec_test"], 300)
    except ApiError as exc:
        assert exc.status == 400 and exc.code in ("missing_signature", "invalid_signature", "stale_signature",
                                                  "malformed_body")
    else:
        raise AssertionError("an unsigned body was accepted")


@given(st.text(max_size=30))
def test_stream_parameters(value: str) -> None:
    for parse in (lambda v: streams.cursor(v, "x"), lambda v: streams.flag(v, "x")):
        try:
            parse(value)
        except ApiError as exc:
            assert exc.status == 400


@given(st.text(max_size=300))
def test_any_token_text_is_a_grant_or_a_token_error(text: str) -> None:
    try:
        tokens.verify("s" * 32, text)
    except tokens.TokenError:
        pass


SECRETS = ["whsec_current", "whsec_rotated"]


@st.composite
def signature_headers(draw: st.DrawFn) -> tuple[str, str]:
    """A body and a Stripe-Signature header: right, rotated or wrong secret, the body as
    signed or altered, fresh or stale timestamps, extra and reordered entries, or garbage."""
    body = draw(st.text(max_size=200))
    if draw(st.integers(0, 5)) == 0:
        return body, draw(st.text(max_size=80))
    at = int(time.time()) + draw(st.sampled_from([0, -10, -200, -400, -5000, 30]))
    secret = draw(st.sampled_from([*SECRETS, "whsec_someone_else"]))
    signed_text = body if draw(st.booleans()) else body + draw(st.text(min_size=1, max_size=3))
    good = trigger.sign(signed_text.encode(), secret, at)  # "t=…,v1=…"
    parts = good.split(",") + draw(st.lists(st.sampled_from(["v0=abc", "v1=deadbeef", "x=1", "t=12"]), max_size=2))
    return body, ",".join(draw(st.permutations(parts)))


@settings(max_examples=400)
@given(signature_headers())
def test_verify_accepts_exactly_what_construct_event_accepts(case: tuple[str, str]) -> None:
    """verify() uses stripe.WebhookSignature.verify_header, the check construct_event
    makes before building its objects: the two agree on every body and header."""
    body, header = case

    def construct_event_accepts() -> bool:
        for secret in SECRETS:
            try:
                stripe.Webhook.construct_event(body.encode(), header, secret, tolerance=300, api_key="unused")
            except stripe.SignatureVerificationError:
                continue
            except Exception:  # noqa: BLE001  # signature accepted; building the objects failed
                return True
            return True
        return False

    try:
        webhooks.verify(body.encode(), header, SECRETS, 300)
        accepted = True
    except ApiError as exc:
        assert exc.status == 400 and exc.code in ("missing_signature", "invalid_signature", "stale_signature")
        accepted = False
    assert accepted == construct_event_accepts()
