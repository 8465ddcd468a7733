"""The one place that calls Stripe: stripe-python's async StripeClient, idempotency keys
derived from our transaction ids, and Stripe's errors turned into ours."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import stripe

from paystream.payments.breaker import Breaker, Budget, Refused

log = logging.getLogger("paystream.stripe_api")


class StripeFailure(Exception):
    """A Stripe call that failed, as the HTTP answer we give for it (with retry_after, in
    seconds, when a call was not made or Stripe asked us to slow down: 503)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _retry_after(exc: stripe.StripeError) -> float:
    """Seconds Stripe asked us to wait (its Retry-After header), 1 if it did not say."""
    try:
        return min(60.0, max(0.0, float((exc.headers or {}).get("retry-after") or 1)))
    except (TypeError, ValueError):
        return 1.0


@dataclass(frozen=True, slots=True)
class Created:
    stripe_id: str
    client_secret: str | None
    links: tuple[str, ...] = ()
    url: str | None = None  # a Checkout Session's hosted page
    amount: int | None = None  # what Stripe priced it at, when it set the price
    currency: str | None = None
    change: Any = None  # the object's state in Stripe's answer (a Change), applied with the link


async def _checkout_refusals(coro: Any) -> Any:
    """Stripe's `resource_missing` for a session's price or customer, as a precise 400
    (unknown_price, unknown_customer) rather than a generic refusal."""
    try:
        return await coro
    except stripe.InvalidRequestError as exc:
        param = exc.param or ""
        if exc.code == "resource_missing" and "price" in param:
            raise StripeFailure(400, "unknown_price", exc.user_message or "no such price") from None
        if exc.code == "resource_missing" and param == "customer":
            raise StripeFailure(400, "unknown_customer", exc.user_message or "no such customer") from None
        raise


async def _invoice_refusals(coro: Any) -> Any:
    """Stripe's refusals of an invoice's coupon as precise 400s (unknown_coupon,
    coupon_expired, unknown_customer) rather than a generic refusal."""
    try:
        return await coro
    except stripe.InvalidRequestError as exc:
        param = exc.param or ""
        if "coupon" in param and exc.code == "resource_missing":
            raise StripeFailure(400, "unknown_coupon", exc.user_message or "no such coupon") from None
        if "coupon" in param or exc.code == "coupon_expired":
            raise StripeFailure(400, "coupon_expired" if exc.code == "coupon_expired" else "coupon_not_applicable",
                                exc.user_message or "the coupon cannot be applied") from None
        if exc.code == "resource_missing" and param == "customer":
            raise StripeFailure(400, "unknown_customer", exc.user_message or "no such customer") from None
        raise


class StripeApi:
    def __init__(self, api_key: str, api_base: str | None = None, timeout: float = 10, *,
                 breaker: Breaker | None = None, budget: Budget | None = None) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=stripe.HTTPXClient(timeout=timeout),
            max_network_retries=2,  # stripe-python retries with the same idempotency key
        )
        # One of each per process (paystream.payments.breaker): every call goes through them.
        self.breaker = breaker or Breaker()
        self.budget = budget or Budget()

    @classmethod
    def from_settings(cls, settings: Any) -> StripeApi:
        return cls(settings.stripe_api_key, settings.stripe_api_base, settings.stripe_timeout_seconds,
                   breaker=Breaker(settings.stripe_breaker_failures, settings.stripe_breaker_seconds),
                   budget=Budget(settings.stripe_rate))

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            probe = self.breaker.before_call()
        except Refused as refused:
            coro.close()
            raise StripeFailure(503, "stripe_unavailable", f"{refused}; could not {what}",
                                retry_after=refused.retry_after) from None
        try:
            await self.budget.take()
        except (Refused, asyncio.CancelledError) as exc:
            self.breaker.abandoned(probe)
            coro.close()
            if isinstance(exc, Refused):
                raise StripeFailure(503, "stripe_unavailable", f"{exc}; could not {what}",
                                    retry_after=exc.retry_after) from None
            raise
        try:
            result = await coro
        except asyncio.CancelledError:
            self.breaker.abandoned(probe)
            raise
        except stripe.StripeError as exc:
            raise self._failure(what, exc, probe) from None
        self.breaker.succeeded(probe)
        return result

    def _failure(self, what: str, exc: stripe.StripeError, probe: bool) -> StripeFailure:
        """Our answer for a failed call, with the breaker told whether Stripe was there."""
        status = getattr(exc, "http_status", None)
        if isinstance(exc, stripe.APIConnectionError) or (isinstance(status, int) and status >= 500):
            self.breaker.failed_call(probe, f"{type(exc).__name__}: {exc}")
            log.warning("Stripe unreachable while trying to %s: %s", what, exc)
            return StripeFailure(502, "stripe_unavailable", f"Stripe did not answer; could not {what}")
        self.breaker.succeeded(probe)  # Stripe answered: it is up, whatever it said
        if isinstance(exc, stripe.CardError):
            return StripeFailure(402, "card_declined", exc.user_message or "the card was declined")
        if isinstance(exc, stripe.RateLimitError):
            wait = _retry_after(exc)
            self.budget.pause(wait)
            log.warning("Stripe rate-limited us while trying to %s; pausing calls for %g s", what, wait)
            return StripeFailure(503, "stripe_unavailable", f"Stripe asked us to slow down; could not {what}",
                                 retry_after=max(1, math.ceil(wait)))
        if isinstance(exc, stripe.InvalidRequestError):
            return StripeFailure(400, "stripe_invalid_request", f"Stripe refused to {what}: {exc.user_message or exc}")
        if isinstance(exc, stripe.AuthenticationError):
            log.error("Stripe refused our API key while trying to %s", what)
            return StripeFailure(502, "stripe_misconfigured", "paystream's Stripe key was refused")
        log.warning("Stripe error while trying to %s: %s", what, exc)
        return StripeFailure(502, "stripe_error", f"Stripe failed to {what}")

    async def create_payment_intent(self, txn_id: str, *, amount: int, currency: str,
                                    customer: str | None, capture_method: str,
                                    metadata: dict[str, str]) -> Created:
        params: dict[str, Any] = {
            "amount": amount, "currency": currency, "capture_method": capture_method,
            "metadata": metadata, "payment_method_types": ["card"],
        }
        if customer:
            params["customer"] = customer
        pi = await self._call("create a PaymentIntent", self.client.v1.payment_intents.create_async(
            params=params, options={"idempotency_key": f"paystream-{txn_id}-create"}))
        return Created(pi.id, pi.client_secret)

    async def create_invoice(self, txn_id: str, *, amount: int, currency: str, customer: str,
                             coupon: str | None, metadata: dict[str, str]) -> Any:
        """A one-off invoice for `amount`, with the coupon as its discount, finalised so
        that it has a PaymentIntent the browser can pay; the finalised invoice, with its
        `confirmation_secret` and `payments` expanded.

        The draft is made first and the item added to it by id, so none of the
        customer's other pending items is pulled in (Stripe's
        pending_invoice_items_behavior, `exclude` by default since API 2022-08-01: an
        item made before the invoice would be left out of it).  Each step has its own
        idempotency key, so a retry after a 5xx gets the same invoice, item and
        finalisation.  A coupon Stripe does not have or no longer honours is
        `400 unknown_coupon` / `400 coupon_expired`."""
        params: dict[str, Any] = {"customer": customer, "currency": currency, "metadata": metadata,
                                  "pending_invoice_items_behavior": "exclude",
                                  "collection_method": "charge_automatically"}
        if coupon:
            params["discounts"] = [{"coupon": coupon}]
        invoice = await self._call("create an invoice", _invoice_refusals(self.client.v1.invoices.create_async(
            params=params, options={"idempotency_key": f"paystream-{txn_id}-invoice"})))
        await self._call("add an invoice item", self.client.v1.invoice_items.create_async(
            params={"customer": customer, "invoice": invoice.id, "amount": amount, "currency": currency,
                    "description": f"paystream {txn_id}"},
            options={"idempotency_key": f"paystream-{txn_id}-item"}))
        # Since API 2025-03-31 an invoice has no payment_intent field: the browser pays
        # with its confirmation_secret, and its PaymentIntents are listed under payments.
        return await self._call("finalize the invoice", self.client.v1.invoices.finalize_invoice_async(
            invoice.id, params={"expand": ["confirmation_secret", "payments"]},
            options={"idempotency_key": f"paystream-{txn_id}-finalize"}))

    async def retrieve_coupon(self, coupon_id: str) -> Any:
        return await self._call("read the coupon", self.client.v1.coupons.retrieve_async(coupon_id))

    async def retrieve_payment_intent(self, pi_id: str) -> Any:
        return await self._call("read the PaymentIntent", self.client.v1.payment_intents.retrieve_async(pi_id))

    async def retrieve(self, stripe_id: str) -> Any:
        """The object a transaction is linked to (pi_, seti_ or in_), as Stripe has it now;
        a PaymentIntent with its latest charge, whose refund total it reports."""
        v1 = self.client.v1
        if stripe_id.startswith("in_"):
            return await self._call("read the invoice", v1.invoices.retrieve_async(stripe_id))
        if stripe_id.startswith("seti_"):
            return await self._call("read the SetupIntent", v1.setup_intents.retrieve_async(stripe_id))
        if stripe_id.startswith("cs_"):
            return await self.retrieve_checkout_session(stripe_id)
        return await self._call("read the PaymentIntent", v1.payment_intents.retrieve_async(
            stripe_id, params={"expand": ["latest_charge"]}))

    async def create_checkout_session(self, txn_id: str, *, mode: str, success_url: str, cancel_url: str,
                                      amount: int | None, currency: str, price: str | None,
                                      customer: str | None, metadata: dict[str, str]) -> Any:
        """A Checkout Session (Stripe's hosted page) for one line: `price`, or `amount` in
        `currency`; none in setup mode.  Its metadata names our transaction, so its events
        find it.  Stripe's refusals of the price or customer become their own codes."""
        params: dict[str, Any] = {"mode": mode, "success_url": success_url, "cancel_url": cancel_url,
                                  "metadata": metadata}
        if price is not None:
            params["line_items"] = [{"price": price, "quantity": 1}]
        elif amount is not None:
            params["line_items"] = [{"quantity": 1, "price_data": {
                "currency": currency, "unit_amount": amount, "product_data": {"name": f"paystream {txn_id}"}}}]
        else:
            params["currency"] = currency  # setup mode: the currency of the payments to come
        if customer:
            params["customer"] = customer
        return await self._call("create a Checkout Session", _checkout_refusals(
            self.client.v1.checkout.sessions.create_async(
                params=params, options={"idempotency_key": f"paystream-{txn_id}-checkout"})))

    async def retrieve_checkout_session(self, session_id: str) -> Any:
        return await self._call("read the Checkout Session",
                                self.client.v1.checkout.sessions.retrieve_async(session_id))

    async def list_events(self, created_gte: int, page_size: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every event Stripe keeps created at or after `created_gte`, newest first, as
        plain JSON objects (what a webhook would have carried), page by page."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"created": {"gte": created_gte}, "limit": page_size}
            if after:
                params["starting_after"] = after
            page = await self._call("list events", self.client.v1.events.list_async(params=params))
            items = [item.to_dict() for item in page.data]
            for item in items:
                yield item
            if not page.has_more or not items:
                return
            after = items[-1]["id"]

    async def capture_payment_intent(self, txn_id: str, pi_id: str, amount: int | None, variant: str = "all") -> Any:
        """Capture all of an authorisation, or `amount` of it.  Keyed by the transaction and
        the amount asked (`variant`): Stripe captures a PaymentIntent once, a repeat gets the
        same answer, and another amount is not refused as a reused key."""
        params: dict[str, Any] = {"amount_to_capture": amount} if amount is not None else {}
        return await self._call("capture the PaymentIntent", self.client.v1.payment_intents.capture_async(
            pi_id, params=params, options={"idempotency_key": f"paystream-{txn_id}-capture-{variant}"}))

    async def create_refund(self, refund_id: str, *, payment_intent: str, amount: int, reason: str | None,
                            metadata: dict[str, str]) -> Any:
        """Refund `amount` of a PaymentIntent's charge.  Keyed by our refund's id: a retry
        after a timeout or a 5xx gets the refund Stripe already made, never a second one."""
        params: dict[str, Any] = {"payment_intent": payment_intent, "amount": amount, "metadata": metadata}
        if reason:
            params["reason"] = reason
        return await self._call("refund the payment", self.client.v1.refunds.create_async(
            params=params, options={"idempotency_key": f"paystream-{refund_id}"}))

    async def retrieve_refund(self, refund_id: str) -> Any:
        return await self._call("read the refund", self.client.v1.refunds.retrieve_async(refund_id))

    async def cancel_payment_intent(self, txn_id: str, pi_id: str, reason: str) -> Any:
        return await self._call("cancel the PaymentIntent", self.client.v1.payment_intents.cancel_async(
            pi_id, options={"idempotency_key": f"paystream-{txn_id}-cancel-{reason}"}))

    # --- the merchant's webhook endpoint (`paystream stripe-endpoint`) ---------------

    async def list_webhook_endpoints(self) -> list[dict[str, Any]]:
        """Every webhook endpoint of the account, as plain JSON objects (no secrets: Stripe
        shows an endpoint's secret only when it creates it)."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["starting_after"] = after
            page = await self._call("list webhook endpoints",
                                    self.client.v1.webhook_endpoints.list_async(params=params))
            items = [item.to_dict() for item in page.data]
            found.extend(items)
            if not page.has_more or not items:
                return found
            after = items[-1]["id"]

    async def create_webhook_endpoint(self, url: str, events: list[str], api_version: str,
                                      description: str) -> dict[str, Any]:
        """A new endpoint; the answer carries its signing secret (the only one that does)."""
        endpoint = await self._call("create the webhook endpoint", self.client.v1.webhook_endpoints.create_async(
            params={"url": url, "enabled_events": events, "api_version": api_version,
                    "description": description}))
        return endpoint.to_dict()

    async def update_webhook_endpoint(self, endpoint_id: str, **params: Any) -> dict[str, Any]:
        """url, enabled_events, description, disabled: Stripe fixes api_version at creation."""
        endpoint = await self._call("update the webhook endpoint", self.client.v1.webhook_endpoints.update_async(
            endpoint_id, params=params))
        return endpoint.to_dict()

    async def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        await self._call("delete the webhook endpoint",
                         self.client.v1.webhook_endpoints.delete_async(endpoint_id))

    # --- subscriptions (payments/subscriptions.py) ---------------------------------------

    async def retrieve_price(self, price_id: str) -> Any:
        return await self._call("read the price", self.client.v1.prices.retrieve_async(price_id))

    async def retrieve_customer(self, customer_id: str) -> Any:
        return await self._call("read the customer", self.client.v1.customers.retrieve_async(customer_id))

    async def create_subscription(self, txn_id: str, *, customer: str, price: str, quantity: int,
                                  trial_period_days: int | None, metadata: dict[str, str],
                                  payment_behavior: str) -> Any:
        """A subscription to one price, with its first invoice and that invoice's payment
        (`latest_invoice.confirmation_secret`, API 2025-03-31 on: the secret the page confirms)."""
        params: dict[str, Any] = {
            "customer": customer, "items": [{"price": price, "quantity": quantity}], "metadata": metadata,
            "payment_behavior": payment_behavior,
            "payment_settings": {"save_default_payment_method": "on_subscription"},
            "expand": ["latest_invoice.confirmation_secret"],
        }
        if trial_period_days:
            params["trial_period_days"] = trial_period_days
        return await self._call("create a subscription", self.client.v1.subscriptions.create_async(
            params=params, options={"idempotency_key": f"paystream-{txn_id}-subscription"}))

    async def retrieve_subscription(self, sub_id: str) -> Any:
        """The subscription with its latest invoice and that invoice's payments (whose
        PaymentIntent holds a failed renewal's error)."""
        return await self._call("read the subscription", self.client.v1.subscriptions.retrieve_async(
            sub_id, params={"expand": ["latest_invoice.payments"]}))

    async def cancel_subscription(self, txn_id: str, sub_id: str, at_period_end: bool) -> Any:
        """Cancel now, or at the end of the period already paid (Stripe keeps it active)."""
        if at_period_end:
            return await self._call("cancel the subscription at period end",
                                    self.client.v1.subscriptions.update_async(
                                        sub_id, params={"cancel_at_period_end": True},
                                        options={"idempotency_key": f"paystream-{txn_id}-cancel-at-period-end"}))
        return await self._call("cancel the subscription", self.client.v1.subscriptions.cancel_async(
            sub_id, options={"idempotency_key": f"paystream-{txn_id}-cancel-now"}))

    # --- saved cards ---------------------------------------------------------------

    async def create_payment_intent_saving_card(self, txn_id: str, *, amount: int, currency: str, customer: str,
                                                capture_method: str, metadata: dict[str, str],
                                                setup_future_usage: str) -> Created:
        """A PaymentIntent whose card Stripe attaches to the customer once it succeeds, for
        later use on or off session (Stripe's setup_future_usage)."""
        pi = await self._call("create a PaymentIntent", self.client.v1.payment_intents.create_async(
            params={"amount": amount, "currency": currency, "capture_method": capture_method,
                    "metadata": metadata, "payment_method_types": ["card"], "customer": customer,
                    "setup_future_usage": setup_future_usage},
            options={"idempotency_key": f"paystream-{txn_id}-create"}))
        return Created(pi.id, pi.client_secret)

    async def charge_saved_card(self, txn_id: str, *, amount: int, currency: str, customer: str,
                                payment_method: str, metadata: dict[str, str]) -> Any:
        """Charge a customer's saved card without them (off_session, confirmed at once): the
        PaymentIntent as Stripe left it.  A card that needs its holder is, at Stripe, a
        decline with code authentication_required that carries the PaymentIntent: that
        PaymentIntent is returned (its last_payment_error says so); other declines raise
        StripeFailure 402 card_declined."""

        async def attempt() -> Any:
            try:
                return await self.client.v1.payment_intents.create_async(
                    params={"amount": amount, "currency": currency, "customer": customer,
                            "payment_method": payment_method, "off_session": True, "confirm": True,
                            "metadata": metadata, "payment_method_types": ["card"]},
                    options={"idempotency_key": f"paystream-{txn_id}-create"})
            except stripe.CardError as exc:
                pi = getattr(exc.error, "payment_intent", None) if exc.error else None
                if exc.code == "authentication_required" and pi is not None:
                    return pi
                raise

        return await self._call("charge the saved card", attempt())

    async def retrieve_payment_method(self, pm_id: str) -> Any:
        return await self._call("read the payment method", self.client.v1.payment_methods.retrieve_async(pm_id))

    async def list_cards(self, customer: str, most: int = 1000) -> list[dict[str, Any]] | None:
        """The customer's saved cards (at most `most`), or None when Stripe has no such customer."""

        async def page(after: str | None) -> Any:
            params: dict[str, Any] = {"customer": customer, "type": "card", "limit": 100}
            if after:
                params["starting_after"] = after
            try:
                return await self.client.v1.payment_methods.list_async(params=params)
            except stripe.InvalidRequestError as exc:
                if exc.http_status == 404:
                    return None
                raise

        cards: list[dict[str, Any]] = []
        after: str | None = None
        while len(cards) < most:
            listed = await self._call("list the customer's cards", page(after))
            if listed is None:
                return None
            items = [item.to_dict() for item in listed.data]
            cards.extend(items)
            if not listed.has_more or not items:
                break
            after = items[-1]["id"]
        return cards[:most]
