"""localstripe, extended for the tests with what Stripe has and it lacks, as Stripe's API
reference describes it, and driven only through stripe-python.

Each extension is a module of this package with `install(server)`, given the imported
`localstripe.server` module before it serves: it may add resource classes and routes to
`server.app`, or wrap a resource's classmethods (never editing localstripe itself).
`python -m tests.stripe_emulator --port N` installs every extension in EXTENSIONS, then
serves on 127.0.0.1 as `paystream dev`'s localstripe does.  Nothing here is reachable from
the package: the package only talks to Stripe's API.

Checkout Sessions and subscriptions (prices, default_incomplete) are `paystream dev`'s
too, for its demo: they live in paystream.dev.emulator (its EXTENSIONS), installed from
there in this package's order; the rest are the tests' own modules.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from paystream.dev import emulator

# Extensions, in the order they are installed (two of them paystream.dev.emulator's).
EXTENSIONS: tuple[str, ...] = ("webhook_endpoints", "checkout", "saved_cards", "subscriptions", "capture", "refunds",
                              "invoices", "events", "hold")

MODULE = "tests.stripe_emulator"  # what tests.conftest runs (`python -m`)


def install_all(server: ModuleType) -> None:
    for name in EXTENSIONS:
        if name in emulator.EXTENSIONS:
            emulator.install(server, name)
        else:
            importlib.import_module(f"{__name__}.{name}").install(server)
