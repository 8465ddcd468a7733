"""One-off invoices and their coupons as Stripe's API reference describes them, where
localstripe only invoices subscriptions:

* POST /v1/invoices without `subscription` makes a draft invoice for the customer in
  `currency` (default usd), with `metadata`, `description` and `discounts[].coupon`.
  `pending_invoice_items_behavior` is `exclude` unless `include` is asked for (Stripe's
  default since API 2022-08-01): an excluded invoice takes only the items created with
  `invoice=<its id>`.  An unknown coupon is 400 resource_missing (param
  `discounts[0][coupon]`), an expired or used-up one 400 coupon_expired, an amount_off
  coupon in another currency 400.  invoice.created is posted once the invoice is whole.
  (With `subscription`, localstripe's own invoice, as before.)
* POST /v1/invoiceitems with `invoice` adds a line to that draft invoice (a finalised
  one refuses it, as does another currency).
* The discount: `discounts` (di_ ids; `expand[]=discounts` gives the discount objects
  with their coupon), `total_discount_amounts`, and
  `total`/`amount_due` less it (percent_off of the subtotal rounded to the nearest unit,
  amount_off; never below zero); each coupon's `times_redeemed` counts the invoice.
* POST /v1/invoices/{id}/finalize (`auto_advance`, `expand`): open, with a PaymentIntent
  for the amount due that the page pays through the invoice's `confirmation_secret`
  (subscriptions' extension reads it, and `payments`); nothing due is paid at once.
  invoice.finalized is posted.
* Paying a one-off invoice posts invoice.paid beside localstripe's
  invoice.payment_succeeded, as Stripe does.  (localstripe's subscription invoices keep
  its own events.)
* Coupons as Stripe takes them: `id` optional (one is made), `name`, `max_redemptions`.
"""

from __future__ import annotations

import random
import string
from types import ModuleType
from typing import Any

from localstripe.errors import UserError
from localstripe.resources import (
    Coupon,
    Customer,
    Event,
    Invoice,
    InvoiceItem,
    InvoiceLineItem,
    PaymentIntent,
    StripeObject,
    try_convert_to_int,
)
from localstripe.webhooks import schedule_webhook


class Discount(StripeObject):
    """A coupon applied to an invoice (Stripe's discount object, `di_`)."""

    object = "discount"
    _id_prefix = "di_"

    def __init__(self, coupon: Coupon, invoice: str, customer: str) -> None:
        super().__init__()
        self.coupon = coupon
        self.invoice = invoice
        self.customer = customer
        self.invoice_item = None
        self.subscription = None
        self.promotion_code = None
        self.start = self.created
        self.end = None


def _coupons(discounts: Any, currency: str) -> list[Coupon]:
    """The coupons `discounts` names, each checked as Stripe does, before anything is made."""
    if discounts in (None, "", []):
        return []
    if not isinstance(discounts, list) or not all(isinstance(d, dict) for d in discounts):
        raise UserError(400, "Invalid array", {"param": "discounts"})
    found = []
    for k, item in enumerate(discounts):
        param = f"discounts[{k}][coupon]"
        if set(item) != {"coupon"} or not isinstance(item["coupon"], str) or not item["coupon"]:
            raise UserError(400, "Only coupons may be applied here", {"param": f"discounts[{k}]"})
        coupon = _stored_coupon(item["coupon"])
        if coupon is None:
            raise UserError(400, f"No such coupon: '{item['coupon']}'",
                            {"code": "resource_missing", "param": param})
        if not coupon.valid or (coupon.max_redemptions is not None
                                and coupon.times_redeemed >= coupon.max_redemptions):
            raise UserError(400, f"Coupon expired: {coupon.id}", {"code": "coupon_expired", "param": param})
        if coupon.amount_off is not None and (coupon.currency or "").lower() != currency:
            raise UserError(400, f"The coupon {coupon.id} is in {coupon.currency}, the invoice in {currency}",
                            {"param": param})
        found.append(coupon)
    return found


def _stored_coupon(coupon_id: str) -> Coupon | None:
    try:
        return Coupon._api_retrieve(coupon_id)
    except UserError:
        return None


def _discount_amounts(self: Invoice) -> list[dict[str, Any]]:
    """Each discount's amount, applied in order to what the ones before it left."""
    left, out = self.subtotal, []
    for discount in getattr(self, "_discounts", []):
        coupon = discount.coupon
        if coupon.percent_off is not None:
            amount = int(round(self.subtotal * coupon.percent_off / 100))
        else:
            amount = coupon.amount_off
        amount = max(0, min(amount, left))
        left -= amount
        out.append({"amount": amount, "discount": discount.id})
    return out


def _total(self: Invoice) -> int:
    discount = sum(d["amount"] for d in _discount_amounts(self))
    return max(0, self.subtotal - discount + self.tax - self.starting_balance)


def _create(cls: type, customer: Any = None, subscription: Any = None, discounts: Any = None,
            currency: Any = None, pending_invoice_items_behavior: Any = None, collection_method: Any = None,
            auto_advance: Any = None, description: Any = None, metadata: Any = None, **data: Any) -> Invoice:
    if subscription is not None:
        if discounts is not None or currency is not None or collection_method is not None:
            raise UserError(400, "Unexpected discounts, currency or collection_method on a subscription's invoice")
        return _original_create(customer=customer, subscription=subscription, description=description,
                                metadata=metadata, pending_invoice_items_behavior=pending_invoice_items_behavior,
                                **data)
    if data:
        raise UserError(400, "Unexpected " + ", ".join(data))
    if not isinstance(customer, str) or not customer.startswith("cus_"):
        raise UserError(400, "Missing required param: customer", {"param": "customer"})
    if pending_invoice_items_behavior not in (None, "include", "exclude"):
        raise UserError(400, "Invalid pending_invoice_items_behavior", {"param": "pending_invoice_items_behavior"})
    if collection_method not in (None, "charge_automatically", "send_invoice"):
        raise UserError(400, "Invalid collection_method", {"param": "collection_method"})
    if currency is not None and not (isinstance(currency, str) and len(currency) == 3):
        raise UserError(400, "Invalid currency", {"param": "currency"})
    Customer._api_retrieve(customer)  # 404 for an unknown customer
    currency = (currency or "usd").lower()
    coupons = _coupons(discounts, currency)
    if metadata is not None and not isinstance(metadata, dict):
        raise UserError(400, "Invalid metadata", {"param": "metadata"})
    # All refusals are made: from here the invoice exists.  `upcoming` keeps localstripe
    # from posting invoice.created for an invoice not yet whole (its currency, discounts).
    invoice = Invoice(customer=customer, metadata=metadata, description=description, upcoming=True)
    if pending_invoice_items_behavior != "include":
        for line in invoice.lines._list:
            InvoiceItem._api_retrieve(line.invoice_item).invoice = None
        invoice.lines._list = []
    invoice.currency = currency
    invoice.collection_method = collection_method or "charge_automatically"
    invoice.auto_advance = auto_advance not in (False, "false")
    invoice._discounts = [Discount(c, invoice.id, customer) for c in coupons]
    invoice.discounts = [d.id for d in invoice._discounts]
    for coupon in coupons:
        coupon.times_redeemed += 1
    schedule_webhook(Event("invoice.created", invoice))
    return invoice


def _finalize(id: Any = None, auto_advance: Any = None, **data: Any) -> Invoice:
    if data:
        raise UserError(400, "Unexpected " + ", ".join(data))
    invoice = Invoice._api_retrieve(id)
    if invoice.status != "draft":
        raise UserError(400, f"This invoice is already {invoice.status}", {"code": "invoice_not_editable"})
    if auto_advance is not None:
        invoice.auto_advance = auto_advance not in (False, "false")
    invoice._finalize()
    schedule_webhook(Event("invoice.finalized", invoice))
    if invoice.total > 0:
        pi = PaymentIntent(amount=invoice.total, currency=invoice.currency, customer=invoice.customer)
        pi.invoice = invoice.id
        invoice.payment_intent = pi.id
    else:  # nothing due: Stripe marks it paid as it finalises it
        invoice._on_payment_success()
    return invoice


def _item_init(self: InvoiceItem, invoice: Any = None, **data: Any) -> None:
    target = None
    if invoice is not None:
        if not isinstance(invoice, str) or not invoice.startswith("in_"):
            raise UserError(400, "Invalid invoice", {"param": "invoice"})
        target = Invoice._api_retrieve(invoice)
        if target.status != "draft":
            raise UserError(400, f"The invoice {invoice} is {target.status}: only a draft takes items",
                            {"code": "invoice_not_editable", "param": "invoice"})
        currency = data.get("currency")
        if hasattr(target, "_discounts") and isinstance(currency, str) and currency.lower() != target.currency:
            raise UserError(400, f"The item's currency {currency} is not the invoice's {target.currency}",
                            {"param": "currency"})
    _original_item_init(self, invoice=invoice, **data)
    if target is not None:
        target.lines._list.append(InvoiceLineItem(self))


def _on_payment_success(self: Invoice) -> None:
    _original_success(self)
    if not self.subscription:
        schedule_webhook(Event("invoice.paid", self))


def _coupon_init(self: Coupon, id: Any = None, name: Any = None, max_redemptions: Any = None,
                 **data: Any) -> None:
    max_redemptions = try_convert_to_int(max_redemptions)
    if max_redemptions is not None and not (isinstance(max_redemptions, int) and max_redemptions > 0):
        raise UserError(400, "Invalid max_redemptions", {"param": "max_redemptions"})
    if id is None:
        id = "".join(random.choice(string.ascii_letters + string.digits) for _ in range(8))
    data.setdefault("duration", "once")  # Stripe's default
    _original_coupon_init(self, id=id, **data)
    self.name = name
    self.max_redemptions = max_redemptions


def _export(self: Invoice, expand: Any = None) -> dict[str, Any]:
    """`expand[]=discounts` expands the di_ ids into discount objects, as Stripe does
    (localstripe expands only a field holding one id, not a list of them)."""
    listed = isinstance(expand, list) and "discounts" in expand
    out = _original_export(self, expand=[e for e in expand if e != "discounts"] if listed else expand)
    if listed and isinstance(out.get("discounts"), list):
        out["discounts"] = [Discount._api_retrieve(d)._export() for d in out["discounts"]]
    return out


_original_create = Invoice._api_create
_original_export = Invoice._export
_original_item_init = InvoiceItem.__init__
_original_success = Invoice._on_payment_success
_original_coupon_init = Coupon.__init__


def install(server: ModuleType) -> None:
    Invoice._api_create = classmethod(_create)
    Invoice.total = property(_total)
    Invoice.total_discount_amounts = property(_discount_amounts)
    Invoice._on_payment_success = _on_payment_success
    Invoice._export = _export
    InvoiceItem.__init__ = _item_init
    Coupon.__init__ = _coupon_init
    server.app.router.add_route("POST", "/v1/invoices/{id}/finalize", server.api_extra(_finalize, None))
