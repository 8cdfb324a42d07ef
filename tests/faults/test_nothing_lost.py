"""The nothing-lost harness at CI size; `python -m tests.faults.nothing_lost` runs it large."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.nothing_lost import run


@pytest.mark.slow
async def test_nothing_lost_under_faults_and_kills(tmp_path: Path) -> None:
    report = await run(tmp_path, messages=80, clients=4, kills=2)
    print(report.summary())  # shown with -s: the figures of this run
    assert report.violations == []
    assert report.kills == 2
    assert report.proxy_cuts + report.proxy_refusals > 0  # faults really happened
    assert report.accepted + report.refused + report.gave_up == report.messages
    assert report.accepted >= report.messages * 0.9  # retries get nearly everything through
    assert report.held > 0
