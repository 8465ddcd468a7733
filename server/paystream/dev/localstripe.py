"""The local Stripe stand-in (the `localstripe` package) for `paystream dev` and tests;
`paystream dev` runs it with `--extensions paystream.dev.emulator`.

Started with --from-scratch, or it reloads a pickle shared by every run on the machine.
It posts signed webhooks about 1 s late and never emits payment_intent.created,
.canceled or .amount_capturable_updated: `paystream trigger` sends those.

It runs through this module's own entry point (`python -m paystream.dev.localstripe`),
which listens on 127.0.0.1 only: localstripe's own binds every interface, IPv4 and IPv6,
and it takes card numbers and signs webhooks.  It dies with the process that started
it (on Linux, PR_SET_PDEATHSIG), and with a `pid_file` a start stops the one an earlier
start left behind whose starter is gone.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

from paystream.dev.processes import wait_until_up

_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGTERM when the starting thread ends (a SIGKILL of the
    starter included), and exit now if the starter is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class LocalStripe:
    def __init__(self, port: int, log_dir: Path | None = None, pid_file: Path | None = None,
                 module: str = "paystream.dev.localstripe", cwd: Path | None = None,
                 extensions: str | None = None) -> None:
        """`module` is what runs it (`python -m module --port N`, in `cwd`): this one, or
        one that adds resources to localstripe's app and then calls serve() (the tests'
        emulator).  `extensions` (this module only): a package whose install_all(server)
        extends localstripe first, as `paystream dev` runs it with paystream.dev.emulator."""
        self.port = port
        self.module, self.cwd = module, cwd
        self.extensions = extensions
        self.url = f"http://127.0.0.1:{port}"
        log_dir = log_dir or Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"localstripe-{port}.log"
        self.pid_file = pid_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> LocalStripe:
        if self.pid_file is not None:
            _stop_leftover(self.pid_file)
        log = self.log_path.open("ab")
        # PDEATHSIG follows the thread that forks, so only a main thread (which ends with
        # its process) may ask for it; a helper thread's start would die with the thread.
        parent = os.getpid()
        guard = (lambda: _die_with(parent)) if (
            sys.platform == "linux" and threading.current_thread() is threading.main_thread()) else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port),
             *(["--extensions", self.extensions] if self.extensions else [])],
            stdout=log, stderr=log, preexec_fn=guard, cwd=self.cwd)  # noqa: PLW1509 - no threads run it
        atexit.register(self.stop)
        if self.pid_file is not None:
            self.pid_file.write_text(json.dumps({"pid": self.proc.pid, "owner": parent}))
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


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_leftover(pid_file: Path) -> None:
    """Stop the localstripe an earlier start recorded here if whoever started it is gone
    (where PR_SET_PDEATHSIG is missing: it would have died with its starter)."""
    import psutil

    try:
        recorded = json.loads(pid_file.read_text())
        pid, owner = int(recorded["pid"]), int(recorded["owner"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if _alive(owner):
        return  # another dev on this folder is running: its localstripe is its own
    try:
        proc = psutil.Process(pid)
        if "paystream.dev.localstripe" not in " ".join(proc.cmdline()):
            return  # the pid was reused by something else
        proc.terminate()
        try:
            proc.wait(5)
        except psutil.TimeoutExpired:
            proc.kill()
    except psutil.Error:
        return  # gone already
    print(f"paystream: stopped the localstripe (pid {pid}) an earlier run left", file=sys.stderr)


def serve(port: int) -> None:
    """localstripe's own start-up (--from-scratch), on 127.0.0.1 instead of every interface."""
    import logging
    import socket

    from aiohttp import web
    from localstripe import server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.DEBUG)
    access.addHandler(logging.StreamHandler())
    web.run_app(server.app, sock=sock, access_log=access)


if __name__ == "__main__":
    import argparse
    import importlib

    parser = argparse.ArgumentParser(description="localstripe on 127.0.0.1, from scratch")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--extensions", help="a package whose install_all(server) extends localstripe first "
                        "(paystream.dev.emulator: prices, default_incomplete subscriptions, Checkout Sessions)")
    args = parser.parse_args()
    if args.extensions:
        from localstripe import server as localstripe_server

        importlib.import_module(args.extensions).install_all(localstripe_server)
    serve(args.port)
