"""Checkout Sessions, as Stripe's API reference documents them (localstripe has none):
create, retrieve, list and expire (POST /v1/checkout/sessions/{id}/expire), with the
session object's real shape (compare tests/fixtures/stripe/checkout.session.completed
__stripe-ruby-mock.json) and its webhooks signed and posted the way localstripe posts its
own events: checkout.session.completed, .expired, .async_payment_succeeded and
.async_payment_failed.

EMULATOR-ONLY, not Stripe's API: POST /v1/checkout/sessions/{id}/_complete stands in for
the customer on Stripe's hosted page (the tests call it; so does /demo/hosted, the page
`paystream dev` shows in its place).  With `card` (a 16-digit test card number) it creates
the session's PaymentIntent and pays it, as Checkout does: paid at once, or, for a
declining card, 402 with the session left open (payment_intent.payment_failed is
posted, as Stripe does).  With `iban` (a SEPA Debit test IBAN) the payment is delayed:
the session completes `unpaid`, and localstripe settles the debit moments later
(DE62370400440532013001 fails), which posts async_payment_succeeded or _failed.  In
setup mode the card is saved (a SetupIntent); in subscription mode the customer (made
if the session had none) gets the card as default and localstripe's subscription of
the price.

A session's `url` is Stripe's hosted page (https://checkout.stripe.com/c/pay/cs_…),
or under PAYSTREAM_EMULATOR_CHECKOUT_PAGE (a URL prefix) the stand-in page there.

Prices: a `price_…` is looked up as a Price if an extension adds them, else as a Plan of
that id (Stripe accepts a plan's id wherever a price's is expected).
"""

from __future__ import annotations

import os
import time
from types import ModuleType
from typing import Any

from localstripe.errors import UserError
from localstripe.resources import (
    Charge,
    Customer,
    Event,
    PaymentIntent,
    PaymentMethod,
    SetupIntent,
    StripeObject,
    Subscription,
    random_id,
    store,
    try_convert_to_int,
)
from localstripe.webhooks import schedule_webhook

EXPIRES_AFTER = 24 * 3600  # Stripe's default expires_at
MODES = ("payment", "subscription", "setup")
_HOSTED_PAGE = os.environ.get("PAYSTREAM_EMULATOR_CHECKOUT_PAGE") or "https://checkout.stripe.com/c/pay/"


def _missing(what: str, value: str, param: str) -> UserError:
    return UserError(400, f"No such {what}: '{value}'", {"code": "resource_missing", "param": param})


def _invalid(message: str, param: str | None = None) -> UserError:
    return UserError(400, message, {"param": param} if param else None)


def _price(price_id: Any, param: str) -> tuple[int, str, bool]:
    """(unit amount, currency, recurring) of a price (or a plan of that id)."""
    if not isinstance(price_id, str) or not price_id:
        raise _invalid("Invalid price", param)
    obj = store.get("price:" + price_id) or store.get("plan:" + price_id)
    if obj is None:
        raise _missing("price", price_id, param)
    if obj.object == "plan":
        return int(obj.amount or 0), obj.currency, True
    return int(getattr(obj, "unit_amount", 0) or 0), obj.currency, bool(getattr(obj, "recurring", None))


def _line(item: Any, k: int, mode: str) -> tuple[int, str, str | None]:
    """(amount, currency, price id) of one line item."""
    param = f"line_items[{k}]"
    if not isinstance(item, dict):
        raise _invalid("Invalid line item", param)
    quantity = try_convert_to_int(item.get("quantity", 1))
    if not isinstance(quantity, int) or quantity < 1:
        raise _invalid("Invalid integer: quantity", f"{param}[quantity]")
    if "price" in item:
        unit, currency, recurring = _price(item["price"], f"{param}[price]")
        if mode == "payment" and recurring:
            raise _invalid("You specified `payment` mode but passed a recurring price. Either switch to "
                           "`subscription` mode or use only one-time prices.", f"{param}[price]")
        if mode == "subscription" and not recurring:
            raise _invalid("You must provide at least one recurring price in `subscription` mode when using "
                           "prices.", f"{param}[price]")
        return unit * quantity, currency, item["price"]
    data = item.get("price_data")
    if not isinstance(data, dict):
        raise _invalid("You must specify either `price` or `price_data` in each line item.", param)
    unit = try_convert_to_int(data.get("unit_amount"))
    if not isinstance(unit, int) or unit < 0 or not isinstance(data.get("currency"), str):
        raise _invalid("Invalid price_data", f"{param}[price_data]")
    if mode != "payment":
        raise _invalid("price_data without recurring is only for `payment` mode", f"{param}[price_data]")
    return unit * quantity, data["currency"].lower(), None


class CheckoutSession(StripeObject):
    object = "checkout.session"
    _id_prefix = "cs_test_"

    def __init__(self, mode=None, success_url=None, cancel_url=None, line_items=None, customer=None,
                 customer_email=None, metadata=None, currency=None, client_reference_id=None,
                 payment_method_types=None, payment_intent_data=None, expires_at=None, **kwargs):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        if mode not in MODES:
            raise _invalid("Invalid mode: must be one of payment, setup, or subscription", "mode")
        if not isinstance(success_url, str) or not success_url.startswith(("http://", "https://")):
            raise _invalid("Not a valid URL", "success_url")
        if cancel_url is not None and not (isinstance(cancel_url, str)
                                           and cancel_url.startswith(("http://", "https://"))):
            raise _invalid("Not a valid URL", "cancel_url")
        if customer is not None:
            if not isinstance(customer, str) or store.get("customer:" + customer) is None:
                raise _missing("customer", str(customer), "customer")
        if metadata is not None and not isinstance(metadata, dict):
            raise _invalid("Invalid object", "metadata")
        lines = [_line(item, k, mode) for k, item in enumerate(line_items or [])]
        if mode != "setup" and not lines:
            raise _invalid("`line_items` is required in `payment` and `subscription` mode.", "line_items")
        if mode == "setup" and lines:
            raise _invalid("You cannot pass `line_items` in `setup` mode.", "line_items")
        currencies = {c for _, c, _ in lines} | ({currency.lower()} if isinstance(currency, str) else set())
        if len(currencies) > 1:
            raise _invalid("All line items must use the same currency.", "line_items")

        # All exceptions must be raised before this point.
        super().__init__(id=self._id_prefix + random_id(58))
        total = sum(amount for amount, _, _ in lines)
        self.after_expiration = None
        self.allow_promotion_codes = None
        self.amount_subtotal = total if mode != "setup" else None
        self.amount_total = total if mode != "setup" else None
        self.automatic_tax = {"enabled": False, "status": None}
        self.billing_address_collection = None
        self.cancel_url = cancel_url
        self.client_reference_id = client_reference_id
        self.consent = None
        self.consent_collection = None
        self.currency = currencies.pop() if currencies else None
        self.customer = customer
        self.customer_creation = None if customer else "if_required"
        self.customer_details = None
        self.customer_email = customer_email
        self.expires_at = try_convert_to_int(expires_at) or self.created + EXPIRES_AFTER
        self.locale = None
        self.metadata = metadata or {}
        self.mode = mode
        self.payment_intent = None
        self.payment_link = None
        self.payment_method_options = {}
        self.payment_method_types = payment_method_types or ["card"]
        self.payment_status = "no_payment_required" if mode == "setup" or total == 0 else "unpaid"
        self.phone_number_collection = {"enabled": False}
        self.recovered_from = None
        self.setup_intent = None
        self.shipping = None
        self.shipping_address_collection = None
        self.shipping_options = []
        self.shipping_rate = None
        self.status = "open"
        self.submit_type = None
        self.subscription = None
        self.success_url = success_url
        self.total_details = {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0}
        self.url = _HOSTED_PAGE + self.id
        self._prices = [price for _, _, price in lines]
        self._pi_metadata = (payment_intent_data or {}).get("metadata") or {}

    @classmethod
    def _api_update(cls, id, **data):
        raise UserError(405, "Method Not Allowed")

    @classmethod
    def _api_delete(cls, id):
        raise UserError(405, "Method Not Allowed")

    @classmethod
    def _api_list_all(cls, url, payment_intent=None, customer=None, subscription=None, limit=None,
                      starting_after=None, **kwargs):
        li = super()._api_list_all(url, limit=limit, starting_after=starting_after, **kwargs)
        for name, value in (("payment_intent", payment_intent), ("customer", customer),
                            ("subscription", subscription)):
            if value is not None:
                li._list = [s for s in li._list if getattr(s, name) == value]
        return li

    @classmethod
    def _api_expire(cls, id, **kwargs):
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        session = cls._api_retrieve(id)
        if session.status != "open":
            raise _invalid('Only Checkout Sessions with a status in ["open"] can be expired.')
        session.status = "expired"
        session.url = None
        _save(session)
        schedule_webhook(Event("checkout.session.expired", session))
        return session

    @classmethod
    def _api_complete(cls, id, card=None, iban=None, **kwargs):
        """EMULATOR-ONLY: the customer pays (or saves a card) on the hosted page."""
        if kwargs:
            raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
        session = cls._api_retrieve(id)
        if session.status != "open" or session.expires_at <= time.time():
            raise _invalid("This Checkout Session is no longer open.")
        if (card is None) == (iban is None):
            raise _invalid("give `card` (a test card number) or `iban` (a SEPA test IBAN)")
        if iban is not None and session.mode != "payment":
            raise _invalid("the emulated hosted page takes a delayed method in payment mode only")
        if card is not None:
            pm = PaymentMethod(type="card", card={"number": card, "exp_month": 12, "exp_year": 2030,
                                                  "cvc": "123"})
        else:
            pm = PaymentMethod(type="sepa_debit", sepa_debit={"iban": iban},
                               billing_details={"name": "Test Customer", "email": "buyer@example.com"})
        if session.mode == "payment":
            session._pay(pm)
        elif session.mode == "setup":
            seti = SetupIntent(customer=session.customer, metadata={})
            seti.payment_method, seti.status = pm.id, "succeeded"
            session.setup_intent = seti.id
            session._finish("no_payment_required")
        else:
            session._subscribe(pm)
        return session

    def _pay(self, pm: PaymentMethod) -> None:
        if not self.amount_total:  # nothing due: Stripe makes no PaymentIntent
            self._finish("no_payment_required")
            return
        if pm._requires_authentication():
            raise _invalid("the emulated hosted page does not run 3-D Secure: use another test card")
        pi = PaymentIntent(amount=self.amount_total, currency=self.currency, customer=self.customer,
                           payment_method=pm.id, metadata=dict(self._pi_metadata))
        charge = Charge(amount=pi.amount, currency=pi.currency, customer=pi.customer, source=pm.id)
        charge.payment_intent = pi.id
        pi.latest_charge = charge
        delayed = pm.type == "sepa_debit"
        declined: list[bool] = []

        def paid() -> None:
            pi._on_success()
            if delayed:
                self.payment_status = "paid"
                _save(self)
                schedule_webhook(Event("checkout.session.async_payment_succeeded", self))

        def failed_later() -> None:
            pi._report_async_failure()
            schedule_webhook(Event("checkout.session.async_payment_failed", self))

        charge._initialize_charge(paid, lambda: declined.append(True), failed_later)
        if declined:  # Checkout shows the decline and the session stays open
            schedule_webhook(Event("payment_intent.payment_failed", pi))
            raise UserError(402, charge.failure_message, {"code": charge.failure_code, "type": "card_error"})
        self.payment_intent = pi.id
        self._finish("unpaid" if delayed else "paid")

    def _subscribe(self, pm: PaymentMethod) -> None:
        if self.customer is None:
            self.customer = Customer(email="buyer@example.com").id
        PaymentMethod._api_attach(pm.id, customer=self.customer)
        Customer._api_update(self.customer, invoice_settings={"default_payment_method": pm.id})
        # localstripe takes a plan where Stripe takes a price, and charges the card at once.
        sub = Subscription._api_create(customer=self.customer, items=[{"plan": price} for price in self._prices])
        self.subscription = sub.id
        self._finish("paid" if self.amount_total else "no_payment_required")

    def _finish(self, payment_status: str) -> None:
        self.status = "complete"
        self.payment_status = payment_status
        self.url = None
        self.customer_details = {"email": "buyer@example.com", "phone": None, "tax_exempt": "none",
                                 "tax_ids": []}
        _save(self)
        schedule_webhook(Event("checkout.session.completed", self))


def _save(obj: StripeObject) -> None:
    """localstripe's store writes itself to disk on assignment, not on attribute changes."""
    store[obj.object + ":" + obj.id] = obj


def install(server: ModuleType) -> None:
    base = "/v1/checkout/sessions"
    router = server.app.router
    # The sub-paths first, as localstripe adds its own extra routes before /{id}.
    router.add_route("POST", base + "/{id}/expire", server.api_extra(CheckoutSession._api_expire, base))
    router.add_route("POST", base + "/{id}/_complete", server.api_extra(CheckoutSession._api_complete, base))
    router.add_route("POST", base, server.api_create(CheckoutSession, base))
    router.add_route("GET", base + "/{id}", server.api_retrieve(CheckoutSession, base))
    router.add_route("GET", base, server.api_list_all(CheckoutSession, base))


__all__ = ["CheckoutSession", "install"]
