"""Several `paystream serve` nodes on one database behind a real HAProxy (Debian's package),
run with the very configuration docs/scale-out.md shows (docs/haproxy.cfg).

tests/e2e/test_load_balancer.py uses the classes; the SDK's test (client-sdk/test/lb.test.mjs)
runs `python -m tests.balancer`, which starts a cluster and takes commands on stdin, one a
line, answering each with one JSON line on stdout:

    start NAME           start a node and wait until HAProxy's health check has it UP
    kill NAME            SIGKILL a node and wait for the process to end (HAProxy not waited on)
    wait NAME STATUS     wait until HAProxy reports the node UP or DOWN
    quit (or EOF)        stop HAProxy and every node, drop the database
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from paystream.dev.processes import free_port, wait_until_up
from tests.harness import ROOT, FreshDatabase, Server, stop_process, system_reachable, tail

HAPROXY_CFG = ROOT / "docs" / "haproxy.cfg"
# Test-only, beside docs/scale-out.md's file: HAProxy's stats page, so a test can see which nodes
# the health check has up or down (`haproxy -f a -f b` reads both).
STATS_CFG = """\
listen stats
    bind "${PAYSTREAM_LB_STATS}"
    no log
    stats enable
    stats uri /stats
"""
# HAProxy connects to the nodes from this address: the nodes trust it, and only it.
BALANCER_ADDRESS = "127.0.0.1"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


class _Daemon:
    """A balancer process of the test's own: stopped with SIGTERM (HAProxy under -db, and
    nginx, stop at once on it; nginx's SIGQUIT would wait for open streams), its folder removed."""

    proc: subprocess.Popen[bytes] | None
    dir: Path
    log_path: Path

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 40) -> str:
        return tail(self.log_path, n)


class HAProxy(_Daemon):
    """HAProxy in the foreground (-db) on a free port, in front of `nodes` (name → host:port)."""

    def __init__(self, nodes: dict[str, str], log_dir: Path) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.binary = binary
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://{BALANCER_ADDRESS}:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}/stats"
        self.dir = Path(tempfile.mkdtemp(prefix="paystream-haproxy-"))
        (self.dir / "stats.cfg").write_text(STATS_CFG)
        self.env = {**os.environ, "PAYSTREAM_LB_BIND": f"{BALANCER_ADDRESS}:{self.port}",
                    "PAYSTREAM_LB_STATS": f"127.0.0.1:{self.stats_port}",
                    **{f"PAYSTREAM_{name.upper()}": address for name, address in nodes.items()}}
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"haproxy-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> HAProxy:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(HAPROXY_CFG), "-f", str(self.dir / "stats.cfg")],
                                     env=self.env, stdout=log, stderr=log)
        wait_until_up(self.proc, self.stats_url, timeout, self.log_tail)
        return self

    def servers(self) -> dict[str, str]:
        """The backend's servers and the status HAProxy gives each (UP, DOWN, …)."""
        text = httpx.get(f"{self.stats_url};csv", timeout=5).text.lstrip("# ")
        return {row["svname"]: row["status"].split()[0] for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "nodes" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_status(self, name: str, status: str, timeout: float = 20) -> None:
        """Wait for the health check's verdict (another process's: there is nothing to await)."""
        deadline = time.monotonic() + timeout
        while (seen := self.servers().get(name)) != status:
            if time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy has {name} {seen}, not {status}, after {timeout} s")
            time.sleep(0.05)



NGINX_CONF = ROOT / "docs" / "nginx.conf"
# The addresses docs/nginx.conf is written with; the test puts its own in their place.
NGINX_EXAMPLE_NODES = ("10.0.0.11:8000", "10.0.0.12:8000", "10.0.0.13:8000")
NGINX_EXAMPLE_LISTEN = "listen 8080;"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class Nginx(_Daemon):
    """nginx in the foreground on a free port, with docs/nginx.conf as its `http` block's
    content and `nodes` (host:port, three) in place of the example addresses."""

    def __init__(self, nodes: list[str], log_dir: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
        self.binary = binary
        self.port = free_port()
        self.url = f"http://{BALANCER_ADDRESS}:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="paystream-nginx-"))
        self.dir.chmod(0o755)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"nginx-{self.port}.log"
        site = NGINX_CONF.read_text()
        for example, node in zip(NGINX_EXAMPLE_NODES, nodes, strict=True):
            assert example in site, f"{NGINX_CONF} names no {example}"
            site = site.replace(example, node)
        assert NGINX_EXAMPLE_LISTEN in site, f"{NGINX_CONF} has no `{NGINX_EXAMPLE_LISTEN}`"
        site = site.replace(NGINX_EXAMPLE_LISTEN, f"listen {BALANCER_ADDRESS}:{self.port};")
        (self.dir / "paystream.conf").write_text(site)
        temp = "\n    ".join(f"{kind}_temp_path {self.dir}/{kind};"
                              for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(f"""\
daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.log_path} notice;
events {{ worker_connections 1024; }}
http {{
    access_log {self.log_path};
    {temp}
    include {self.dir}/paystream.conf;
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> Nginx:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([self.binary, "-e", str(self.log_path), "-p", str(self.dir),
                                      "-c", str(self.dir / "nginx.conf")], stdout=log, stderr=log)
        wait_until_up(self.proc, f"{self.url}/healthz", timeout, self.log_tail)
        return self



class Cluster:
    """`size` nodes (node1 … nodeN) sharing one database and one set of secrets, behind HAProxy."""

    def __init__(self, database_url: str, size: int = 3, extra_env: dict[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.gettempdir())
        env = {"PAYSTREAM_TRUSTED_PROXIES": BALANCER_ADDRESS, "PAYSTREAM_BACKFILL_INTERVAL": "86400",
               **(extra_env or {})}
        first = Server(database_url, env, log_dir=self.log_dir)
        self.nodes: dict[str, Server] = {"node1": first}
        for i in range(2, size + 1):
            node = Server(database_url, env, log_dir=self.log_dir)
            for name in ("api_key", "webhook_secret", "rotated_secret", "token_secret"):
                setattr(node, name, getattr(first, name))
            for name in ("STRIPE_WEBHOOK_SECRET", "PAYSTREAM_API_KEY", "PAYSTREAM_TOKEN_SECRET"):
                node.env[name] = first.env[name]
            self.nodes[f"node{i}"] = node
        self.lb = HAProxy({name: f"127.0.0.1:{node.port}" for name, node in self.nodes.items()}, self.log_dir)
        # What a Paystream test client needs of a "server": one set of secrets, the balancer's URL.
        self.api_key, self.webhook_secret, self.token_secret = first.api_key, first.webhook_secret, first.token_secret
        self.rotated_secret = first.rotated_secret
        self.base_url = self.lb.url

    def start(self, names: list[str] | None = None) -> Cluster:
        """Start the named nodes (default: all), then HAProxy, and wait until HAProxy has
        those nodes up and the others down."""
        names = list(self.nodes) if names is None else names
        for name in names:
            self.nodes[name].start()
        self.lb.start()
        for name in self.nodes:
            self.lb.wait_status(name, "UP" if name in names else "DOWN")
        return self

    def start_node(self, name: str) -> None:
        self.nodes[name].start()
        self.lb.wait_status(name, "UP")

    def via(self, url: str) -> Cluster:
        """The same cluster, reached at `url` (another balancer in front of the same nodes)."""
        other = copy.copy(self)
        other.base_url = url
        return other

    def kill(self, name: str) -> int:
        proc = self.nodes[name].proc
        assert proc is not None and proc.poll() is None, f"{name} is not running"
        proc.send_signal(signal.SIGKILL)
        return proc.wait(10)

    def stop(self) -> None:
        self.lb.stop()
        for node in self.nodes.values():
            node.stop()


def _serve(args: argparse.Namespace) -> int:
    """The line protocol of the module docstring, for the SDK's test."""
    from paystream.dev.localstripe import LocalStripe

    backend = args.pg or ("system" if system_reachable() else "embedded")
    log_dir = Path(args.log_dir)
    database = FreshDatabase(backend)
    stripe = LocalStripe(free_port(), Path(tempfile.mkdtemp(prefix="paystream-lb-stripe-"))).start()
    cluster = Cluster(database.url, args.nodes, {"STRIPE_API_BASE": stripe.url}, log_dir)

    def say(**answer: object) -> None:
        print(json.dumps(answer), flush=True)

    try:
        cluster.start(args.start.split(",") if args.start else None)
        say(ready=True, pg=backend, lb=cluster.lb.url, stats=cluster.lb.stats_url,
            haproxy_log=str(cluster.lb.log_path),
            nodes={name: {"url": n.base_url, "log": str(n.log_path)} for name, n in cluster.nodes.items()},
            token_secret=cluster.token_secret, webhook_secret=cluster.webhook_secret, api_key=cluster.api_key)
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            try:
                if words[0] == "quit":
                    break
                if words[0] == "start":
                    cluster.start_node(words[1])
                    say(ok=line.strip())
                elif words[0] == "kill":
                    say(ok=line.strip(), exit=cluster.kill(words[1]))
                elif words[0] == "wait":
                    cluster.lb.wait_status(words[1], words[2])
                    say(ok=line.strip())
                else:
                    say(error=f"unknown command {words[0]!r}")
            except Exception as exc:  # noqa: BLE001 - answered, the test decides
                say(error=f"{line.strip()}: {exc}")
    finally:
        cluster.stop()
        stripe.stop()
        database.drop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.balancer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--start", help="nodes to start at first, comma-separated (default: all)")
    parser.add_argument("--pg", choices=("system", "embedded"), help="default: system if reachable")
    parser.add_argument("--log-dir", default=str(ROOT / "client-sdk" / "test-artifacts"))
    args = parser.parse_args()
    # Never left running: the test's end closes stdin (or sends SIGTERM).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())
