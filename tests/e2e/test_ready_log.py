""""paystream ready on …" is logged only when /readyz would answer 200; otherwise the log
says why not, and a port that is taken is one line and a non-zero exit."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests import harness
from tests.conftest import Server
from tests.support import Paystream, wait_until

pytestmark = pytest.mark.e2e

READY = "paystream ready on"


@pytest.fixture
def unmigrated_url(database_url: str) -> Iterator[str]:
    """A new, empty database beside the test's own: nobody ran `paystream migrate` on it."""
    admin = urlunsplit(urlsplit(database_url)._replace(path="/postgres"))
    name = f"paystream_bare_{secrets.token_hex(4)}"
    asyncio.run(harness._admin(admin, f"CREATE DATABASE {name}"))
    yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    asyncio.run(harness._admin(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


async def test_serve_on_an_unmigrated_database_says_why_it_is_not_ready(unmigrated_url: str) -> None:
    srv = Server(unmigrated_url)
    await asyncio.to_thread(srv.start, 30, lambda r: r.status_code == 503)
    try:
        async def says_why() -> bool:
            log = srv.log_path.read_text()
            return "not ready" in log and "paystream migrate" in log
        await wait_until(says_why, timeout=15, what="the not-ready line")
        assert READY not in srv.log_path.read_text(), srv.log_tail()

        # Once the schema is there, /readyz turns 200 and only then the log says ready.
        env = {**os.environ, "DATABASE_URL": unmigrated_url}
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "paystream", "migrate"],
                                       env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        async with Paystream(srv) as ps:
            async def ready() -> bool:
                return (await ps.http.get("/readyz")).status_code == 200
            await wait_until(ready, timeout=15, what="/readyz 200")
        await wait_until(lambda: _logged(srv, READY), timeout=15, what="the ready line")
    finally:
        srv.stop()


async def _logged(srv: Server, text: str) -> bool:
    return text in srv.log_path.read_text()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "paystream", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line_refusal(result: subprocess.CompletedProcess[str], port: int) -> None:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, output
    assert READY not in output, output
    assert output.splitlines() == [output], output  # one line, no traceback, no start-up chatter
    assert str(port) in output and "in use" in output, output


def test_serve_on_a_taken_port_exits_with_one_line(database_url: str, taken_port: int) -> None:
    srv = Server(database_url)  # its secrets and database: everything right but the port
    env = {**srv.env, "PORT": str(taken_port)}
    _one_line_refusal(_run(["serve"], env), taken_port)


def test_dev_on_a_taken_port_exits_with_one_line_and_starts_nothing(taken_port: int) -> None:
    data_dir = tempfile.mkdtemp(prefix="ps-dev-")
    try:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "STRIPE_API_BASE", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET",
                            "PAYSTREAM_API_KEY", "PAYSTREAM_TOKEN_SECRET")}
        env["PAYSTREAM_DATA_DIR"] = data_dir
        _one_line_refusal(_run(["dev", "--port", str(taken_port)], env), taken_port)
        assert not os.path.exists(os.path.join(data_dir, "pgdata")), "no Postgres started for nothing"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
