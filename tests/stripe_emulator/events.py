"""GET /v1/events newest first, as Stripe lists them ("sorted by creation date, with the
most recently created appearing first"); localstripe lists its store's order, oldest
first.  Every event an extension posts is an Event, which records itself in the store,
so the list holds them all."""

from __future__ import annotations

from types import ModuleType
from typing import Any


def install(server: ModuleType) -> None:
    from localstripe.resources import Event

    oldest_first = Event._api_list_all.__func__  # the original classmethod's function

    def _api_list_all(cls: type, url: Any, **kwargs: Any) -> Any:
        li = oldest_first(cls, url, **kwargs)
        li._list.reverse()  # the store keeps creation order; starting_after pages over this one
        return li

    Event._api_list_all = classmethod(_api_list_all)
