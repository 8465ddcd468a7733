"""The atheris fuzzer over the webhook parser, a short run on every test run (the
longer runs are `tests/fuzz/fuzz_webhook.py -atheris_runs=N`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent / "fuzz"


def test_the_webhook_parser_survives_20000_fuzzed_signed_bodies(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus", corpus)
    result = subprocess.run(
        [sys.executable, str(HERE / "fuzz_webhook.py"), "-atheris_runs=20000", "-max_len=8192",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000" in result.stderr
