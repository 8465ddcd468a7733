"""`python -m tests.stripe_emulator --port N`: localstripe with the tests' extensions."""

from __future__ import annotations

import argparse

from localstripe import server

from paystream.dev.localstripe import serve
from tests.stripe_emulator import install_all

parser = argparse.ArgumentParser(description="localstripe with the tests' extensions, on 127.0.0.1")
parser.add_argument("--port", type=int, required=True)
port = parser.parse_args().port
install_all(server)
serve(port)
