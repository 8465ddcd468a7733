"""The OpenAPI description of the HTTP API, served at /openapi.json (checked by
schemathesis in tests/e2e/test_openapi.py)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream import __version__
from paystream.changes.lifecycle import KINDS, STATUSES

_ERROR = {"$ref": "#/components/schemas/Error"}
_TXN = {"$ref": "#/components/schemas/Transaction"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): _json(_ERROR, "an error") for c in codes}


_ID = {"name": "id", "in": "path", "required": True, "description": "a txn_ id or a Stripe object id",
       "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
_TOKEN = {"name": "token", "in": "query", "required": False, "description": "a stream token (or use Authorization)",
          "schema": {"type": "string"}}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "paystream", "version": __version__,
             "description": "Realtime payment-status push over Stripe webhooks. See shared/CONTRACT.md."},
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "PAYSTREAM_API_KEY (backend) or a stream token (browser)"},
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                               "transaction_id": {"type": "string"}}}}},
            "Transaction": {
                "type": "object",
                "required": ["id", "stripe_id", "kind", "status", "amount", "currency", "customer_id", "metadata",
                             "last_error", "validated", "seq", "updated_at"],
                "properties": {
                    "id": {"type": "string", "pattern": "^txn_"},
                    "stripe_id": {"type": "string", "nullable": True},
                    "kind": {"type": "string", "enum": list(KINDS)},
                    "status": {"type": "string", "enum": list(STATUSES)},
                    "amount": {"type": "integer", "minimum": 0},
                    "currency": {"type": "string"},
                    "customer_id": {"type": "string", "nullable": True},
                    "metadata": {"type": "object"},
                    "last_error": {"type": "object", "nullable": True},
                    "validated": {"type": "boolean"},
                    "amount_refunded": {"type": "integer", "minimum": 0},
                    "dispute": {"type": "object", "nullable": True,
                                "description": "the dispute of a disputed payment: {id, amount, currency, status}"},
                    "seq": {"type": "integer", "minimum": 1},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "authorization_expires_at": {
                        "type": "string", "format": "date-time", "nullable": True,
                        "description": "a held authorisation (requires_capture): when paystream releases it"},
                    "timed_out": {"type": "boolean"},
                },
            },
        },
    },
    "paths": {
        "/v1/transactions": {"post": {
            "summary": "Create a transaction and its Stripe object",
            "security": [{"bearer": []}],
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["kind"], "additionalProperties": False,
                "properties": {
                    "kind": {"type": "string", "enum": list(KINDS)},
                    "amount": {"type": "integer", "minimum": 1, "maximum": 99999999},
                    "currency": {"type": "string", "pattern": "^[a-zA-Z]{3}$"},
                    "customer_id": {"type": "string", "minLength": 1, "maxLength": 255},
                    "capture_method": {"type": "string", "enum": ["automatic", "manual"]},
                    "metadata": {"type": "object", "maxProperties": 40,
                                 "additionalProperties": {"type": "string", "maxLength": 500},
                                 "description": "keys of 1-40 characters without '[' or ']'"},
                    "coupon": {"type": "string", "minLength": 1, "maxLength": 255},
                    "authorization_days": {"type": "integer", "minimum": 1, "maximum": 31,
                                           "description": "with capture_method manual (default 7)"},
                }}}}},
            "responses": {"201": _json({"type": "object", "required": ["transaction", "client_secret", "stream_token"],
                                        "properties": {"transaction": _TXN,
                                                       "client_secret": {"type": "string", "nullable": True},
                                                       "amount_added": {
                                                           "type": "integer", "minimum": 1,
                                                           "description": "kind invoice: what the customer's wallet "
                                                                          "gains once the invoice is paid"},
                                                       "stream_token": {"type": "string"}}}, "created"),
                          **_errors(400, 401, 402, 409, 429, 431, 502, 503)},
        }},
        "/v1/transactions/{id}": {"get": {
            "summary": "Current state; with `await` or `after`, a long-poll that answers on a status change "
                       "(`await`) or on any change logged after a seq (`after`)",
            "security": [{"bearer": []}],
            "parameters": [_ID, _TOKEN,
                           {"name": "await", "in": "query", "required": False,
                            "description": "comma-separated statuses", "schema": {"type": "string"}},
                           {"name": "after", "in": "query", "required": False,
                            "description": "a seq: any change logged after it answers",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 999999999}},
                           {"name": "timeout", "in": "query", "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": 60}}],
            "responses": {"200": _json(_TXN, "the transaction"), **_errors(400, 401, 403, 404, 429, 431)},
        }},
        "/v1/transactions/{id}/events": {"get": {
            "summary": "Server-Sent Events: snapshot (or replay), then live status events",
            "security": [{"bearer": []}],
            "parameters": [_ID, _TOKEN,
                           {"name": "last_event_id", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 999999999}},
                           {"name": "Last-Event-ID", "in": "header", "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 999999999}},
                           {"name": "follow", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["true", "false"]}}],
            "responses": {"200": {"description": "an event stream: frames of id, event, data (a Transaction as JSON)",
                                  "content": {"text/event-stream": {"schema": {
                                      "type": "object",
                                      "properties": {"id": {"type": "string"},
                                                     "event": {"type": "string", "enum": ["snapshot", "status"]},
                                                     "data": {"type": "string"},
                                                     "retry": {"type": "integer"}}}}}},
                          **_errors(400, 401, 403, 404, 429, 431)},
        }},
        "/v1/stream-tokens": {"post": {
            "summary": "Mint a stream token",
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"transaction_ids": {"type": "array", "maxItems": 100, "items": {"type": "string"},
                                                   "nullable": True},
                               "customer_id": {"type": "string", "minLength": 1, "maxLength": 255, "nullable": True},
                               "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 86400}}}}}},
            "responses": {"201": _json({"type": "object", "required": ["token", "expires_at"],
                                        "properties": {"token": {"type": "string"},
                                                       "expires_at": {"type": "string"}}}, "a token"),
                          **_errors(400, 401, 431)},
        }},
        "/v1/stripe/webhook": {"post": {
            "summary": "Stripe's signed webhook",
            "parameters": [{"name": "Stripe-Signature", "in": "header", "required": True,
                            "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": _json({"type": "object"}, "stored (and applied, or a duplicate)"),
                          **_errors(400, 431, 500)},
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"}, "alive")}}},
        "/readyz": {"get": {"summary": "Readiness: database and listener",
                            "responses": {"200": _json({"type": "object"}, "ready"),
                                          "503": _json({"type": "object"}, "not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
            "description": "metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "404": _json(_ERROR, "served on PAYSTREAM_METRICS_PORT instead")}}},
    },
}


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse(SPEC)
