"""Running a benchmark module the way a developer does (`python -m bench.X ...`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m bench.<module> <args>`` from the repository, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
