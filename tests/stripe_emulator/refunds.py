"""Refunds as Stripe takes them: with a `reason` (duplicate, fraudulent,
requested_by_customer), which localstripe refuses as an unexpected parameter."""

from __future__ import annotations

from types import ModuleType
from typing import Any

REASONS = ("duplicate", "fraudulent", "requested_by_customer")


def install(server: ModuleType) -> None:
    from localstripe.errors import UserError
    from localstripe.resources import Refund

    plain_init = Refund.__init__

    def __init__(self: Any, reason: Any = None, **kwargs: Any) -> None:
        if reason is not None and reason not in REASONS:
            raise UserError(400, "Bad request: reason must be one of " + ", ".join(REASONS))
        plain_init(self, **kwargs)
        self.reason = reason

    Refund.__init__ = __init__
