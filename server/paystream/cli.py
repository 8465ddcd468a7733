"""`paystream …`: dev, serve, migrate, reconcile, events, deliveries, ledger, token, trigger, stripe-endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from paystream import __version__

if TYPE_CHECKING:
    from datetime import datetime

    from paystream.config import Settings
    from paystream.effects import Effects

DEV_SECRETS_FILE = "dev-secrets.json"


def _data_dir() -> Path:
    return Path(os.environ.get("PAYSTREAM_DATA_DIR", ".paystream"))


def _database_url(announce: bool) -> str:
    """DATABASE_URL, or the embedded Postgres kept under the data folder."""
    from paystream.changes import store

    # A command that moves transactions (reconcile, backfill, events --reprocess) announces
    # its changes the way the servers hear them: with PAYSTREAM_BROKER, queued in the outbox
    # (a server publishes them within a second), not NOTIFYed to no one.
    store.broker = bool(os.environ.get("PAYSTREAM_BROKER"))
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    from paystream.db import start_embedded

    url = start_embedded(_data_dir())
    if announce:
        print(f"paystream: embedded Postgres (data in {_data_dir().resolve()}/pgdata)", flush=True)
    os.environ["DATABASE_URL"] = url
    return url


def _dev_secrets() -> dict[str, str]:
    """Generated once per data folder, so tokens and webhook signatures survive a restart."""
    path = _data_dir() / DEV_SECRETS_FILE
    if path.exists():
        return json.loads(path.read_text())
    values = {
        "STRIPE_WEBHOOK_SECRET": "whsec_" + secrets.token_hex(16),
        "PAYSTREAM_API_KEY": "psk_dev_" + secrets.token_hex(16),
        "PAYSTREAM_TOKEN_SECRET": secrets.token_hex(32),
        "STRIPE_API_KEY": "sk_test_paystream_dev",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2))
    path.chmod(0o600)
    return values


def _secret(name: str) -> str:
    value = os.environ.get(name)
    if value:
        return value
    path = _data_dir() / DEV_SECRETS_FILE
    if path.exists():
        return json.loads(path.read_text())[name]
    raise SystemExit(f"paystream: {name} is not set (and no dev secrets in {path})")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _hang_up_as_terminate(signum: int, frame: object) -> None:
    """A closed terminal (SIGHUP) stops paystream the way SIGTERM does, shutdown and
    atexit clean-up included, rather than killing it where it stands."""
    os.kill(os.getpid(), signal.SIGTERM)


def _stop_cleanly_on_signals() -> None:
    # Before uvicorn runs (while Postgres and localstripe start, during migrations) and
    # after it: uvicorn handles SIGTERM itself in between, and re-raises it when done.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGHUP, _hang_up_as_terminate)


def _effects_or_exit(command: str, url: str | None = None) -> Effects:
    """The configured effects, or exit 2 with one line naming the one that cannot load
    (with `url`, a SQL effect's function must exist there too)."""
    from paystream import effects
    from paystream.config import Settings

    settings = Settings()
    try:
        active = effects.Effects(effects.load(settings.effects))
        if url:
            active = asyncio.run(_effects_for_database(active, url, settings.effects, settings.outbound_url))
    except effects.EffectLoadError as exc:
        print(f"paystream {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return effects.install(active)


async def _effects_for_database(active: Effects, url: str, effects_setting: str | None,
                                outbound_url: str | None) -> Effects:
    """The effects this database expects of a process with these settings (recorded by
    `paystream migrate`; see effects.resolve), their SQL functions checked to exist."""
    import asyncpg

    from paystream import effects

    # No statement cache: a few statements once, and through a transaction-mode pooler a
    # named one may land on a session that already has one of that name.
    conn = await asyncpg.connect(url, timeout=10, statement_cache_size=0)
    try:
        active = await effects.for_database(conn, effects_setting, outbound_url)
        await active.check(conn)
    finally:
        await conn.close()
    return active


def _examples_root() -> Path | None:
    """The checkout whose examples/ `paystream dev` enables (none from a bare wheel)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "examples" / "contract_revisions" / "__init__.py").is_file():
            return root
    return None


# The examples `paystream dev` enables, and the SQL example's migrations (a Python
# effect carries its own; a SQL function's schema is the merchant's to apply).
DEV_EFFECTS = "examples.contract_revisions:effect,sql:public.ad_sales_on_status"
DEV_SQL_MIGRATIONS = {"ad_sales": Path("examples") / "ad_sales" / "migrations"}


def _run_uvicorn(host: str, port: int, workers: int, access_log: bool,
                 factory: str = "paystream.app:create_app") -> None:
    import uvicorn

    from paystream.config import Settings
    from paystream.ops.logs import uvicorn_log_config

    settings = Settings()
    # uvicorn shuts down gracefully on SIGTERM, then restores the handler it found and
    # raises the signal again.  With the default handler that kills the process before
    # atexit runs, so `dev` (or `serve` without DATABASE_URL) left its embedded Postgres
    # and localstripe running.  This handler makes it a normal exit, status 143 as before.
    _stop_cleanly_on_signals()
    # Each worker serves its metrics port (PAYSTREAM_METRICS_PORT + 0 … N-1) and reads the
    # count from here, the name uvicorn and gunicorn use for it.
    os.environ["WEB_CONCURRENCY"] = str(workers)
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        # httptools with a deadline and a size bound on reading each request
        # (PAYSTREAM_HEADER_TIMEOUT): uvicorn alone never closes a connection that sends
        # nothing or stops half-way through its headers.
        http="paystream.auth.deadlines:BoundedHttpProtocol",
        # An idle keep-alive connection is closed after this many seconds.
        timeout_keep_alive=5,
        # A client's WebSocket message is a small JSON object: uvicorn refuses one larger
        # than this with close 1009 before buffering it (its default is 16 MiB).
        ws_max_size=settings.ws_max_message_bytes,
        # Status messages are ~300 bytes of JSON: compressing them saves nothing, and the
        # zlib state for permessage-deflate is ~50 KB per idle socket (tracemalloc).
        ws_per_message_deflate=False,
        # Leaves open sockets to the drain (PAYSTREAM_DRAIN_SECONDS) instead of closing all at once.
        ws="paystream.push.ws_protocol:DrainingWebSocketProtocol",
        access_log=access_log,
        # uvicorn by default believes X-Forwarded-For from FORWARDED_ALLOW_IPS (127.0.0.1) and
        # rewrites scope["client"] itself.  Off: the client address is decided only by
        # PAYSTREAM_TRUSTED_PROXIES (auth/access.address), so scope["client"] is the TCP peer
        # (and uvicorn's access lines name the peer, e.g. the load balancer).
        proxy_headers=False,
        # After SIGTERM uvicorn closes its listening socket at once and waits this long for
        # open connections: the drain (streams end spread over PAYSTREAM_DRAIN_SECONDS) plus
        # 5 s, and at least the 10 s in-flight webhooks always had to commit.
        timeout_graceful_shutdown=max(10.0, settings.drain_seconds + 5),
        # uvicorn's own lines (start-up, access, WebSocket) through paystream's formatter:
        # JSON like every other line, with tokens and secrets redacted.
        log_config=uvicorn_log_config(),
    )


def _port_or_exit(command: str, host: str, port: int) -> None:
    """Exit 1 with one line unless host:port can be listened on.

    uvicorn binds only after the app's start-up, so a taken port showed up as a full
    start (an embedded Postgres, localstripe, migrations) and then errno 98.  Checked
    first, the way uvicorn will bind (SO_REUSEADDR), nothing starts for nothing."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        why = ("address already in use (another process listens there; choose another with --port)"
               if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        print(f"paystream {command}: cannot listen on {host}:{port}: {why}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from paystream.config import Settings

    missing = Settings().missing_secrets()
    if missing:
        print(f"paystream serve: refusing to start: {', '.join(missing)} not set", file=sys.stderr)
        return 2
    from paystream.outbound.delivery import config_problem

    problem = config_problem(Settings())
    if problem:
        print(f"paystream serve: refusing to start: {problem}", file=sys.stderr)
        return 2
    host, port = args.host or os.environ.get("HOST", "127.0.0.1"), args.port or int(os.environ.get("PORT", "8000"))
    _port_or_exit("serve", host, port)
    _stop_cleanly_on_signals()
    url = _database_url(announce=True)
    _effects_or_exit("serve", url)
    _run_uvicorn(host, port, args.workers, args.access_log)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    _port_or_exit("dev", args.host, args.port)
    _stop_cleanly_on_signals()
    for name, value in _dev_secrets().items():
        os.environ.setdefault(name, value)
    # One node: nowhere else for clients to go, so a restart should not wait out a drain.
    os.environ.setdefault("PAYSTREAM_DRAIN_SECONDS", "0")
    url = _database_url(announce=True)
    from paystream import db
    from paystream.auth.origins import AllowedOrigins
    from paystream.dev.demo import NO_SDK, sdk_bundle

    # Pages on any local port may use the dev server (a checkout page under development).
    os.environ.setdefault("PAYSTREAM_ALLOWED_ORIGINS",
                          f"http://{args.host}:{args.port},http://localhost:*,http://127.0.0.1:*")
    examples = _examples_root()
    extra: dict[str, Path] = {}
    if examples is not None:
        sys.path.insert(0, str(examples))
        os.environ.setdefault("PAYSTREAM_EFFECTS", DEV_EFFECTS)
        extra = {name: examples / folder for name, folder in DEV_SQL_MIGRATIONS.items()}
    active = _effects_or_exit("dev")
    asyncio.run(db.migrate(url, {**active.migrations(), **extra}))
    host, port = args.host, args.port
    base = f"http://{host}:{port}"
    stripe_line = f"  Stripe         {os.environ.get('STRIPE_API_BASE', 'api.stripe.com')}"
    if not os.environ.get("STRIPE_API_BASE"):
        from paystream.dev.localstripe import LocalStripe
        from paystream.dev.processes import free_port

        # localstripe with prices and Checkout Sessions (the demo's plan and hosted page);
        # its sessions send the customer to the demo's stand-in for Stripe's page.
        os.environ.setdefault("PAYSTREAM_EMULATOR_CHECKOUT_PAGE", f"{base}/demo/hosted/")
        local = LocalStripe(free_port(), _data_dir(), pid_file=_data_dir() / "localstripe.pid",
                            extensions="paystream.dev.emulator").start()
        local.register_webhook(f"{base}/v1/stripe/webhook", os.environ["STRIPE_WEBHOOK_SECRET"].split(",")[0])
        os.environ["STRIPE_API_BASE"] = local.url
        stripe_line = f"  local Stripe   {local.url} (localstripe with prices and Checkout; cards 4242…, 3-D Secure 4000 0000 0000 3220, decline …0341)"
    print(
        "\n".join([
            "",
            f"  paystream dev  {base}",
            f"  demo           {base}/demo" + ("" if sdk_bundle() else f"\n  WARNING        {NO_SDK}"),
            f"  webhook        {base}/v1/stripe/webhook",
            f"  database       {db.redact(url)}",
            stripe_line,
            f"  effects        {', '.join(active.names)}",
            f"  origins        {AllowedOrigins(os.environ['PAYSTREAM_ALLOWED_ORIGINS']).describe()}",
            f"  API key        {os.environ['PAYSTREAM_API_KEY']}",
            f"  webhook secret {os.environ['STRIPE_WEBHOOK_SECRET']}",
            "",
            "  try:  paystream trigger payment_intent.succeeded --id pi_demo123",
            "",
        ]),
        flush=True,
    )
    _run_uvicorn(host, port, 1, access_log=True, factory="paystream.dev.demo:create_app")
    return 0


def _stripe_command(command: str) -> tuple[Settings, str]:
    """Settings and the database URL of a command that calls Stripe, or exit 2 without a key."""
    from paystream.config import Settings

    settings = Settings()
    if not settings.stripe_api_key:
        print(f"paystream {command}: STRIPE_API_KEY is not set", file=sys.stderr)
        raise SystemExit(2)
    return settings, _database_url(announce=False)


def cmd_reconcile(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from paystream import db
    from paystream.payments.recovery import Recovery, Report
    from paystream.payments.stripe_api import StripeApi

    if args.report:
        return _reconcile_report(args)
    if args.since is not None:
        print("paystream reconcile: --since goes with --report", file=sys.stderr)
        return 2
    settings, url = _stripe_command("reconcile")
    _effects_or_exit("reconcile", url)  # it applies what it reads from Stripe

    async def once() -> Report:
        pool = await db.create_pool(url, 2)
        try:
            recovery = Recovery(pool, StripeApi.from_settings(settings),
                                stuck_after=timedelta(seconds=900 if args.older_than is None
                                                      else args.older_than),
                                parked_expiry=timedelta(seconds=settings.parked_expiry_seconds))
            report = Report()
            await recovery.run_outbox(report)
            await recovery.sweep(report, args.id or None)
            return await recovery.count_stuck(report)
        finally:
            await pool.close()

    report = asyncio.run(once())
    print(json.dumps(report.__dict__))
    return 1 if report.errors else 0


def _reconcile_report(args: argparse.Namespace) -> int:
    """`paystream reconcile --report`: compare, change nothing (no effects are loaded)."""
    from datetime import UTC, datetime, timedelta

    from paystream import db
    from paystream.payments import reconcile_report
    from paystream.payments.stripe_api import StripeApi

    if args.id or args.older_than is not None:
        print("paystream reconcile: --report takes --since, not --id or --older-than", file=sys.stderr)
        return 2
    settings, url = _stripe_command("reconcile")
    summary = reconcile_report.Summary(args.since or datetime.now(UTC) - timedelta(days=1))

    async def run() -> None:
        pool = await db.create_pool(url, 2)
        try:
            async for difference in reconcile_report.report(pool, StripeApi.from_settings(settings), summary):
                print(json.dumps(difference.as_json()), flush=True)
        finally:
            await pool.close()

    asyncio.run(run())
    print(json.dumps({"summary": summary.as_json()}))
    return 1 if summary.differences or not summary.complete else 0


def cmd_events(args: argparse.Namespace) -> int:
    from paystream import db
    from paystream.ingest import webhooks

    url = _database_url(announce=False)
    where = {
        "failed": "outcome = 'failed'",
        "unprocessed": "processed_at IS NULL",
        "unrouted": "outcome = 'unrouted'",
        "invalid": "outcome = 'invalid'",
        "mismatched": "outcome = 'mismatched'",
        "expired": "outcome = 'expired'",
        "ignored": "outcome = 'ignored'",
        "all": "true",
    }[args.which]
    if args.reprocess:
        _effects_or_exit("events", url)

    async def run() -> int:
        pool = await db.create_pool(url, 2)
        try:
            if args.reprocess:
                ids = args.id or [r["id"] for r in await pool.fetch(
                    f"SELECT id FROM stripe_events WHERE processed_at IS NULL AND {where}"
                    " ORDER BY received_at LIMIT $1", args.limit)]
                failures = 0
                for event_id in ids:
                    try:
                        outcome = await webhooks.reprocess(pool, event_id)
                    except Exception as exc:  # report and go on: one bad event must not stop the rest
                        outcome, failures = f"failed: {type(exc).__name__}: {exc}", failures + 1
                    print(json.dumps({"id": event_id, "outcome": outcome}))
                return 1 if failures else 0
            rows = await pool.fetch(
                f"""SELECT id, type, object_id, outcome, error, attempts, received_at, processed_at,
                           transaction_id FROM stripe_events WHERE {where}
                     ORDER BY received_at DESC LIMIT $1""", args.limit)
            for r in rows:
                print(json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}))
            return 0
        finally:
            await pool.close()

    return asyncio.run(run())


def cmd_deliveries(args: argparse.Namespace) -> int:
    from paystream import db
    from paystream.outbound import delivery as outbound

    url = _database_url(announce=False)

    async def run() -> int:
        pool = await db.create_pool(url, 2)
        try:
            if not args.replay:
                for row in await outbound.listing(pool, args.which, args.limit):
                    print(json.dumps(row))
                return 0
            keys = args.replay
            if "all" in keys:  # every delivery the listing shows
                keys = [str(r["id"]) for r in await outbound.listing(pool, args.which, args.limit)]
            replayed, unknown = await outbound.replay(pool, keys)
            for row in replayed:
                print(json.dumps(row))
            for key in unknown:
                print(f"paystream deliveries: no delivery {key!r}", file=sys.stderr)
            return 1 if unknown else 0
        finally:
            await pool.close()

    return asyncio.run(run())


def _duration(text: str) -> int:
    """Seconds in '90', '90s', '15m', '6h' or '3d'."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:], None)
    number = text[:-1] if scale else text
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 6h or 3d")
    return int(number) * (scale or 1)


def _timestamp(text: str) -> datetime:
    """An ISO 8601 time ('2025-06-01', '2025-06-01T12:00:00Z'; UTC when no offset) or a
    duration ago ('90m', '6h', '3d')."""
    from datetime import UTC, datetime, timedelta

    try:
        return datetime.now(UTC) - timedelta(seconds=_duration(text))
    except argparse.ArgumentTypeError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a time such as 2025-06-01T12:00:00Z "
                                         "nor a duration such as 6h") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_ledger(args: argparse.Namespace) -> int:
    from paystream import db
    from paystream.effects import ledger

    url = _database_url(announce=False)
    scope = {"transaction": args.transaction, "customer": args.customer, "since": args.since}

    async def run() -> int:
        pool = await db.create_pool(url, 2)
        try:
            if not args.check:
                async for line in ledger.report(pool, **scope):
                    print(json.dumps(line))
                return 0
            problems = 0
            async for problem in ledger.check(pool, **scope):
                problems += 1
                print(json.dumps(problem))
            print(json.dumps({"problems": problems}))
            return 1 if problems else 0
        finally:
            await pool.close()

    return asyncio.run(run())


def cmd_backfill(args: argparse.Namespace) -> int:
    import time

    from paystream import db
    from paystream.ingest.backfill import backfill
    from paystream.payments.stripe_api import StripeApi

    settings, url = _stripe_command("backfill")
    _effects_or_exit("backfill", url)

    async def once() -> dict:
        pool = await db.create_pool(url, 2)
        try:
            since = int(time.time()) - args.since if args.since is not None else None
            report = await backfill(pool, StripeApi.from_settings(settings), since)
            return report.as_json()
        finally:
            await pool.close()

    report = asyncio.run(once())
    print(json.dumps(report))
    return 1 if report["errors"] else 0


def cmd_prune(args: argparse.Namespace) -> int:
    from paystream import db
    from paystream.config import Settings
    from paystream.ops.retention import Retention, prune

    url = _database_url(announce=False)
    retention = Retention.from_settings(Settings())

    async def once() -> dict:
        pool = await db.create_pool(url, 3)
        try:
            missing = await db.missing_migrations(pool)
            if missing:
                raise SystemExit(f"paystream prune: the schema is behind ({', '.join(missing)}): "
                                 "run `paystream migrate` first")
            return (await prune(pool, retention, dry_run=args.dry_run)).as_json()
        finally:
            await pool.close()

    report = asyncio.run(once())
    print(json.dumps(report))
    if not report["ran"]:
        print("paystream prune: another process is pruning now; nothing done", file=sys.stderr)
    for error in report["errors"]:
        print(f"paystream prune: {error}", file=sys.stderr)
    return 1 if report["errors"] else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from paystream import db, effects
    from paystream.config import Settings

    extra = {}
    for spec in args.dir:
        name, _, folder = spec.rpartition("=")
        path = Path(folder)
        extra[name or (path.resolve().parent.name if path.name == "migrations" else path.name)] = path
    active = _effects_or_exit("migrate")
    url = _database_url(announce=True)
    settings = Settings()
    expected = effects.Configuration.of(settings.effects, settings.outbound_url)
    try:
        applied = asyncio.run(db.migrate(url, {**active.migrations(), **extra}, record_effects=expected))
    except RuntimeError as exc:
        print(f"paystream migrate: {exc}", file=sys.stderr)
        return 2
    print(f"paystream migrate: applied {', '.join(applied)}" if applied else
          "paystream migrate: schema is up to date")
    made = asyncio.run(_partitions_ahead(url, settings))
    if made:
        print(f"paystream migrate: made {len(made)} partitions of stripe_events ahead")
    print(f"paystream migrate: every process applies effects {', '.join(active.names) or 'none'}; "
          f"signed webhooks to the merchant's backend {'on' if expected.outbound else 'off'} "
          "(from PAYSTREAM_EFFECTS and PAYSTREAM_OUTBOUND_URL)")
    return 0


async def _partitions_ahead(url: str, settings: object) -> list[str]:
    """stripe_events' partitions for now and ahead, as a server makes them at start-up, so
    that nothing lands in the default partition until one does."""
    from paystream import db
    from paystream.ops.retention import Retention, ensure_partitions

    pool = await db.create_pool(url, 2)
    try:
        # (Not with a schema from before migration 017: PAYSTREAM_MIGRATIONS naming older files.)
        if await pool.fetchval("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass('stripe_events')"):
            return await ensure_partitions(pool, Retention.from_settings(settings))
        return []
    finally:
        await pool.close()


def cmd_token(args: argparse.Namespace) -> int:
    from paystream.auth import tokens
    from paystream.config import Settings

    if not args.txn and not args.cus:
        print("paystream token: give --txn ID (repeatable) or --cus CUSTOMER", file=sys.stderr)
        return 2
    max_ttl = Settings().max_token_ttl
    if not 1 <= args.ttl <= max_ttl:
        print(f"paystream token: --ttl must be from 1 to {max_ttl} seconds (PAYSTREAM_MAX_TOKEN_TTL)", file=sys.stderr)
        return 2
    token, _exp = tokens.mint(_secret("PAYSTREAM_TOKEN_SECRET"), txn=args.txn, cus=args.cus,
                              ttl_seconds=args.ttl)
    print(token)
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    import httpx

    from paystream.dev import trigger

    metadata = dict(kv.split("=", 1) for kv in args.metadata)
    try:
        event = trigger.build(args.event, args.id, amount=args.amount, currency=args.currency,
                              customer=args.customer, metadata=metadata,
                              amount_refunded=args.amount_refunded, dispute_id=args.dispute_id,
                              dispute_status=args.dispute_status)
    except ValueError as exc:
        print(f"paystream trigger: {exc}", file=sys.stderr)
        return 2
    body = trigger.encode(event)
    secret = _secret("STRIPE_WEBHOOK_SECRET").split(",")[0].strip()
    url = args.url or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/v1/stripe/webhook"
    try:
        resp = httpx.post(url, content=body, timeout=10, headers={
            "Content-Type": "application/json", "Stripe-Signature": trigger.sign(body, secret)})
    except httpx.HTTPError as exc:
        print(f"paystream trigger: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{event['type']} {event['id']} -> {resp.status_code} {resp.text}")
    return 0 if resp.is_success else 1


def cmd_stripe_endpoint(args: argparse.Namespace) -> int:
    from paystream.config import Settings
    from paystream.payments import endpoint
    from paystream.payments.stripe_api import StripeApi, StripeFailure

    settings = Settings()
    if not settings.stripe_api_key:
        print("paystream stripe-endpoint: STRIPE_API_KEY is not set", file=sys.stderr)
        return 2
    if not args.url.startswith(("https://", "http://")):
        print(f"paystream stripe-endpoint: {args.url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    api = StripeApi(settings.stripe_api_key, settings.stripe_api_base)
    try:
        report = asyncio.run(endpoint.ensure(api, args.url, check=args.check, recreate=args.recreate))
    except StripeFailure as failure:
        print(f"paystream stripe-endpoint: {failure.message}", file=sys.stderr)
        return 1
    for line in report.lines:
        print(line)
    if report.secret:
        # Shown by Stripe only now: the one chance to keep it.
        print(f"signing secret (set STRIPE_WEBHOOK_SECRET to it; Stripe will not show it again): {report.secret}")
    return 1 if report.differs else 0


def build_parser() -> argparse.ArgumentParser:
    from paystream.dev.trigger import TRIGGERABLE

    parser = argparse.ArgumentParser(
        prog="paystream",
        description="Realtime payment-status push: Stripe webhook -> Postgres NOTIFY -> "
                    "SSE / WebSocket / long-poll.",
    )
    parser.add_argument("--version", action="version", version=f"paystream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("dev", help="zero set-up: embedded Postgres, local Stripe, generated secrets",
                       description="Run paystream locally with no configuration: the /demo shop (a payment, a "
                       "subscription, Stripe Checkout through a stand-in page and its return page), an embedded "
                       "Postgres under .paystream/ (unless DATABASE_URL is set), a local Stripe "
                       "stand-in (localstripe with prices and Checkout Sessions, unless STRIPE_API_BASE is set) posting signed "
                       "webhooks here, generated dev secrets (kept in .paystream/dev-secrets.json), "
                       "migrations, and the server. On SIGTERM (or SIGHUP: a closed terminal) streams end at once "
                       "(PAYSTREAM_DRAIN_SECONDS defaults to 0 here: one node, nowhere to drain to). "
                       "The embedded Postgres and localstripe (on 127.0.0.1) stop with it however it ends, "
                       "SIGKILL included.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("serve", help="production server: config from the environment",
                       description="Serve with uvicorn. Needs STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET, "
                       "PAYSTREAM_API_KEY and PAYSTREAM_TOKEN_SECRET; uses DATABASE_URL "
                       "(unset: the embedded Postgres), HOST and PORT.",
                       epilog="client bounds: PAYSTREAM_HEADER_TIMEOUT (seconds to deliver a whole "
                       "request, default 10), PAYSTREAM_WS_MAX_MESSAGE (bytes per WebSocket message, "
                       "default 4096; larger closes with 1009), PAYSTREAM_WS_MESSAGE_RATE and "
                       "PAYSTREAM_WS_MESSAGE_BURST (messages per second per socket, default 20 in "
                       "bursts of 40; more closes with 4029), PAYSTREAM_MAX_CONNECTIONS_PER_ADDRESS (open "
                       "connections one client address may hold, per worker, default 1000; one more is "
                       "answered 429 and closed; a trusted proxy is not capped; near the file limit, "
                       "descriptors are kept for the database and health checks, other new "
                       "connections get 503). metrics: PAYSTREAM_METRICS_PORT (serve "
                       "/metrics there, on PAYSTREAM_METRICS_HOST, default 127.0.0.1, instead of the "
                       "public port; with --workers N, one port per worker: PORT ... PORT+N-1). "
                       "shutdown: on SIGTERM the listening socket closes at once and open streams end "
                       "spread over PAYSTREAM_DRAIN_SECONDS (default 10; 0 ends them all at once) while "
                       "in-flight requests finish; the process exits with 143 after. "
                       "several nodes: PAYSTREAM_LISTEN_URL (the LISTEN connection, straight to "
                       "Postgres when DATABASE_URL is a transaction pooler, with "
                       "PAYSTREAM_DB_POOLER=transaction); PAYSTREAM_BROKER=nats://host:port (NATS "
                       "JetStream instead of LISTEN/NOTIFY between nodes; stream "
                       "PAYSTREAM_BROKER_NAME, default paystream); PAYSTREAM_NOTIFY_EVENTS (default "
                       "1: a change's notification carries the event when under 7,500 bytes, so "
                       "nodes push without reading the log; 0: ids only). behind a load balancer: "
                       "PAYSTREAM_TRUSTED_PROXIES (its IPs or CIDR networks, comma-separated: their "
                       "X-Forwarded-For or Forwarded header names the client for per-address "
                       "limits; default none).")
    p.add_argument("--host", default=None, help="default: $HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: $PORT or 8000")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1); stream limits are counted in each")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply the schema: paystream's, and its effects'",
                       description="Apply every migration not yet recorded in paystream_schema_version "
                       "(DATABASE_URL, or the embedded Postgres): paystream's own (db/migrations, "
                       "carried inside the package), then those of each effect that brings a "
                       "`migrations` folder (PAYSTREAM_EFFECTS), then each --dir. `paystream serve` "
                       "does not migrate: it answers /readyz 503, naming what is missing, until this ran. "
                       "It also records PAYSTREAM_EFFECTS and whether PAYSTREAM_OUTBOUND_URL is set as "
                       "the effects every process on this database runs: a serve set to others refuses "
                       "to start; backfill, events --reprocess and reconcile run them from any environment.")
    p.add_argument("--dir", action="append", default=[], metavar="[NAME=]DIR",
                   help="also apply the numbered *.sql files in DIR, recorded as component NAME "
                        "(default: the folder's name, or its parent's if it is called migrations)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("reconcile", help="re-check stuck transactions with Stripe once, now; or report differences",
                       description="Run the recovery pass once: pending Stripe calls from the "
                       "outbox, then re-read from Stripe every transaction not settled with no news "
                       "for --older-than, and release authorisations left uncaptured past their "
                       "authorization_days (default 7). Prints what it did as JSON (`stuck`: "
                       "transactions still unsettled past --older-than); exits 1 if a Stripe call failed. "
                       "With --report it changes nothing: it reads from Stripe every transaction touched "
                       "since --since and prints each difference from what paystream holds as a JSON line "
                       "({transaction_id, stripe_id, kind, field, ours, stripe}; fields: status, amount, "
                       "amount_refunded, dispute), then {\"summary\": {since, checked, differences, fields, "
                       "complete, errors}}; exits 1 if anything differs or Stripe could not be read "
                       "for every transaction (complete false). Servers run the report every "
                       "PAYSTREAM_RECONCILE_INTERVAL seconds (default 86400; 0: never), one at a time.")
    p.add_argument("--older-than", type=float, default=None, metavar="SECONDS",
                   help="how long a transaction must have been without news (default 900)")
    p.add_argument("--id", action="append", default=[], metavar="ID",
                   help="re-check only this txn_ or pi_ id (repeatable)")
    p.add_argument("--report", action="store_true",
                   help="change nothing: print each difference from Stripe as a JSON line, then a summary")
    p.add_argument("--since", type=_timestamp, default=None, metavar="TIME",
                   help="with --report: transactions touched from TIME on (ISO 8601, or a duration ago "
                        "such as 6h; default 24h)")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("events", help="list stored Stripe events; re-process failed ones",
                       description="List stored Stripe events as JSON lines (newest first), or "
                       "with --reprocess apply unprocessed ones again (oldest first), e.g. after a "
                       "fix for the error they failed with. A processed event is never applied twice.")
    p.add_argument("which", nargs="?", default="failed", choices=["failed", "unprocessed", "unrouted", "invalid", "mismatched", "expired", "ignored", "all"],
                   help="which events (default: failed)")
    p.add_argument("--reprocess", action="store_true", help="apply them again")
    p.add_argument("--id", action="append", default=[], metavar="EVT", help="only this event (repeatable)")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("deliveries", help="list outgoing webhooks to your backend; replay them",
                       description="List the signed webhooks sent to PAYSTREAM_OUTBOUND_URL as JSON "
                       "lines (newest first), or with --replay queue deliveries again (a failed or "
                       "delivered one is sent again with the same webhook-id and a fresh retry "
                       "schedule, after any earlier pending event of its transaction).")
    p.add_argument("which", nargs="?", default="failed", choices=["pending", "failed", "delivered", "all"],
                   help="which deliveries (default: failed)")
    p.add_argument("--replay", action="append", default=[], metavar="ID",
                   help="queue this delivery again: its id or webhook-id (repeatable); "
                        "`all` replays every one listed")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_deliveries)

    p = sub.add_parser("backfill", help="apply Stripe events that never arrived, from Stripe's event log",
                       description="List Stripe's events (GET /v1/events; Stripe keeps 30 days) created since "
                       "--since ago, or by default since the newest stored event minus an hour, and apply each "
                       "one not stored yet through the webhook's own path (same idempotency, order rules and "
                       "effects), oldest first. One backfill runs at a time across all processes (every "
                       "server also runs one at start-up and every PAYSTREAM_BACKFILL_INTERVAL). Prints what "
                       "it did as JSON; exits 1 if any event failed.")
    p.add_argument("--since", type=_duration, default=None, metavar="DURATION",
                   help="how far back, e.g. 90m, 6h, 3d (default: from the newest stored event minus 1h)")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("prune", help="apply the retention once: drop and delete what is past it (JSON)",
                       description="One retention pass, as every server runs each PAYSTREAM_PRUNE_INTERVAL "
                       "(default 3600 s), one process at a time: make stripe_events' partitions ahead; drop "
                       "each partition of Stripe events wholly older than PAYSTREAM_RETAIN_STRIPE_EVENTS "
                       "(default 35 days); delete delivered outbound webhooks and finished outbox jobs older "
                       "than PAYSTREAM_RETAIN_DELIVERED (7 days) and idempotency keys older than "
                       "PAYSTREAM_RETAIN_IDEMPOTENCY_KEYS (24 hours). 0 keeps a kind forever. The transaction "
                       "log, the ledger, refunds and transactions are never pruned. Prints one JSON object: "
                       "partitions made, dropped (bytes freed) and kept, rows deleted per table; "
                       "\"ran\": false when another process was pruning. Events not processed are moved "
                       "forward out of a partition before it goes. Exits 1 if a step failed (\"errors\").")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing: list the partitions and count the rows that would go")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("ledger", help="print the ledger of money movements; check it",
                       description="Print ledger entries as JSON lines ({\"entry\": …}, oldest first), then "
                       "each account's balance over them ({\"balance\": {account, currency, amount}}; "
                       "credits positive). Accounts: stripe:clearing, merchant:revenue, stripe:disputed, "
                       "wallet:<customer>. With --check print instead each problem as a JSON line (a group "
                       "that does not sum to zero in its currency, a transaction whose entries disagree "
                       "with its status, amount, amount_refunded or dispute), then {\"problems\": N}; "
                       "exit 1 if N > 0.")
    p.add_argument("--transaction", default=None, metavar="ID", help="only this txn_ or Stripe id")
    p.add_argument("--customer", default=None, metavar="ID",
                   help="only this customer's transactions and wallet")
    p.add_argument("--since", type=_timestamp, default=None, metavar="TIME",
                   help="only entries from TIME on (ISO 8601, or a duration ago such as 6h); "
                        "with --check, transactions touched since")
    p.add_argument("--check", action="store_true", help="report problems instead; exit 1 if any")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("token", help="mint a stream token (JWT) for a browser",
                       description="Mint a stream token signed with PAYSTREAM_TOKEN_SECRET "
                       "(or the dev secret).")
    p.add_argument("--txn", action="append", default=[], metavar="ID",
                   help="a txn_ or Stripe id the token opens (repeatable)")
    p.add_argument("--cus", default=None, metavar="CUSTOMER", help="open all of this customer's")
    p.add_argument("--ttl", type=int, default=3600,
                   help="seconds until it expires (default 3600; at most PAYSTREAM_MAX_TOKEN_TTL)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("trigger", help="build, sign and POST a Stripe event, like `stripe trigger`",
                       description="Build a realistic Stripe event, sign it with "
                       "STRIPE_WEBHOOK_SECRET as Stripe does, and POST it to the webhook.",
                       epilog="events: " + ", ".join(TRIGGERABLE))
    p.add_argument("event", metavar="EVENT", help="e.g. payment_intent.succeeded")
    p.add_argument("--id", required=True, help="the PaymentIntent id (pi_…)")
    p.add_argument("--amount", type=int, default=1500, help="in the smallest unit (default 1500)")
    p.add_argument("--amount-refunded", type=int, default=None, help="charge.refunded: partial")
    p.add_argument("--dispute-id", default=None, help="charge.dispute.*: the dispute (du_…), to close one")
    p.add_argument("--dispute-status", default=None,
                   help="charge.dispute.*: its status (default needs_response when created, won when closed)")
    p.add_argument("--currency", default="usd")
    p.add_argument("--customer", default=None)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--url", default=None,
                   help="webhook URL (default http://127.0.0.1:$PORT/v1/stripe/webhook)")
    p.set_defaults(func=cmd_trigger)
    p = sub.add_parser("stripe-endpoint", help="create or update your webhook endpoint at Stripe",
                       description="Create, or update, the Stripe webhook endpoint for URL (your "
                       "public https://…/v1/stripe/webhook) with exactly the event types paystream "
                       "reads and the API version it reads them in, enabled. Found by its URL: running "
                       "it again updates that endpoint, never adds one. On creation it prints the "
                       "signing secret, once (Stripe shows it only then): set STRIPE_WEBHOOK_SECRET "
                       "to it. Needs STRIPE_API_KEY (and STRIPE_API_BASE for a Stripe stand-in). "
                       "Exits 1 if something still differs, 2 without STRIPE_API_KEY.")
    p.add_argument("url", metavar="URL", help="the endpoint's URL, e.g. https://pay.example.com/v1/stripe/webhook")
    p.add_argument("--check", action="store_true",
                   help="change nothing: say what differs on the existing endpoint (exit 1 if anything does)")
    p.add_argument("--recreate", action="store_true",
                   help="replace the endpoint when its API version differs (Stripe cannot change it in "
                        "place; the new endpoint has a new signing secret)")
    p.set_defaults(func=cmd_stripe_endpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as exc:
        # A setting from the environment that cannot be right: one line per setting, named
        # as the operator wrote it, instead of a traceback.
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            value = error.get("input")
            print(f"paystream: {name}={value!r}: {error['msg']}", file=sys.stderr)
        return 2
