"""What the reconcile report calls a difference, on real Stripe objects (tests/fixtures):
the fields the test emulator cannot show (a charge's `disputed`; a Checkout Session whose
delayed payment failed; an open invoice) compared the way `paystream reconcile --report`
compares them.  The report itself runs end to end in tests/e2e/test_reconcile_report.py."""

from __future__ import annotations

from typing import Any

from paystream.payments.reconcile_report import compare, stripe_side
from tests.support import fixture_event


def payment_intent(**charge: Any) -> dict[str, Any]:
    """A succeeded PaymentIntent as `GET /v1/payment_intents/{id}?expand[]=latest_charge`
    answers: the real event bodies' PaymentIntent and charge, the charge changed by `charge`."""
    pi = fixture_event("payment_intent.succeeded__stripe-ruby-mock")["data"]["object"]
    pi["latest_charge"] = {**fixture_event("charge.succeeded__stripe-ruby-mock")["data"]["object"], **charge}
    return pi


def row(**fields: Any) -> dict[str, Any]:
    return {"id": "txn_01HZZZZZZZZZZZZZZZZZZZZZZZ", "stripe_id": "pi_000000000000000000000000", "kind": "payment",
            "status": "succeeded", "amount": 2000, "amount_refunded": 0, "dispute": None, **fields}


def found(ours: dict[str, Any], stripe: dict[str, Any]) -> set[tuple[str, Any, Any]]:
    return {(d.field, d.ours, d.stripe) for d in compare(ours, stripe_side(stripe))}


def test_a_payment_that_agrees_has_no_difference() -> None:
    assert found(row(), payment_intent()) == set()


def test_a_dispute_only_one_side_knows_is_a_difference() -> None:
    dispute = {"id": "du_1", "amount": 2000, "currency": "usd", "status": "needs_response"}
    assert found(row(status="disputed", dispute=dispute), payment_intent(disputed=True)) == set()
    assert found(row(), payment_intent(disputed=True)) == {("status", "succeeded", "disputed"),
                                                          ("dispute", False, True)}
    assert found(row(status="disputed", dispute=dispute), payment_intent()) == {
        ("status", "disputed", "succeeded"), ("dispute", True, False)}


def test_a_refund_only_stripe_knows_is_a_difference() -> None:
    assert found(row(), payment_intent(amount_refunded=500)) == {
        ("status", "succeeded", "partially_refunded"), ("amount_refunded", 0, 500)}
    assert found(row(status="partially_refunded", amount_refunded=500), payment_intent(amount_refunded=500)) == set()
    assert found(row(amount=2500), payment_intent()) == {("amount", 2500, 2000)}


def test_a_partial_capture_agrees_on_what_was_taken() -> None:
    """Stripe keeps the PaymentIntent's `amount` as authorised; ours is what was taken."""
    pi = payment_intent(amount_captured=1200)
    pi["amount_received"] = 1200
    assert found(row(amount=1200), pi) == set()
    assert found(row(), pi) == {("amount", 2000, 1200)}


def test_a_checkout_whose_delayed_payment_failed_agrees() -> None:
    session = fixture_event("checkout.session.completed__stripe-ruby-mock")["data"]["object"]
    session.update(status="complete", payment_status="unpaid")
    ours = row(kind="checkout", stripe_id=session["id"], status="canceled", amount=session.get("amount_total") or 0)
    assert found(ours, session) == set()
    assert found({**ours, "status": "succeeded"}, session) == {("status", "succeeded", "processing")}


def test_an_open_invoice_agrees_with_anything_before_success() -> None:
    invoice = fixture_event("invoice.paid__stripe-ruby-mock")["data"]["object"]
    invoice["status"] = "open"
    ours = row(kind="invoice", stripe_id=invoice["id"], status="requires_payment_method")
    assert found(ours, invoice) == set()
    assert found({**ours, "status": "succeeded"}, invoice) == {("status", "succeeded", "open")}
    invoice["status"] = "paid"
    assert found({**ours, "status": "succeeded"}, invoice) == set()
