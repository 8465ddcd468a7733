"""Log redaction sees through percent-encoding (issue 22, item 16): a reader of the log
decodes `%74oken=` and `%2E` as a server does, so what the text decodes to is redacted,
and each configured secret in any spelling."""

from __future__ import annotations

import time
from urllib.parse import quote, unquote

import jwt
import pytest

from paystream.ops import logs

KEY = "psk_test_0123456789abcdef"


@pytest.fixture(autouse=True)
def configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSTREAM_API_KEY", KEY)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "whsec_first0123456789, whsec_second0123456789")
    for name in ("STRIPE_API_KEY", "PAYSTREAM_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)


def jwt_token() -> str:
    return jwt.encode({"exp": int(time.time()) + 600, "txn": ["pi_1"]}, "s" * 32, algorithm="HS256")


def every_decoding(text: str) -> list[str]:
    """The text and what it decodes to once, twice and three times."""
    out = [text]
    for _ in range(3):
        out.append(unquote(out[-1]))
    return out


def encode_all(text: str) -> str:
    return "".join(f"%{ord(c):02X}" for c in text)


TOKEN = jwt_token()
CASES = {
    "token-name-encoded": f"GET /v1/transactions/pi_1?%74oken={TOKEN.replace('.', '%2E')} HTTP/1.1",
    "token-name-upper-hex": f"GET /x?%74%6F%6B%65%6E={TOKEN} HTTP/1.1",
    "jwt-dots-encoded": f"GET /x?note={TOKEN.replace('.', '%2e')}",
    "jwt-fully-encoded": f"GET /x?note={encode_all(TOKEN)}",
    "jwt-double-encoded": f"GET /x?note={TOKEN.replace('.', '%252E')}",
    "key-underscore-encoded": f"GET /x?note={KEY.replace('_', '%5F')}",
    "key-fully-encoded": f"GET /x?k={encode_all(KEY)}&more=1",
    "key-lower-hex": f"GET /x?k={KEY.replace('_', '%5f')}",
    "webhook-secret-encoded": f"secret={quote('whsec_second0123456789', safe='')} and whsec%5Ffirst0123456789",
    "bearer-encoded": f"authorization: Bearer%20{TOKEN.replace('.', '%2E')}",
}


@pytest.mark.parametrize("text", CASES.values(), ids=CASES.keys())
def test_no_decoding_of_the_redacted_line_yields_a_credential(text: str) -> None:
    redacted = logs.redact(text)
    for view in every_decoding(redacted):
        for secret in (TOKEN, TOKEN.rpartition(".")[2], KEY, "whsec_first0123456789", "whsec_second0123456789"):
            assert secret not in view, (redacted, view)
    assert logs.REDACTED in redacted


def test_what_is_not_a_credential_is_left_as_written() -> None:
    line = "GET /v1/transactions/pi_1?await=succeeded%2Ccanceled&timeout=5&name=caf%C3%A9 HTTP/1.1 200"
    assert logs.redact(line) == line
    assert logs.redact("100% done, 50%off") == "100% done, 50%off"


def test_the_parts_around_a_redaction_keep_their_spelling() -> None:
    line = f"GET /v1/transactions/pi_1?%74oken={TOKEN.replace('.', '%2E')}&await=succeeded%2Ccanceled 200"
    assert logs.redact(line) == f"GET /v1/transactions/pi_1?%74oken={logs.REDACTED}&await=succeeded%2Ccanceled 200"
