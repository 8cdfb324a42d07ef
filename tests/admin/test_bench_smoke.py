"""bench/admin_impact.py keeps working (its figures are judged by full runs, not here)."""

from __future__ import annotations

import shutil

import pytest

from tests.bench.kit import run_bench


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="needs Debian's postfix tools")
def test_admin_impact_bench_smoke_run_completes() -> None:
    done = run_bench("admin_impact", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| SMTP + impact previews |" in done.stdout
    assert "1000 devices released per preview" in done.stdout


@pytest.mark.slow
def test_policy_history_bench_smoke_run_completes() -> None:
    done = run_bench("policy_history", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1000 |")]
    assert len(rows) == 1, done.stdout
