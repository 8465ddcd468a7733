"""Whole-system smoke test of an installed wheel (run by scripts/wheel-smoke with the
wheel's own virtualenv, from an empty folder): only the wheel and its dependencies are
importable here, not the checkout.  Needs the system Postgres.

1. `paystream migrate` creates the full schema from the migrations inside the wheel.
2. `paystream serve` answers /readyz 503 naming the missing migration on a database that
   lacks one, and 200 once migrated.
3. A Stripe-signed webhook is pushed to a waiting SSE stream.
4. `paystream dev` serves /demo, its SDK bundle, and a checkout.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

import paystream

ADMIN = os.environ.get("PAYSTREAM_TEST_SYSTEM_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BIN = Path(sys.executable).parent / "paystream"
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append((name, ok, detail))
    print(f"{'ok' if ok else 'FAILED'}: {name}{'' if ok else ' - ' + detail}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen[bytes], log: Path, ok=lambda r: r.status_code == 200,  # noqa: ANN001
         timeout: float = 60) -> httpx.Response:
    """Poll another process's start-up (nothing to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            resp = httpx.get(url, timeout=2)
            if ok(resp):
                return resp
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not as wanted in {timeout}s: {log.read_text()[-2000:]}")


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def sign(body: str, secret: str) -> str:
    t = int(time.time())
    digest = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def main() -> int:
    installed = Path(paystream.__file__).resolve()
    check("paystream is imported from the wheel's virtualenv", "site-packages" in installed.parts, str(installed))
    name = f"paystream_wheel_{secrets.token_hex(4)}"
    asyncio.run(admin(f"CREATE DATABASE {name}"))
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "DATABASE_URL": url, "STRIPE_API_KEY": "sk_test_x", "PAYSTREAM_API_KEY": "psk_x",
           "STRIPE_WEBHOOK_SECRET": "whsec_smoke", "PAYSTREAM_TOKEN_SECRET": "t" * 32}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # serve on an empty database: not ready, and it says what is missing
        port = free_port()
        log = tmp / "serve-empty.log"
        proc = subprocess.Popen([BIN, "serve", "--port", str(port)], env=env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        resp = wait(f"http://127.0.0.1:{port}/readyz", proc, log, ok=lambda r: r.status_code in (200, 503))
        check("serve on an unmigrated database answers /readyz 503", resp.status_code == 503,
              f"{resp.status_code} {resp.text}")
        check("… with checks.schema false", resp.json()["checks"].get("schema") is False, resp.text)
        proc.terminate()
        proc.wait(20)
        check("… and one log line names the missing migration",
              "001_core.sql" in log.read_text() and "paystream migrate" in log.read_text(), log.read_text()[-500:])

        out = subprocess.run([BIN, "migrate"], env=env, capture_output=True, text=True, timeout=120)
        check("paystream migrate applies the wheel's migrations", out.returncode == 0 and "001_core.sql" in out.stdout,
              out.stdout + out.stderr)

        async def tables() -> set[str]:
            conn = await asyncpg.connect(url)
            try:
                return {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            finally:
                await conn.close()

        have = asyncio.run(tables())
        check("the full schema exists", {"transactions", "stripe_events", "transaction_events", "ledger_entries",
                                          "outbox"} <= have, str(sorted(have)))

        log = tmp / "serve.log"
        proc = subprocess.Popen([BIN, "serve", "--port", str(port)], env=env, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        wait(f"http://127.0.0.1:{port}/readyz", proc, log)
        check("serve is ready once migrated", True)
        base = f"http://127.0.0.1:{port}"
        pi = "pi_wheel" + secrets.token_hex(8)
        token = subprocess.run([BIN, "token", "--txn", pi], env=env, capture_output=True, text=True,
                               check=True).stdout.strip()

        def event(etype: str, status: str, created: int) -> str:
            return json.dumps({"id": "evt_" + secrets.token_hex(12), "object": "event", "type": etype,
                               "created": created, "api_version": "2025-03-31.basil", "livemode": False,
                               "data": {"object": {"id": pi, "object": "payment_intent", "amount": 1500,
                                                   "currency": "usd", "status": status, "metadata": {}}}})

        async def push() -> list[str]:
            async with httpx.AsyncClient(base_url=base, timeout=15) as client:
                body = event("payment_intent.processing", "processing", int(time.time()) - 5)
                resp = await client.post("/v1/stripe/webhook", content=body,
                                         headers={"Stripe-Signature": sign(body, "whsec_smoke")})
                assert resp.status_code == 200, resp.text
                seen: list[str] = []
                async with client.stream("GET", f"/v1/transactions/{pi}/events", params={"token": token}) as stream:
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line.startswith("event: snapshot"):
                            seen.append("snapshot")
                            body = event("payment_intent.succeeded", "succeeded", int(time.time()))
                            resp = await client.post("/v1/stripe/webhook", content=body,
                                                     headers={"Stripe-Signature": sign(body, "whsec_smoke")})
                            assert resp.status_code == 200, resp.text
                        elif line.startswith("data:") and seen == ["snapshot"] and '"succeeded"' in line:
                            seen.append("succeeded")
                return seen

        seen = asyncio.run(asyncio.wait_for(push(), 30))
        check("a signed webhook is pushed over SSE", seen == ["snapshot", "succeeded"], str(seen))
        proc.terminate()
        proc.wait(20)

        # paystream dev from the wheel: embedded Postgres, localstripe, /demo
        dev_port = free_port()
        log = tmp / "dev.log"
        dev_env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STRIPE_API_BASE")}
        proc = subprocess.Popen([BIN, "dev", "--port", str(dev_port)], env=dev_env, cwd=tmp,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        procs.append(proc)
        wait(f"http://127.0.0.1:{dev_port}/readyz", proc, log, timeout=120)
        page = httpx.get(f"http://127.0.0.1:{dev_port}/demo", timeout=10)
        check("dev serves /demo from the wheel", page.status_code == 200 and "paystream" in page.text, str(page))
        sdk = httpx.get(f"http://127.0.0.1:{dev_port}/demo/paystream.js", timeout=10)
        check("… with the SDK bundle the wheel carries", sdk.status_code == 200 and len(sdk.content) > 1000,
              f"{sdk.status_code} {sdk.text[:200]}")
        made = httpx.post(f"http://127.0.0.1:{dev_port}/demo/api/checkout", timeout=30)
        check("… and a checkout through the local Stripe", made.status_code == 201, made.text)
        proc.terminate()
        proc.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    passed = sum(ok for _, ok, _ in results)
    print(f"wheel smoke: {passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
