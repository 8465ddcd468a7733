"""/openapi.json describes the API truthfully: schemathesis generates requests from it
(valid and invalid) against the running server and checks every answer."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Paystream

pytestmark = pytest.mark.e2e


async def test_the_served_description_is_valid_openapi(ps: Paystream) -> None:
    spec = (await ps.http.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/transactions", "/v1/transactions/{id}", "/v1/transactions/{id}/events",
            "/v1/stream-tokens", "/v1/stripe/webhook"} <= set(spec["paths"])


# A long-poll waits by design (up to `timeout`, 25 s by default) when it is given a real id
# and `await` or `after`: the fuzzer finds real ids, and its requests time out at 10 s.
# Its long-polls answer at once; tests/e2e/test_longpoll.py covers `timeout` itself.
CONFIG = """
[[operations]]
include-path = "/v1/transactions/{id}"
include-method = "GET"
parameters = { "query.timeout" = 0 }
"""


async def test_schemathesis_finds_no_server_error_or_contract_break(ps: Paystream, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is a test dependency"
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    args = [cli, "--config-file", str(config), "run", f"{ps.server.base_url}/openapi.json", "--no-color",
            "-H", f"Authorization: Bearer {ps.server.api_key}",
            # Streams stay open by design (tests/e2e/test_sse.py covers them); and
            # negative_data_rejection counts an ignored unknown query key (say
            # `last_event_id[a]=1`) as a failure, which is a serialisation style, not a bug.
            "--exclude-path", "/v1/transactions/{id}/events",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                        "response_schema_conformance",
            "--phases", "coverage,fuzzing", "--max-examples", "30", "--seed", "20261122"]
    result = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
