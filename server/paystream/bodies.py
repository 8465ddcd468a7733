"""Reading request bodies: bounded in size, parsed as JSON, validated into a model, with
a precise 400 for each way a body can be wrong."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from paystream.errors import ApiError

MAX_JSON_BODY = 64 * 1024  # API bodies are a few hundred bytes

Model = TypeVar("Model", bound=BaseModel)


async def read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refusing anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(400, "payload_too_large", f"the body is over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(400, "payload_too_large", f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, limit: int = MAX_JSON_BODY) -> dict[str, Any]:
    """The body as a JSON object (an empty body is {})."""
    raw = await read_limited(request, limit)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def validated(model: type[Model], data: dict[str, Any] | bytes) -> Model:
    """`data` (a parsed object, or raw JSON) as `model`; the first problem as a 400."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data or b"{}")
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, "bad_request", f"{where}: {first['msg']}") from None


def stripe_metadata(value: dict[str, str], reserved: tuple[str, ...]) -> dict[str, str]:
    """Metadata as Stripe accepts it, so a bad pair is a 400 here and never a failed Stripe call.

    Stripe's rules: keys of 1-40 characters without square brackets (they would be read as
    nested form fields), values of at most 500; NUL is refused by Postgres' jsonb besides.
    """
    for key, item in value.items():
        if "\x00" in key or "\x00" in item:
            raise ValueError("metadata must not contain NUL characters")
        if not key or len(key) > 40 or "[" in key or "]" in key:
            raise ValueError("metadata keys are 1 to 40 characters, without '[' or ']'")
        if len(item) > 500:
            raise ValueError("metadata values are at most 500 characters")
        if key in reserved:
            raise ValueError(f"metadata key {key!r} is set by paystream")
    return value
