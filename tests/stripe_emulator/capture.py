"""Partial capture as Stripe does it.

localstripe captures less than a charge's amount by capturing all of it and refunding the
rest, so the charge reads as partly refunded. Stripe instead captures `amount_to_capture`,
records it in the charge's `amount_captured` (and the PaymentIntent's `amount_received`),
and releases the rest of the authorisation: nothing is refunded.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def install(server: ModuleType) -> None:
    from localstripe.errors import UserError
    from localstripe.resources import Charge, try_convert_to_int

    def _capture(self: Any, amount: Any, on_success: Any = None) -> None:
        amount = self.amount if amount is None else try_convert_to_int(amount)
        if not (type(amount) is int and 0 < amount <= self.amount) or self.captured or self.status != "succeeded":
            raise UserError(400, "Bad request")

        def captured() -> None:
            self.captured = True
            self.amount_captured = amount
            if on_success:
                on_success()

        self._trigger_payment(on_success=captured)

    Charge._capture = _capture
