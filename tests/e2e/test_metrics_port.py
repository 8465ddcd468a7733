"""/metrics on the operator's port (PAYSTREAM_METRICS_PORT, issue 14): it shows the
process's file descriptors, memory and Python version, so the public port answers 404."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from paystream.dev.processes import free_port
from tests import harness
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.e2e


def metrics_port_server(database_url: str, workers: int) -> Iterator[tuple[harness.Server, int]]:
    port = free_port()
    while workers > 1 and not all(_free(p) for p in range(port, port + workers)):
        port = free_port()
    srv = harness.Server(database_url, {"PAYSTREAM_METRICS_PORT": str(port)}, log_dir=ARTIFACTS,
                         args=("--workers", str(workers)))
    srv.start()
    yield srv, port
    srv.stop()


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def scrape(port: int, timeout: float = 15) -> str:
    """The metrics on `port`, once its worker is up (/readyz answers when the first is)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/metrics").text
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def one_worker(database_url: str) -> Iterator[tuple[harness.Server, int]]:
    yield from metrics_port_server(database_url, 1)


@pytest.fixture
def two_workers(database_url: str) -> Iterator[tuple[harness.Server, int]]:
    yield from metrics_port_server(database_url, 2)


def test_metrics_move_to_their_own_port(one_worker: tuple[harness.Server, int]) -> None:
    srv, port = one_worker
    public = httpx.get(f"{srv.base_url}/metrics")
    assert public.status_code == 404 and public.json()["error"]["code"] == "not_found"
    assert "process_open_fds" not in public.text
    private = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert private.status_code == 200
    assert "paystream_webhooks_total" in private.text and "paystream_connections" in private.text
    assert httpx.get(f"{srv.base_url}/readyz").status_code == 200


def test_each_worker_serves_its_own_metrics_port(two_workers: tuple[harness.Server, int]) -> None:
    """With --workers 2, worker processes bind PORT and PORT+1, one each (a worker stops
    at the first port it binds, and a port has one owner): each port shows one process's
    counters, so scrape both."""
    srv, port = two_workers
    for p in (port, port + 1):
        assert "paystream_webhooks_total" in scrape(p)
    assert httpx.get(f"{srv.base_url}/metrics").status_code == 404
