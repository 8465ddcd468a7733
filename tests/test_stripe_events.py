"""Reading real Stripe event bodies (tests/fixtures/stripe, see SOURCES.md there)."""

from __future__ import annotations

import pytest

from paystream.ingest.stripe_events import (
    MalformedEvent,
    UnusableEvent,
    check_envelope,
    interpret,
    is_supported,
)
from tests.support import fixture_event


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("payment_intent.created__stripe-ruby-mock", "requires_payment_method"),
        ("payment_intent.requires_action__stripe-ruby-mock", "requires_action"),
        ("payment_intent.processing__stripe-ruby-mock", "processing"),
        ("payment_intent.amount_capturable_updated__stripe-ruby-mock", "requires_capture"),
        ("payment_intent.succeeded__stripe-ruby-mock", "succeeded"),
        ("payment_intent.canceled__stripe-ruby-mock", "canceled"),
        ("payment_intent.payment_failed__stripe-ruby-mock", "requires_payment_method"),
    ],
)
def test_payment_intent_events(name: str, status: str) -> None:
    event = fixture_event(name)
    check_envelope(event)
    meaning = interpret(event)
    obj = event["data"]["object"]
    if obj.get("invoice"):  # an invoice's PaymentIntent speaks for the invoice
        assert (meaning.stripe_id, meaning.links, meaning.kind) == (obj["invoice"], (obj["id"],), "invoice")
    else:
        assert meaning.stripe_id == obj["id"]
    assert meaning.change is not None and meaning.change.status == status
    assert meaning.amount == event["data"]["object"]["amount"]
    assert meaning.change.declined == name.startswith("payment_intent.payment_failed")


def test_a_decline_carries_stripes_error() -> None:
    meaning = interpret(fixture_event("payment_intent.payment_failed__stripe-ruby-mock"))
    assert meaning.change is not None and meaning.change.last_error is not None
    assert meaning.change.last_error["code"] == "card_declined"


def test_charges_route_to_their_payment_intent() -> None:
    event = fixture_event("charge.succeeded__zulip")
    meaning = interpret(event)
    assert meaning.stripe_id == event["data"]["object"]["payment_intent"]
    assert meaning.change is not None and meaning.change.status == "succeeded"


def test_full_refund_and_partial_refund() -> None:
    full = fixture_event("charge.refunded__stripe-ruby-mock")
    assert interpret(full).change.status == "refunded"  # type: ignore[union-attr]
    partial = fixture_event("charge.refunded__stripe-ruby-mock")
    partial["data"]["object"].update(amount_refunded=40, refunded=False)
    assert interpret(partial).change.status == "partially_refunded"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["payment_intent.succeeded__stripe-ruby-mock", "charge.captured__stripe-ruby-mock",
                                  "charge.succeeded__zulip", "charge.refunded__stripe-ruby-mock"])
def test_what_a_capture_took_is_read_from_the_event(name: str) -> None:
    """A PaymentIntent's amount_received, a charge's amount_captured: what the transaction
    took, less than its amount after a partial capture (transitions.apply)."""
    event = fixture_event(name)
    obj = event["data"]["object"]
    taken = obj.get("amount_received", obj.get("amount_captured"))
    assert isinstance(taken, int) and taken > 0
    assert interpret(event).change.amount_captured == taken  # type: ignore[union-attr]
    field = "amount_received" if "amount_received" in obj else "amount_captured"
    obj[field] = taken // 3
    if "amount_refunded" in obj:
        obj["amount_refunded"] = min(obj["amount_refunded"], taken // 3)
    assert interpret(event).change.amount_captured == taken // 3  # type: ignore[union-attr]


def test_a_multicapture_charge_that_may_take_more_says_nothing_of_what_was_taken() -> None:
    event = fixture_event("charge.captured__stripe-ruby-mock")
    obj = event["data"]["object"]
    obj["payment_method_details"] = {"type": "card", "card": {"multicapture": {"status": "available"}}}
    assert interpret(event).change.amount_captured is None  # type: ignore[union-attr]
    obj["payment_method_details"]["card"]["multicapture"]["status"] = "unavailable"  # the final capture
    assert interpret(event).change.amount_captured == obj["amount_captured"]  # type: ignore[union-attr]


def test_a_refund_of_more_than_was_captured_makes_the_event_unusable() -> None:
    event = fixture_event("charge.refunded__stripe-ruby-mock")
    event["data"]["object"].update(amount=1500, amount_captured=600, amount_refunded=1000, refunded=False)
    with pytest.raises(UnusableEvent):
        interpret(event)


def test_an_authorisation_says_nothing_of_what_was_taken() -> None:
    event = fixture_event("payment_intent.amount_capturable_updated__stripe-ruby-mock")
    assert interpret(event).change.amount_captured is None  # type: ignore[union-attr]


def test_releasing_an_uncaptured_authorisation_is_not_a_refund() -> None:
    event = fixture_event("charge.refunded__stripe-ruby-mock")
    event["data"]["object"].update(captured=False)
    assert interpret(event).change is None


def test_dispute_names_the_payment_intent() -> None:
    event = fixture_event("charge.dispute.created__zulip")
    meaning = interpret(event)
    assert meaning.stripe_id == event["data"]["object"]["payment_intent"]
    assert meaning.change is not None and meaning.change.status == "disputed"


def test_charge_failed_moves_nothing_payment_failed_reports_it() -> None:
    assert interpret(fixture_event("charge.failed__zulip")).change is None


@pytest.mark.parametrize(
    "body",
    [[], {"id": "x"}, {"id": "evt_1", "type": "t", "created": 1},
     {"id": "evt_1", "type": "payment_intent.succeeded", "created": "yesterday", "data": {"object": {"id": "pi"}}},
     {"id": "evt_1", "type": "payment_intent.succeeded", "created": 1, "data": {"object": {}}}],
)
def test_envelopes_that_are_not_stripe_events(body: object) -> None:
    with pytest.raises(MalformedEvent):
        check_envelope(body)


def test_supported_families() -> None:
    assert is_supported("payment_intent.succeeded")
    assert is_supported("charge.dispute.created")
    assert not is_supported("customer.created")
    assert is_supported("checkout.session.completed")
    assert not is_supported("product.created")


def test_a_checkout_session_completed_is_its_own_transaction_following_its_payment() -> None:
    event = fixture_event("checkout.session.completed__stripe-ruby-mock")
    meaning = interpret(event)
    session = event["data"]["object"]
    assert (meaning.stripe_id, meaning.kind, meaning.amount, meaning.currency) == (
        session["id"], "checkout", 3000, "usd")
    assert meaning.change is not None and meaning.change.status == "succeeded"
    assert meaning.follows == (session["payment_intent"],) and meaning.links == ()
    session["payment_status"] = "unpaid"  # a delayed payment method
    assert interpret(event).change.status == "processing"
    failed = interpret({**event, "type": "checkout.session.async_payment_failed"}).change
    assert failed.status == "canceled" and failed.last_error["code"] == "async_payment_failed"
    assert interpret({**event, "type": "checkout.session.expired"}).change.status == "canceled"


def test_invoice_events_and_their_payment_intents() -> None:
    paid = fixture_event("invoice.paid__stripe-ruby-mock")
    meaning = interpret(paid)
    invoice = paid["data"]["object"]
    assert (meaning.stripe_id, meaning.kind, meaning.change.status) == (invoice["id"], "invoice", "succeeded")
    assert meaning.links == (invoice["payment_intent"],)
    # API 2025-03-31+: no invoice.payment_intent; the payments list names them
    invoice.pop("payment_intent")
    invoice["payments"] = {"data": [{"payment": {"type": "payment_intent", "payment_intent": "pi_new"}}]}
    assert interpret(paid).links == ("pi_new",)
    failed = interpret(fixture_event("invoice.payment_failed__stripe-ruby-mock"))
    assert failed.change.status == "requires_payment_method" and failed.change.declined


def test_refund_failures_keep_the_status_and_show_the_error() -> None:
    meaning = interpret(fixture_event("charge.refund.updated__zulip"))
    assert meaning.change is not None and meaning.change.refund_error["failure_reason"] == "expired_or_canceled_card"
    assert interpret(fixture_event("refund.updated__supabase-sync-engine")).change is None


def test_setup_intents_are_card_validations() -> None:
    meaning = interpret(fixture_event("setup_intent.succeeded__stripe-ruby-mock"))
    assert (meaning.kind, meaning.change.status) == ("card_validation", "succeeded")


# --- bodies that cannot be Stripe events, and authentic events paystream cannot use ------


def _pi_event(**obj: object) -> dict:
    event = fixture_event("payment_intent.succeeded__stripe-ruby-mock")
    event["data"]["object"].update(obj)
    return event


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": "evt_" + "a" * 500_000}, "`id`"),
        ({"id": "evt_with space"}, "`id`"),
        ({"type": "payment_intent.succeeded\x00"}, "`type`"),
        ({"created": 2**40 - 1}, "`created`"),
        ({"created": -1}, "`created`"),
        ({"api_version": "2020\x00"}, "`api_version`"),
    ],
)
def test_an_envelope_outside_stripes_bounds_is_malformed(change: dict, field: str) -> None:
    event = fixture_event("payment_intent.succeeded__stripe-ruby-mock")
    event.update(change)
    with pytest.raises(MalformedEvent, match=field):
        check_envelope(event)


@pytest.mark.parametrize("object_id", ["pi_\ud800", "pi_\x00", "x" * 256, ""])
def test_an_object_id_postgres_cannot_store_is_malformed(object_id: str) -> None:
    with pytest.raises(MalformedEvent, match="data.object.id"):
        check_envelope(_pi_event(id=object_id))


@pytest.mark.parametrize("amount", [-1, 2**63, float("nan"), float("inf"), 1.5, "100", True])
def test_an_amount_stripe_never_sends_makes_the_event_unusable(amount: object) -> None:
    event = _pi_event(amount=amount)
    check_envelope(event)  # the envelope is fine: it is kept, not refused
    with pytest.raises(UnusableEvent, match="amount"):
        interpret(event)


@pytest.mark.parametrize("metadata", [{"k": "a\x00b"}, {"k\x00": "v"}, {"k": "\udc80"}, {"k": {"deep": ["\x00"]}}])
def test_metadata_postgres_cannot_store_makes_the_event_unusable(metadata: dict) -> None:
    with pytest.raises(UnusableEvent, match="metadata"):
        interpret(_pi_event(metadata=metadata))


def test_a_dispute_event_carries_its_dispute() -> None:
    event = fixture_event("charge.dispute.created__stripe-ruby-mock")
    meaning = interpret(event)
    obj = event["data"]["object"]
    assert meaning.change is not None and meaning.change.status == "disputed"
    assert meaning.change.dispute == {"id": obj["id"], "amount": obj["amount"], "currency": obj["currency"],
                                      "status": obj["status"]}
    assert not meaning.target_amount  # a dispute's amount is not the PaymentIntent's


def test_only_the_object_itself_vouches_for_its_amount() -> None:
    assert interpret(fixture_event("payment_intent.succeeded__stripe-ruby-mock")).target_amount
    assert not interpret(fixture_event("charge.succeeded__stripe-ruby-mock")).target_amount
