"""bench/admin_impact.py keeps working (its figures are judged by full runs, not here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="needs Debian's postfix tools")
def test_admin_impact_bench_smoke_run_completes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.admin_impact", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| SMTP + impact previews |" in done.stdout
    assert "1000 devices released per preview" in done.stdout
