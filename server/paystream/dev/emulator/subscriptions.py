"""Subscriptions as Stripe runs them, where localstripe differs (its own subscriptions,
plans and invoices are used for everything else):

* Prices (/v1/prices: create, retrieve, list), which localstripe lacks: a recurring
  price is also a localstripe plan of the same id, and `items[].price` on a
  subscription is taken as that plan.
* `payment_behavior=default_incomplete`: the subscription starts `incomplete` with an
  open first invoice whose PaymentIntent has no payment method yet (whether or not the
  customer has a default card); the page confirms it (3-D Secure included), and paying
  it makes the subscription `active` and posts customer.subscription.updated, as Stripe
  does.  Without it, localstripe's own path: the default card is charged at once.
* An invoice's `confirmation_secret` and `payments` (API 2025-03-31 on), so the package
  can expand them as Stripe documents.
* A failed renewal (POST /v1/invoices/{id}/pay with a declining default card,
  how the tests drive a renewal) answers 402 and posts payment_intent.payment_failed and
  invoice.payment_failed and makes the subscription past_due, as Stripe does (localstripe
  posts nothing and leaves it active).  Like localstripe, and unlike Stripe, it posts no
  customer.subscription.updated for that, nor for a paid retry: paystream reads the
  subscription when its invoice moves.
* An update (cancel_at_period_end) posts customer.subscription.updated.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from localstripe.errors import UserError
from localstripe.resources import (
    Customer,
    Event,
    Invoice,
    PaymentIntent,
    Plan,
    StripeObject,
    Subscription,
    try_convert_to_int,
)
from localstripe.webhooks import schedule_webhook

_BEHAVIORS = ("allow_incomplete", "error_if_incomplete", "default_incomplete")


class Price(StripeObject):
    object = "price"
    _id_prefix = "price_"

    def __init__(self, currency=None, unit_amount=None, recurring=None, product=None, product_data=None,
                 nickname=None, metadata=None, active=True, **kwargs):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        unit_amount = try_convert_to_int(unit_amount)
        if not isinstance(currency, str) or not isinstance(unit_amount, int) or unit_amount < 0:
            raise UserError(400, "Missing required param: currency and unit_amount")
        if recurring is not None and (not isinstance(recurring, dict)
                                      or recurring.get("interval") not in ("day", "week", "month", "year")):
            raise UserError(400, "Invalid recurring[interval]", {"param": "recurring[interval]"})
        super().__init__()
        self.currency = currency.lower()
        self.unit_amount = unit_amount
        self.nickname = nickname
        self.metadata = metadata or {}
        self.active = True
        self.type = "recurring" if recurring else "one_time"
        self.recurring = None
        if recurring:
            count = try_convert_to_int(recurring.get("interval_count", 1))
            self.recurring = {"interval": recurring["interval"], "interval_count": count,
                              "usage_type": "licensed"}
            plan = Plan(id=self.id, amount=unit_amount, currency=self.currency, interval=recurring["interval"],
                        interval_count=count, product=product or dict(product_data or {"name": self.id}))
            self.product = plan.product
        else:
            self.product = product


def _plan_items(items: Any) -> Any:
    if not isinstance(items, list):
        return items
    bridged = []
    for item in items:
        if isinstance(item, dict) and "price" in item and "plan" not in item:
            item = {**{k: v for k, v in item.items() if k != "price"}, "plan": item["price"]}
        bridged.append(item)
    return bridged


def _incomplete(customer: str, items: Any, **data: Any) -> Subscription:
    """Stripe's default_incomplete: an incomplete subscription and its open first invoice
    with a PaymentIntent waiting for the page.  (localstripe's constructor pays at once
    unless there is a trial: one of a day is asked for, then taken away.)"""
    sub = _original_create(customer=customer, items=items, trial_period_days=1, **data)
    sub.trial_period_days = None
    sub.trial_end = None
    invoice = Invoice(customer=customer, subscription=sub.id, items=list(sub.items._list),
                      date=sub.current_period_start)
    invoice._finalize()
    if invoice.total > 0:
        pi = PaymentIntent(amount=invoice.total, currency=invoice.currency, customer=customer)
        invoice.payment_intent = pi.id
        pi.invoice = invoice.id
    else:
        invoice._on_payment_success()
    return sub


def _create(cls: type, customer: Any = None, items: Any = None, payment_behavior: Any = None,
            payment_settings: Any = None, **data: Any) -> Subscription:
    if payment_behavior is not None and payment_behavior not in _BEHAVIORS:
        raise UserError(400, "Invalid payment_behavior", {"param": "payment_behavior"})
    items = _plan_items(items)
    if payment_behavior == "default_incomplete" and not (data.get("trial_period_days") or data.get("trial_end")):
        sub = _incomplete(customer, items, **data)
    else:
        sub = _original_create(customer=customer, items=items,
                               payment_behavior=payment_behavior or "allow_incomplete", **data)
    return sub


def _on_initial_payment_success(self: Subscription, invoice: Invoice) -> None:
    was = self.status
    _original_success(self, invoice)
    # Stripe posts the first payment's activation (localstripe's constructor paid before
    # it posted .created, which already says active: nothing to add there).
    if was == "incomplete" and self.status == "active" and _announced(self):
        schedule_webhook(Event("customer.subscription.updated", self))


def _announced(sub: Subscription) -> bool:
    return getattr(sub, "_created_event_sent", False)


def _confirm(self: PaymentIntent, on_failure_now: Any) -> None:
    """localstripe's invoice pay confirms with a callback that reports nothing when the
    charge fails; Stripe reports a failed renewal (the subscription past_due) and answers
    the pay call 402.  (A first invoice keeps localstripe's handling.)"""
    renewal = False
    if self.invoice and getattr(on_failure_now, "__name__", "") == "<lambda>":
        invoice = Invoice._api_retrieve(self.invoice)
        renewal = not invoice.subscription or Subscription._api_retrieve(invoice.subscription).status != "incomplete"
    _original_confirm(self, on_failure_now)
    if renewal and self.latest_charge is not None and self.latest_charge.status == "failed":
        self._report_async_failure()  # payment_intent.payment_failed, invoice.payment_failed, past_due
        raise UserError(402, self.latest_charge.failure_message, {"code": self.latest_charge.failure_code})


def _api_update(cls: type, id: str, **data: Any) -> Subscription:
    sub = _original_update(id, **data)
    schedule_webhook(Event("customer.subscription.updated", sub))
    return sub


def _confirmation_secret(self: Invoice) -> dict[str, Any] | None:
    if not self.payment_intent:
        return None
    return {"type": "payment_intent", "client_secret": PaymentIntent._api_retrieve(self.payment_intent).client_secret}


def _payments(self: Invoice) -> dict[str, Any]:
    data = []
    if self.payment_intent:
        pi = PaymentIntent._api_retrieve(self.payment_intent)
        data.append({"object": "invoice_payment", "invoice": self.id, "is_default": True,
                     "status": "paid" if pi.status == "succeeded" else "open",
                     "payment": {"type": "payment_intent", "payment_intent": pi.id}})
    return {"object": "list", "data": data, "has_more": False, "url": f"/v1/invoice_payments?invoice={self.id}"}


_original_create = Subscription._api_create
_original_success = Subscription._on_initial_payment_success
_original_confirm = PaymentIntent._confirm
_original_update = Subscription._api_update


def _created_then_mark(cls: type, **data: Any) -> Subscription:
    sub = _create(cls, **data)
    sub._created_event_sent = True
    return sub


def install(server: ModuleType) -> None:
    Subscription._api_create = classmethod(_created_then_mark)
    Subscription._on_initial_payment_success = _on_initial_payment_success
    Subscription._api_update = classmethod(_api_update)
    PaymentIntent._confirm = _confirm
    Invoice.confirmation_secret = property(_confirmation_secret)
    Invoice.payments = property(_payments)
    assert Customer  # localstripe's customers keep the default card (invoice_settings)
    router, base = server.app.router, "/v1/prices"
    router.add_route("POST", base, server.api_create(Price, base))
    router.add_route("GET", base + "/{id}", server.api_retrieve(Price, base))
    router.add_route("GET", base, server.api_list_all(Price, base))
