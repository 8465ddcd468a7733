"""What every load generator here shares: percentiles, machine facts, a server to test."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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
