"""localstripe, extended with what Stripe has and it lacks, as Stripe's API reference
describes it, for `paystream dev` (whose /demo sells a subscription and sends customers
to a hosted Checkout page) and, through tests/stripe_emulator, for the tests.

Each extension is a module of this package with `install(server)`, given the imported
`localstripe.server` module before it serves: it may add resource classes and routes to
`server.app`, or wrap a resource's classmethods (never editing localstripe itself).
`python -m paystream.dev.localstripe --port N --extensions paystream.dev.emulator` installs
every extension in EXTENSIONS, then serves on 127.0.0.1.  It runs in a process of its own:
`paystream serve` never imports this package, and the package itself only talks to
Stripe's API.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Modules of this package, in the order they are installed.
EXTENSIONS: tuple[str, ...] = ("checkout", "subscriptions")


def install(server: ModuleType, name: str) -> None:
    importlib.import_module(f"{__name__}.{name}").install(server)


def install_all(server: ModuleType) -> None:
    for name in EXTENSIONS:
        install(server, name)
