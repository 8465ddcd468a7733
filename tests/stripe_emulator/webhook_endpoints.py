"""/v1/webhook_endpoints, which localstripe lacks, as Stripe's API reference documents it.

Create (url and enabled_events required; api_version, description, metadata optional)
answers the endpoint with its signing secret (`whsec_…`), the only answer that ever
carries it; retrieve, update (url, enabled_events, description, metadata, disabled: never
api_version, which Stripe fixes at creation), list (newest first, limit / starting_after)
and delete as Stripe answers them.  An enabled endpoint is also registered with
localstripe's own webhook sender, so the emulator posts its events there, signed with that
secret and filtered to enabled_events, as Stripe would; a disabled or deleted one is
unregistered.

Kept in this process only (not localstripe's pickled store, which other localstripe
processes on the machine load and which could not unpickle a class of the tests).
"""

from __future__ import annotations

import secrets
import time
from types import ModuleType
from typing import Any

from localstripe import webhooks
from localstripe.errors import UserError
from localstripe.resources import try_convert_to_bool

_endpoints: dict[str, dict[str, Any]] = {}  # id -> the object, secret included
_order: list[str] = []  # ids, oldest first
_PATH = "/v1/webhook_endpoints"
_CREATE = {"url", "enabled_events", "api_version", "description", "metadata", "connect"}
_UPDATE = {"url", "enabled_events", "description", "metadata", "disabled"}


def _invalid(message: str, param: str | None = None) -> UserError:
    return UserError(400, message, {"param": param} if param else None)


def _url(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise _invalid("Invalid URL: the URL must be an http(s) URL", "url")
    return value


def _events(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(e, str) and e for e in value):
        raise _invalid("enabled_events must be a non-empty array of event types", "enabled_events")
    return list(dict.fromkeys(value))


def _metadata(value: Any, current: dict[str, str]) -> dict[str, str]:
    if value in (None, ""):
        return {} if value == "" else current
    if not isinstance(value, dict):
        raise _invalid("metadata must be a hash", "metadata")
    merged = dict(current)
    for key, item in value.items():
        if item == "":
            merged.pop(key, None)  # Stripe: an empty value unsets the key
        else:
            merged[key] = str(item)
    return merged


def _public(endpoint: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in endpoint.items() if k != "secret"}


def _register(endpoint: dict[str, Any]) -> None:
    webhooks._webhooks.pop(endpoint["id"], None)
    if endpoint["status"] == "enabled":
        events = None if "*" in endpoint["enabled_events"] else list(endpoint["enabled_events"])
        webhooks.register_webhook(endpoint["id"], endpoint["url"], endpoint["secret"], events)


def _get(endpoint_id: str) -> dict[str, Any]:
    endpoint = _endpoints.get(endpoint_id)
    if endpoint is None:
        raise UserError(404, f"No such webhook endpoint: '{endpoint_id}'",
                        {"code": "resource_missing", "param": "id"})
    return endpoint


def _check_keys(data: dict[str, Any], allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            raise _invalid(f"Received unknown parameter: {key}", key)


def install(server: ModuleType) -> None:
    app = server.app

    async def create(request: Any) -> Any:
        data = await server.get_post_data(request) or {}
        data.pop("expand", None)
        _check_keys(data, _CREATE)
        if "url" not in data:
            raise _invalid("Missing required param: url.", "url")
        if "enabled_events" not in data:
            raise _invalid("Missing required param: enabled_events.", "enabled_events")
        version = data.get("api_version")
        if version is not None and (not isinstance(version, str) or not version):
            raise _invalid("Invalid api_version", "api_version")
        endpoint = {
            "id": "we_" + secrets.token_hex(12),
            "object": "webhook_endpoint",
            "api_version": version,  # null: the account's default version
            "application": None,
            "created": int(time.time()),
            "description": data.get("description"),
            "enabled_events": _events(data["enabled_events"]),
            "livemode": False,
            "metadata": _metadata(data.get("metadata"), {}),
            "secret": "whsec_" + secrets.token_hex(24),
            "status": "enabled",
            "url": _url(data["url"]),
        }
        _endpoints[endpoint["id"]] = endpoint
        _order.append(endpoint["id"])
        _register(endpoint)
        return server.json_response(endpoint)  # the only answer with the secret

    def retrieve(request: Any) -> Any:
        return server.json_response(_public(_get(request.match_info["id"])))

    async def update(request: Any) -> Any:
        endpoint = _get(request.match_info["id"])
        data = await server.get_post_data(request) or {}
        data.pop("expand", None)
        _check_keys(data, _UPDATE)
        changed = dict(endpoint)
        if "url" in data:
            changed["url"] = _url(data["url"])
        if "enabled_events" in data:
            changed["enabled_events"] = _events(data["enabled_events"])
        if "description" in data:
            changed["description"] = data["description"] or None
        if "metadata" in data:
            changed["metadata"] = _metadata(data["metadata"], endpoint["metadata"])
        if "disabled" in data:
            disabled = try_convert_to_bool(data["disabled"])
            if not isinstance(disabled, bool):
                raise _invalid("disabled must be a boolean", "disabled")
            changed["status"] = "disabled" if disabled else "enabled"
        endpoint.update(changed)
        _register(endpoint)
        return server.json_response(_public(endpoint))

    def delete(request: Any) -> Any:
        endpoint = _get(request.match_info["id"])
        del _endpoints[endpoint["id"]]
        _order.remove(endpoint["id"])
        webhooks._webhooks.pop(endpoint["id"], None)
        return server.json_response({"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True})

    def list_all(request: Any) -> Any:
        query = server.unflatten_data(request.query)
        try:
            limit = int(query.get("limit", 10))
        except ValueError:
            raise _invalid("limit must be an integer", "limit") from None
        if not 1 <= limit <= 100:
            raise _invalid("limit must be between 1 and 100", "limit")
        ids = list(reversed(_order))  # newest first, as Stripe lists
        after = query.get("starting_after")
        if after:
            if after not in _endpoints:
                raise _invalid(f"No such webhook endpoint: '{after}'", "starting_after")
            ids = ids[ids.index(after) + 1:]
        page = ids[:limit]
        return server.json_response({"object": "list", "url": _PATH, "has_more": len(ids) > limit,
                                     "data": [_public(_endpoints[i]) for i in page]})

    app.router.add_post(_PATH, create)
    app.router.add_get(_PATH, list_all)
    app.router.add_get(_PATH + "/{id}", retrieve)
    app.router.add_post(_PATH + "/{id}", update)
    app.router.add_delete(_PATH + "/{id}", delete)
