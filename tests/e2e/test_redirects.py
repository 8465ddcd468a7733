"""No redirects (issue 22, item 15).

A path with a trailing slash was redirected (307) to the path without it, with a
`Location` built from the request's `Host` header and the query carried along, so
`GET /v1/transactions/txn_…/?token=<stream token>` with `Host: evil.example` answered
`Location: http://evil.example/v1/transactions/txn_…?token=<stream token>`: a client that
follows it hands its token to whoever the Host header named.  Now such a path is unknown,
like any other: `404 not_found` as JSON, with no `Location`."""

from __future__ import annotations

import pytest

from paystream.dev import trigger
from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def test_a_trailing_slash_is_an_unknown_path_never_a_redirect(ps: Paystream) -> None:
    pi = trigger.stripe_id("pi_")
    await ps.deliver(ps.event("payment_intent.succeeded", pi))
    token = ps.token(pi)
    attempts = [
        ("GET", f"/v1/transactions/{pi}/"),
        ("GET", f"/v1/transactions/{pi}/events/"),
        ("POST", f"/v1/transactions/{pi}/refresh/"),
        ("POST", "/v1/transactions/"),
        ("POST", "/v1/stream-tokens/"),
        ("POST", "/v1/stripe/webhook/"),
        ("GET", "/healthz/"),
        ("GET", "/readyz/"),
        ("GET", "/openapi.json/"),
    ]
    for method, path in attempts:
        resp = await ps.http.request(method, path, params={"token": token},
                                     headers={"Host": "evil.example", **ps.backend}, follow_redirects=False)
        assert resp.status_code == 404, (method, path, resp.status_code, resp.headers)
        assert "location" not in resp.headers, (method, path, resp.headers)
        assert resp.json()["error"]["code"] == "not_found", (method, path, resp.text)
        assert token not in resp.text
    # The paths as the contract spells them still answer, whatever the Host header says.
    resp = await ps.http.get(f"/v1/transactions/{pi}", params={"token": token}, headers={"Host": "evil.example"})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded"
