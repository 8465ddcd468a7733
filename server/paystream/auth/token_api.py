"""POST /v1/stream-tokens: the merchant's backend asks for a browser's stream token."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from paystream.auth import access, tokens
from paystream.bodies import json_body, validated
from paystream.errors import ApiError


class StreamTokenRequest(BaseModel):
    model_config = {"extra": "forbid"}
    transaction_ids: list[str] | None = Field(default=None, max_length=100)
    customer_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^\x00]+$")
    ttl_seconds: int = Field(default=3600, ge=1)  # and at most PAYSTREAM_MAX_TOKEN_TTL


async def create_stream_token(request: Request) -> JSONResponse:
    access.backend(request)
    req = validated(StreamTokenRequest, await json_body(request))
    max_ttl = request.app.state.settings.max_token_ttl
    if req.ttl_seconds > max_ttl:
        raise ApiError(400, "bad_request", f"ttl_seconds: at most {max_ttl} (PAYSTREAM_MAX_TOKEN_TTL)")
    if not req.transaction_ids and not req.customer_id:
        raise ApiError(400, "bad_request", "give transaction_ids or customer_id")
    token, exp = tokens.mint(request.app.state.settings.paystream_token_secret,
                             txn=req.transaction_ids, cus=req.customer_id, ttl_seconds=req.ttl_seconds)
    expires_at = datetime.fromtimestamp(exp, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return JSONResponse({"token": token, "expires_at": expires_at}, status_code=201)
