"""A merchant effect for tests, written only against paystream's public interface: it
records every call, and fails on purpose while its switch says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Probe:
    name = "probe"
    migrations = Path(__file__).parent / "migrations"

    async def on_status(self, conn: Any, transaction: dict[str, Any],
                        previous_status: str | None) -> dict[str, Any] | None:
        if transaction["metadata"].get("probe") == "explode" and await conn.fetchval("SELECT broken FROM probe_switch"):
            raise RuntimeError("probe: the merchant's effect failed on purpose")
        calls = await conn.fetchval(
            """INSERT INTO probe_calls (transaction_id, seq, status, previous_status, cause_type)
               VALUES ($1, $2, $3, $4, $5) RETURNING (SELECT count(*) + 1 FROM probe_calls WHERE transaction_id = $1)""",
            transaction["id"], transaction["seq"], transaction["status"], previous_status,
            transaction["cause"]["type"])
        return {"probe": {"calls": calls}, "status": "never overwrites the contract's fields"}


effect = Probe()
