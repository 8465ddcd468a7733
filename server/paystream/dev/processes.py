"""Starting a helper process and waiting until it answers: localstripe under `paystream
dev`; the test and benchmark harnesses start paystream itself the same way."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen[bytes], url: str, timeout: float,
                  log_tail: Callable[[], str],
                  ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200) -> None:
    """Poll another process's start-up (there is nothing to await across processes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}: {log_tail()}")
        try:
            if ready(httpx.get(url, timeout=1)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[:3]} not ready in {timeout}s: {log_tail()}")
