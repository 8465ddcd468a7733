"""What every load generator here shares: percentiles, machine facts, a server to test."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summary(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {}
    return {f"p{p}": round(percentile(values_ms, p), 3) for p in (50, 90, 99)} | {
        "max": round(max(values_ms), 3), "mean": round(sum(values_ms) / len(values_ms), 3)}


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def save(name: str, line: dict[str, object], samples_ms: list[float] | None = None) -> None:
    """bench/results/NAME.json: the printed line plus raw latency samples, for report.py."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({**line, "samples_ms": samples_ms or []}))


@contextlib.contextmanager
def paystream(clients: int = 0, pg: str = "system", **env: str) -> Iterator[tuple[object, object]]:
    """A fresh database and `paystream serve` for one scenario, with uvloop for the client
    side; removed afterwards. `clients` raises the per-address stream limit above it."""
    import uvloop

    from tests.harness import FreshDatabase, Server

    database = FreshDatabase(pg)
    if clients:
        env = {"PAYSTREAM_MAX_STREAMS_PER_ADDRESS": str(clients + 100), **env}
    server = Server(database.url, env).start()
    uvloop.install()
    try:
        yield server, database
    finally:
        server.stop()
        database.drop()
