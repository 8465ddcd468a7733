"""Structured logs: one JSON object a line, with the ids an operator searches by, for
paystream's own lines and uvicorn's (access and WebSocket lines included), and no
credential in any of them: `token=` query values, bearer credentials, anything shaped
like a JWT and the configured secrets are redacted from every line."""

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


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    for secret in _secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


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
