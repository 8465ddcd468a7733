"""`paystream stripe-endpoint URL`: the merchant's webhook endpoint at Stripe, as paystream
needs it: the event types it consumes, the API version it reads, enabled.

Found by its URL, so running the command again updates that endpoint and never adds a
second one.  Stripe shows an endpoint's signing secret only in the answer that creates it:
it is printed then, once, for STRIPE_WEBHOOK_SECRET.  Stripe cannot change an endpoint's
API version in place; a different one is reported, and --recreate replaces the endpoint
(a new secret).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import stripe

from paystream.ingest.stripe_events import SUPPORTED_PREFIXES, is_supported
from paystream.payments.stripe_api import StripeApi

# Stripe's event types, by family, of the events paystream reads (each one moves, links
# or creates a transaction).  Only those of a family paystream supports
# (stripe_events.SUPPORTED_PREFIXES) are subscribed to: a family is switched on there.
_KNOWN_EVENT_TYPES = (
    "payment_intent.created", "payment_intent.processing", "payment_intent.requires_action",
    "payment_intent.amount_capturable_updated", "payment_intent.succeeded",
    "payment_intent.payment_failed", "payment_intent.canceled",
    "charge.succeeded", "charge.captured", "charge.refunded", "charge.expired",
    "charge.refund.updated", "charge.dispute.created", "charge.dispute.updated",
    "charge.dispute.closed", "charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated",
    "refund.created", "refund.updated", "refund.failed",
    "invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded",
    "invoice.payment_failed", "invoice.payment_action_required", "invoice.voided",
    "setup_intent.created", "setup_intent.requires_action", "setup_intent.succeeded",
    "setup_intent.setup_failed", "setup_intent.canceled",
    "customer.subscription.created", "customer.subscription.updated",
    "customer.subscription.deleted", "customer.subscription.paused",
    "customer.subscription.resumed",
    "checkout.session.completed", "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed", "checkout.session.expired",
)


def event_types() -> tuple[str, ...]:
    """The event types to subscribe to; a ValueError names a supported family with none
    listed here (a new family in SUPPORTED_PREFIXES must bring its types)."""
    chosen = tuple(t for t in _KNOWN_EVENT_TYPES if is_supported(t))
    missing = [p for p in SUPPORTED_PREFIXES if not any(t.startswith(p) for t in chosen)]
    if missing:
        raise ValueError(f"no event types are listed for the supported families {', '.join(missing)}"
                         " (paystream.payments.endpoint._KNOWN_EVENT_TYPES)")
    return chosen


# The version every object paystream reads from Stripe's API has (stripe-python sends its
# pinned version with each call): events rendered in it have the shape a refresh or a
# backfill reads, whichever of them brings an object first.
API_VERSION: str = stripe.api_version
DESCRIPTION = "paystream"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    differs: bool = False
    secret: str | None = None


def differences(endpoint: dict[str, Any], events: tuple[str, ...], api_version: str) -> list[str]:
    """What differs between an existing endpoint and what paystream needs, one line each."""
    found = []
    have = set(endpoint.get("enabled_events") or [])
    if "*" in have:
        found.append("enabled_events is '*' (every event type): paystream needs only its "
                     f"{len(events)} types")
    else:
        if missing := [t for t in events if t not in have]:
            found.append(f"enabled_events lacks {', '.join(missing)}")
        if extra := sorted(have - set(events)):
            found.append(f"enabled_events has types paystream does not use: {', '.join(extra)}")
    if endpoint.get("api_version") != api_version:
        found.append(f"api_version is {endpoint.get('api_version') or 'the account default'}, "
                     f"paystream reads {api_version}")
    if endpoint.get("status") != "enabled":
        found.append(f"status is {endpoint.get('status')}, not enabled")
    return found


async def ensure(api: StripeApi, url: str, *, check: bool, recreate: bool = False,
                 events: tuple[str, ...] | None = None, api_version: str = API_VERSION) -> Report:
    """Create or update the endpoint for `url` (or, with check, only say what differs)."""
    events = events if events is not None else event_types()
    report = Report()
    same_url = [e for e in await api.list_webhook_endpoints() if e.get("url") == url]
    if not same_url:
        if check:
            report.differs = True
            report.lines.append(f"no webhook endpoint for {url}")
            return report
        created = await api.create_webhook_endpoint(url, list(events), api_version, DESCRIPTION)
        report.secret = created.get("secret")
        report.lines.append(f"created {created['id']} for {url}: {len(events)} event types, API {api_version}")
        return report
    endpoint, *others = same_url
    for other in others:
        report.differs = True
        report.lines.append(f"{other['id']} also points at {url}: Stripe sends each event to both")
    diff = differences(endpoint, events, api_version)
    if check or not diff:
        report.differs = report.differs or bool(diff)
        report.lines += [f"{endpoint['id']}: {line}" for line in diff] or [f"{endpoint['id']} is up to date"]
        return report
    if endpoint.get("api_version") != api_version:
        if not recreate:
            report.differs = True
            report.lines += [f"{endpoint['id']}: {line}" for line in diff]
            report.lines.append("Stripe cannot change an endpoint's API version: run again with --recreate "
                                "to replace the endpoint (it gets a new signing secret)")
            return report
        await api.delete_webhook_endpoint(endpoint["id"])
        created = await api.create_webhook_endpoint(url, list(events), api_version, DESCRIPTION)
        report.secret = created.get("secret")
        report.lines.append(f"replaced {endpoint['id']} with {created['id']} for {url}: "
                            f"{len(events)} event types, API {api_version}")
        return report
    await api.update_webhook_endpoint(endpoint["id"], enabled_events=list(events), disabled=False)
    report.lines += [f"updated {endpoint['id']}: {line}" for line in diff]
    return report
