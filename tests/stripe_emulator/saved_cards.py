"""PaymentIntents that keep their card, as Stripe documents `setup_future_usage`, which
localstripe refuses ("Unexpected setup_future_usage").

Create accepts setup_future_usage (`on_session` or `off_session`; a customer is needed to
keep the card), the object carries it (null when not given, as Stripe shows it), and once
a charge of it succeeds (captured or only authorised) its payment method is attached to
the PaymentIntent's customer, as Stripe does, whether the charge came from confirm or
from the customer completing 3-D Secure.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from localstripe.errors import UserError
from localstripe.resources import PaymentIntent, PaymentMethod

_USAGES = ("on_session", "off_session")


def install(server: ModuleType) -> None:
    create = PaymentIntent._api_create.__func__  # the original classmethod's function
    create_charge = PaymentIntent._create_charge

    def _api_create(cls: type, setup_future_usage: Any = None, confirm: Any = None,
                    off_session: Any = None, **data: Any) -> Any:
        if setup_future_usage in (None, ""):
            obj = create(cls, confirm=confirm, off_session=off_session, **data)
            obj.setup_future_usage = None
            return obj
        if setup_future_usage not in _USAGES:
            raise UserError(400, "Invalid setup_future_usage: must be one of on_session, off_session",
                            {"param": "setup_future_usage"})
        if not data.get("customer"):
            raise UserError(400, "setup_future_usage needs a customer to attach the payment method to",
                            {"param": "customer"})
        # Created unconfirmed, so that a confirm at creation already knows to keep the card.
        obj = create(cls, **data)
        obj.setup_future_usage = setup_future_usage
        if confirm not in (None, False, "false"):
            obj._confirm(on_failure_now=obj._report_failure)
        return obj

    def _create_charge(self: Any, on_failure_now: Any) -> None:
        create_charge(self, on_failure_now=on_failure_now)
        charge = self.latest_charge
        if (getattr(self, "setup_future_usage", None) and self.customer and charge is not None
                and charge.status == "succeeded"):
            PaymentMethod._api_retrieve(self.payment_method).customer = self.customer

    PaymentIntent._api_create = classmethod(_api_create)
    PaymentIntent._create_charge = _create_charge
