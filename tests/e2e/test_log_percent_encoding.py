"""Percent-encoding does not get a credential past log redaction (issue 22, item 16): a
server with its access log on is sent a stream token as `?%74oken=` with its dots written
`%2E` (which it accepts: the spelling is usable) and the API key written `psk%5F…`; its
whole output, and every decoding of it, holds neither."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest

from paystream.dev import trigger
from tests.conftest import Server
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def test_encoded_token_and_key_never_reach_the_log_usable(database_url: str) -> None:
    server = Server(database_url)
    server.args = ("--access-log",)
    await asyncio.to_thread(server.start)
    try:
        async with Paystream(server) as ps:
            pi = trigger.stripe_id("pi_")
            await ps.deliver(ps.event("payment_intent.processing", pi))
            token = ps.token(pi)
            encoded_token = token.replace(".", "%2E")
            read = await ps.http.get(f"/v1/transactions/{pi}?%74oken={encoded_token}")
            assert read.status_code == 200, read.text  # the server decodes it: a usable credential
            encoded_key = server.api_key.replace("_", "%5F")
            await ps.http.get(f"/v1/transactions/{pi}?note={encoded_key}")
            await ps.http.get(f"/v1/transactions/{encoded_key}", headers=ps.backend)
            await ps.http.get(f"/v1/transactions/{pi}?note={encoded_token.replace('%', '%25')}")
    finally:
        server.stop()
    output = server.log_path.read_text()
    assert f"/v1/transactions/{pi}?%74oken=" in output  # the access log did log those requests
    views = [output]
    for _ in range(3):
        views.append(unquote(views[-1]))
    for secret in (token, token.rpartition(".")[2], server.api_key):
        assert not any(secret in view for view in views), f"{secret[:12]}… is in the server's output"
