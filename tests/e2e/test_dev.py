"""`paystream dev` owns what it starts: its embedded Postgres and localstripe end with it
however it ends (SIGTERM is in test_cli.py; here SIGKILL and a closed terminal), a start
after a crash begins clean, and localstripe listens on loopback only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests import harness

pytestmark = pytest.mark.e2e

SECRETS = ("DATABASE_URL", "STRIPE_API_BASE", "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET",
           "PAYSTREAM_API_KEY", "PAYSTREAM_TOKEN_SECRET")


@pytest.fixture
def data_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ps-dev-")  # short: Postgres' socket path is limited
    try:
        yield path
    finally:
        # Whatever a failed test left: its processes name this folder (Postgres) or were
        # started by a dev that did (localstripe writes its log here).
        for p in _named(path):
            p.kill()
        shutil.rmtree(path, ignore_errors=True)


def _named(data_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and data_dir in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


class Dev:
    """`paystream dev` in its own session, as from a terminal of its own."""

    def __init__(self, data_dir: str, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SECRETS}
        env["PAYSTREAM_DATA_DIR"] = data_dir
        self.data_dir, self.port = data_dir, port
        self.log = open(os.path.join(data_dir, f"dev-{time.monotonic_ns()}.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "paystream", "dev", "--port", str(port)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        harness.wait_until_up(self.proc, f"http://127.0.0.1:{port}/readyz", 90, self.output)

    def output(self) -> str:
        return harness.tail(Path(self.log.name), 30)

    def children(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        """(localstripe, the embedded postmaster)."""
        localstripe = [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                       if "localstripe" in " ".join(p.cmdline())]
        postmaster = [p for p in psutil.process_iter(["cmdline"])
                      if (p.info["cmdline"] or [""])[0].endswith("/postgres")
                      and self.data_dir in " ".join(p.info["cmdline"])]
        assert len(localstripe) == 1 and len(postmaster) == 1, (localstripe, postmaster, self.output())
        return localstripe, postmaster


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_gone(procs: list[psutil.Process], timeout: float = 30) -> list[str]:
    """Poll until none of `procs` runs; what still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [" ".join(p.cmdline()) for p in alive if _running(p)]


def test_sigkill_of_dev_leaves_nothing_and_the_next_dev_starts_clean(data_dir: str) -> None:
    port = harness.free_port()
    first = Dev(data_dir, port)
    localstripe, postmaster = first.children()
    # localstripe takes card numbers and signs webhooks: nothing off this machine reaches it.
    listening = {c.laddr.ip for c in localstripe[0].net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening

    first.proc.kill()
    first.proc.wait(10)
    assert _all_gone(localstripe + postmaster) == []

    second = Dev(data_dir, port)  # same folder, same port
    localstripe2, postmaster2 = second.children()
    assert postmaster2[0].pid != postmaster[0].pid
    second.proc.terminate()
    assert second.proc.wait(30) == 128 + signal.SIGTERM
    assert _all_gone(localstripe2 + postmaster2) == [], "the second dev stops the Postgres it runs on"
    assert _all_gone(_named(data_dir)) == []


def test_a_closed_terminal_stops_dev_and_everything_it_started(data_dir: str) -> None:
    dev = Dev(data_dir, harness.free_port())
    localstripe, postmaster = dev.children()
    os.killpg(dev.proc.pid, signal.SIGHUP)  # what a terminal sends its session's group as it closes
    dev.proc.wait(30)
    assert _all_gone(localstripe + postmaster) == []
    assert _all_gone(_named(data_dir)) == []  # nor anything else that works on its folder


def test_a_start_stops_the_postgres_a_crashed_dev_left_running(data_dir: str) -> None:
    """Everything of the first dev SIGKILLed at once, its watchdog too (kill -9 of all of
    them): the next dev stops the Postgres left behind, starts its own, and stops that."""
    port = harness.free_port()
    first = Dev(data_dir, port)
    _, postmaster = first.children()
    for p in psutil.Process(first.proc.pid).children(recursive=True):
        p.kill()
    first.proc.kill()
    first.proc.wait(10)
    assert _running(postmaster[0]), "the crash left the embedded Postgres running"

    second = Dev(data_dir, port)
    assert _all_gone(postmaster) == []
    assert "stopping the embedded Postgres" in second.output()
    localstripe2, postmaster2 = second.children()
    second.proc.terminate()
    assert second.proc.wait(30) == 128 + signal.SIGTERM
    assert _all_gone(localstripe2 + postmaster2 + _named(data_dir)) == []


def test_dev_without_the_sdk_bundle_says_so_at_start_and_on_the_page(data_dir: str) -> None:
    """As from a wheel built before scripts/sdk-install: no bundle where /demo looks."""
    import httpx

    port = harness.free_port()
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env["PAYSTREAM_DATA_DIR"] = data_dir
    # The same `paystream dev`, with the bundle's places pointing at nothing (uvicorn runs
    # the app in this process, so the module it imports is the one changed here).
    launcher = ("import sys; from pathlib import Path; import paystream.dev.demo as demo; "
                "demo.SDK_BUNDLES = (Path(sys.argv[1]),); from paystream.cli import main; "
                "sys.exit(main(['dev', '--port', sys.argv[2]]))")
    log = Path(data_dir) / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", launcher, f"{data_dir}/absent.js", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        harness.wait_until_up(proc, f"http://127.0.0.1:{port}/readyz", 90, lambda: harness.tail(log))
        page = httpx.get(f"http://127.0.0.1:{port}/demo", timeout=10).text
        assert '<div id="nosdk">' in page, "the page shows why it cannot work"
        assert httpx.get(f"http://127.0.0.1:{port}/demo/paystream.js", timeout=10).status_code == 503
        output = log.read_text()
        assert "WARNING        the SDK bundle is not built" in output, output  # dev's banner
        assert '"logger": "paystream.demo"' in output and "scripts/sdk-install" in output, output
    finally:
        proc.terminate()
        proc.wait(30)
