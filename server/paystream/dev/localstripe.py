"""The local Stripe stand-in (the `localstripe` package) for `paystream dev` and tests.

Started with --from-scratch, or it reloads a pickle shared by every run on the machine.
It posts signed webhooks about 1 s late and never emits payment_intent.created,
.canceled or .amount_capturable_updated: `paystream trigger` sends those.
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from paystream.dev.processes import wait_until_up


class LocalStripe:
    def __init__(self, port: int, log_dir: Path | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        log_dir = log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"localstripe-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> LocalStripe:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localstripe", "--port", str(self.port), "--from-scratch"],
            stdout=log, stderr=log)
        atexit.register(self.stop)
        wait_until_up(self.proc, f"{self.url}/v1/customers", timeout,
                      lambda: f"see {self.log_path}", ready=lambda r: True)  # any answer: it is up
        return self

    def register_webhook(self, url: str, secret: str, name: str = "paystream") -> None:
        resp = httpx.post(f"{self.url}/_config/webhooks/{name}", data={"url": url, "secret": secret}, timeout=5)
        resp.raise_for_status()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
