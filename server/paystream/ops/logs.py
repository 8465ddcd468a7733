"""Structured logs: one JSON object a line, with the ids an operator searches by."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_FIELDS = ("transaction_id", "stripe_event_id", "event_type")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging() -> None:
    """JSON on stderr unless PAYSTREAM_LOG_FORMAT=text; level from PAYSTREAM_LOG_LEVEL."""
    root = logging.getLogger("paystream")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("PAYSTREAM_LOG_FORMAT", "json") == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(os.environ.get("PAYSTREAM_LOG_LEVEL", "INFO").upper())
    root.propagate = False
