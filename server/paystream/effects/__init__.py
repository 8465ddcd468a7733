"""Side effects: what a transaction's move does, inside the database transaction that
logs it.  One interface for the built-in effects and a merchant's own, and how they are
loaded (PAYSTREAM_EFFECTS and the `paystream.effects` entry-point group).

An effect is called exactly once for every event paystream logs for a transaction (every
new seq), because it runs in the database transaction that writes that log row and the
log's (transaction_id, seq) is unique: a duplicate, late or concurrent delivery that logs
nothing calls nothing.  An exception aborts the whole change (the webhook answers 500, the
event is kept as failed, Stripe retries).  See docs/effects.md.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import asyncpg

log = logging.getLogger("paystream.effects")

ENTRY_POINT_GROUP = "paystream.effects"
_SQL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")


@runtime_checkable
class Effect(Protocol):
    """`transaction` is the transaction JSON exactly as it is pushed for this change (with
    `status`, `metadata`, `seq`, `previous_status` and `cause`); `previous_status` is the
    status before it (None for a transaction's first event).  Return None, or a dict of
    fields to add to the pushed event.  An effect may also have `migrations`: a folder of
    numbered SQL files that `paystream migrate` applies (as component `name`)."""

    name: str

    async def on_status(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None: ...


class EffectLoadError(Exception):
    """An effect named in the configuration cannot be loaded; the message names it."""


@dataclass(frozen=True, slots=True)
class SqlEffect:
    """A Postgres function, called as `SELECT schema.function($1::jsonb, $2::text)`.  If it
    returns a jsonb object, its fields are added to the pushed event."""

    function: str

    @property
    def name(self) -> str:
        return f"sql:{self.function}"

    async def on_status(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        result = await conn.fetchval(f"SELECT {self.function}($1::jsonb, $2::text)", transaction, previous_status)
        return result if isinstance(result, dict) else None

    async def check(self, conn: asyncpg.Connection) -> None:
        found = await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", f"{self.function}(jsonb, text)")
        if not found:
            raise EffectLoadError(f"effect {self.name}: no function {self.function}(jsonb, text) in the database")


def _load_one(spec: str) -> Effect:
    if spec.startswith("sql:"):
        function = spec[4:]
        if not _SQL_NAME.match(function):
            raise EffectLoadError(f"effect {spec!r}: write sql:schema.function")
        return SqlEffect(function)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise EffectLoadError(f"effect {spec!r}: write module:attribute or sql:schema.function")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise EffectLoadError(f"effect {spec!r} cannot be loaded: {exc}") from None
    return _checked(obj, spec)


def _checked(obj: Any, where: str) -> Effect:
    if isinstance(obj, type):
        obj = obj()  # a class: one instance per process
    if not isinstance(getattr(obj, "name", None), str) or not callable(getattr(obj, "on_status", None)):
        raise EffectLoadError(f"effect {where!r} has no `name` and `async def on_status(conn, transaction, "
                              "previous_status)`")
    return obj


def _registered() -> list[Effect]:
    """Effects installed packages register (paystream's own built-ins among them), by name."""
    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            found.append(_checked(ep.load(), f"{ep.name} = {ep.value}"))
        except EffectLoadError:
            raise
        except Exception as exc:
            raise EffectLoadError(f"effect {ep.name!r} ({ep.value}) cannot be loaded: {exc}") from None
    return found


def load(configured: str | None) -> list[Effect]:
    """The registered effects, then those named in PAYSTREAM_EFFECTS (comma-separated), in
    order; raise EffectLoadError naming the first that cannot be loaded."""
    effects = _registered()
    for spec in (s.strip() for s in (configured or "").split(",")):
        if spec:
            effects.append(_load_one(spec))
    names = [e.name for e in effects]
    twice = {n for n in names if names.count(n) > 1}
    if twice:
        raise EffectLoadError(f"effect {sorted(twice)[0]!r} is enabled twice")
    return effects


class Effects:
    """The effects one process runs, in order."""

    def __init__(self, effects: Sequence[Effect]) -> None:
        self.effects = tuple(effects)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.effects]

    def migrations(self) -> dict[str, Path]:
        """Schema folders the effects bring, by component name."""
        found = {}
        for effect in self.effects:
            folder = getattr(effect, "migrations", None)
            if folder is not None:
                found[effect.name] = Path(folder)
        return found

    async def check(self, conn: asyncpg.Connection) -> None:
        """Fail start-up, naming the effect, if a SQL effect's function does not exist."""
        for effect in self.effects:
            if isinstance(effect, SqlEffect):
                await effect.check(conn)

    async def run(self, conn: asyncpg.Connection, transaction: dict[str, Any],
                  previous_status: str | None) -> dict[str, Any]:
        """Call every effect for one logged event; the fields they add to the pushed event."""
        extra: dict[str, Any] = {}
        for effect in self.effects:
            added = await effect.on_status(conn, dict(transaction), previous_status)
            if added:
                extra.update(added)
        return extra


# --- what the database expects ---------------------------------------------------------
#
# Effects are a property of the database, not of whichever process applies an event: a
# backfill run without PAYSTREAM_OUTBOUND_URL once applied events whose signed webhooks
# were never queued.  `paystream migrate` records the configuration (table
# paystream_config, key "effects"); every process that applies events resolves its own
# against it (resolve()).

CONFIG_KEY = "effects"


@dataclass(frozen=True, slots=True)
class Configuration:
    """The merchant effects (PAYSTREAM_EFFECTS, normalised) and whether the built-in
    outbound effect queues signed webhooks (PAYSTREAM_OUTBOUND_URL set)."""

    specs: tuple[str, ...]
    outbound: bool

    @classmethod
    def of(cls, effects_setting: str | None, outbound_url: str | None) -> Configuration:
        return cls(tuple(s.strip() for s in (effects_setting or "").split(",") if s.strip()),
                   bool(outbound_url))

    @property
    def setting(self) -> str:
        return ",".join(self.specs)

    def as_json(self) -> dict[str, Any]:
        return {"effects": list(self.specs), "outbound": self.outbound}


async def recorded(conn: asyncpg.Connection | asyncpg.Pool) -> Configuration | None:
    """The configuration `paystream migrate` recorded; None if none was (or the schema
    predates the record)."""
    if not await conn.fetchval("SELECT to_regclass('paystream_config') IS NOT NULL"):
        return None
    value = await conn.fetchval("SELECT value::text FROM paystream_config WHERE key = $1", CONFIG_KEY)
    if value is None:
        return None
    import json

    data = json.loads(value)
    return Configuration(tuple(data.get("effects") or ()), bool(data.get("outbound")))


async def record(conn: asyncpg.Connection, configuration: Configuration) -> None:
    import json

    await conn.execute(
        """INSERT INTO paystream_config (key, value) VALUES ($1, $2::text::jsonb)
           ON CONFLICT (key) DO UPDATE SET value = excluded.value, recorded_at = clock_timestamp()""",
        CONFIG_KEY, json.dumps(configuration.as_json()))


class ConfigurationMismatch(EffectLoadError):
    """This process's settings ask for other effects than the database expects."""


def resolve(own: Configuration, expected: Configuration | None, *, effects_set: bool) -> Configuration:
    """The configuration a process that applies events runs.

    With nothing recorded, its own.  Otherwise the recorded one: PAYSTREAM_EFFECTS, when
    set (`effects_set`), must name exactly the recorded effects, and a process whose
    PAYSTREAM_OUTBOUND_URL is set may not queue webhooks on a database that does not
    expect them (either is a ConfigurationMismatch naming the setting).  A process
    without PAYSTREAM_OUTBOUND_URL on a database that expects webhooks still queues
    them: nodes that have the URL deliver them."""
    if expected is None:
        return own
    fix = "set it to match, or run `paystream migrate` with the new value to change what the database expects"
    if effects_set and own.specs != expected.specs:
        raise ConfigurationMismatch(
            f"PAYSTREAM_EFFECTS is {own.setting!r} but this database expects {expected.setting!r}: {fix}")
    if own.outbound and not expected.outbound:
        raise ConfigurationMismatch(
            "PAYSTREAM_OUTBOUND_URL is set but this database does not queue signed webhooks "
            "(recorded by `paystream migrate` without it): run `paystream migrate` with it set to turn them on")
    return expected


async def for_database(conn: asyncpg.Connection | asyncpg.Pool, effects_setting: str | None,
                       outbound_url: str | None) -> Effects:
    """The effects a process with these settings runs on this database (see resolve)."""
    own = Configuration.of(effects_setting, outbound_url)
    return build(resolve(own, await recorded(conn), effects_set=effects_setting is not None))


def build(configuration: Configuration) -> Effects:
    """The Effects for a configuration: the registered ones, then its merchant effects,
    with the outbound effect queueing as it says."""
    active = Effects(load(configuration.setting))
    for effect in active.effects:
        if effect.name == "outbound" and hasattr(effect, "enabled"):
            effect.enabled = configuration.outbound  # type: ignore[attr-defined]
    return active


_active: Effects | None = None


def install(effects: Effects) -> Effects:
    """Make `effects` the ones this process runs (at start-up)."""
    global _active  # noqa: PLW0603  # one configuration per process
    _active = effects
    return effects


def active() -> Effects:
    """The process's effects: those installed at start-up, else loaded from the
    environment on first use (a CLI command such as `paystream events --reprocess`)."""
    if _active is None:
        from paystream.config import Settings

        install(Effects(load(Settings().effects)))
    assert _active is not None
    return _active
