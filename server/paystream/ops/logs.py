"""Structured logs: one JSON object a line, with the ids an operator searches by, for
paystream's own lines and uvicorn's (access and WebSocket lines included), and no
credential in any of them: `token=` query values, bearer credentials, anything shaped
like a JWT and the configured secrets are redacted from every line, as written and as the
line percent-decodes (`?%74oken=`, a JWT with `%2E` for its dots, `psk%5F…`): a reader
decodes those as the server does, so the spelling must not hide one."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

_FIELDS = ("transaction_id", "stripe_event_id", "event_type")
REDACTED = "[redacted]"
# The secrets paystream is configured with, by environment variable: never printed.
SECRET_VARIABLES = ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "PAYSTREAM_API_KEY", "PAYSTREAM_TOKEN_SECRET")
_PATTERNS = (
    re.compile(r"(?i)([?&;]token=)[^&\s\"';]+"),           # ?token=… in a logged URL
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+"),            # Authorization: Bearer …
    re.compile(r"()\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),     # a JWT anywhere
)


def _secrets() -> list[str]:
    found = []
    for name in SECRET_VARIABLES:
        for value in (os.environ.get(name) or "").split(","):
            value = value.strip()
            if len(value) >= 8:  # a short value would redact ordinary words
                found.append(value)
    return sorted(found, key=len, reverse=True)


# %XX of an ASCII byte: every credential paystream knows is ASCII, and leaving other bytes
# encoded keeps each decoded character one original span.
_ESCAPE = re.compile(r"%([0-7][0-9A-Fa-f])")
_DECODINGS = 3  # %2574 is %74 is t: a line decoded twice or thrice must not yield one either


def _views(text: str) -> list[tuple[str, list[tuple[int, int]] | None]]:
    """The text as written and percent-decoded once, twice, ...: each with, for every
    character, the span of the original text it came from (None: the text itself, so a
    line without `%`, nearly every line, costs no map)."""
    views: list[tuple[str, list[tuple[int, int]] | None]] = [(text, None)]
    for _ in range(_DECODINGS):
        current, spans = views[-1]
        if "%" not in current or not _ESCAPE.search(current):
            break
        if spans is None:
            spans = [(i, i + 1) for i in range(len(current))]
        chars: list[str] = []
        new_spans: list[tuple[int, int]] = []
        at = 0
        for m in _ESCAPE.finditer(current):
            chars.append(current[at:m.start()])
            new_spans.extend(spans[at:m.start()])
            chars.append(chr(int(m.group(1), 16)))
            new_spans.append((spans[m.start()][0], spans[m.end() - 1][1]))
            at = m.end()
        chars.append(current[at:])
        new_spans.extend(spans[at:])
        views.append(("".join(chars), new_spans))
    return views


def _found(view: str, secrets: list[str]) -> list[tuple[int, int]]:
    """Where in `view` a credential is (start, end), the pattern's prefix left out."""
    found = [(m.end(1), m.end()) for pattern in _PATTERNS for m in pattern.finditer(view) if m.end() > m.end(1)]
    for secret in secrets:
        at = view.find(secret)
        while at != -1:
            found.append((at, at + len(secret)))
            at = view.find(secret, at + len(secret))
    return found


def redact(text: str) -> str:
    secrets = _secrets()
    cuts: list[tuple[int, int]] = []
    for view, spans in _views(text):
        found = _found(view, secrets)
        cuts.extend(found if spans is None else ((spans[a][0], spans[b - 1][1]) for a, b in found))
    if not cuts:
        return text
    out, at = [], 0
    for start, end in sorted(cuts):
        if end <= at:
            continue  # inside a cut already made
        if start < at:
            start = at
        else:
            out.append(text[at:start])
            out.append(REDACTED)
        at = end
    out.append(text[at:])
    return "".join(out)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def make_formatter() -> logging.Formatter:
    """JSON unless PAYSTREAM_LOG_FORMAT=text; both redact."""
    return TextFormatter() if os.environ.get("PAYSTREAM_LOG_FORMAT", "json") == "text" else JsonFormatter()


def setup_logging() -> None:
    """paystream's loggers on stderr; level from PAYSTREAM_LOG_LEVEL."""
    root = logging.getLogger("paystream")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter())
    root.addHandler(handler)
    root.setLevel(os.environ.get("PAYSTREAM_LOG_LEVEL", "INFO").upper())
    root.propagate = False


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging through the same formatter: its start-up, error, access and
    WebSocket lines become JSON lines like paystream's, with credentials redacted."""
    level = os.environ.get("PAYSTREAM_LOG_LEVEL", "INFO").upper()
    handler = {"class": "logging.StreamHandler", "formatter": "paystream", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"paystream": {"()": "paystream.ops.logs.make_formatter"}},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
