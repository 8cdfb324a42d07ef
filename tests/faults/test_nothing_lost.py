"""The nothing-lost harness at CI size; `python -m tests.faults.nothing_lost` runs it large."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.nothing_lost import run
from tests.hold.conftest import have_postgres


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


@pytest.mark.slow
async def test_release_under_store_faults_kills_and_refusals_loses_nothing(tmp_path: Path) -> None:
    """The held mail is released while the store's lock is taken and (as root) its disk
    fills, the proxy cuts connections and the gateway is killed; half the held messages
    name a recipient the upstream now refuses; three large ones are held under a memory
    cgroup where the machine has one."""
    from gateway.config.settings import HoldSettings
    from gateway.hold.release import DELETE_BATCH

    report = await run(
        tmp_path, messages=80, clients=4, kills=1, release=True, release_kills=1,
        chaos_seconds=5, large=3, large_size=4 << 20, memory_limit_mib=256,
    )  # fmt: skip
    print(report.summary())
    assert report.violations == []
    assert report.unexpected_exits == 0  # never killed for memory, never crashed
    assert report.held == report.released > 0  # the store is empty: all of it went out
    assert report.bounced > 0  # each refused recipient got its DSN (else a violation)
    assert report.lock_faults > 0
    if report.disk_full.startswith("on"):
        assert report.disk_full_faults > 0
    # Duplicates only from what was in flight at a kill or a cut connection.
    in_flight = HoldSettings().release_concurrency + DELETE_BATCH
    assert report.release_duplicates <= report.release_kills * in_flight + report.release_cuts
    assert report.peak_rss_mib < 256


@pytest.mark.slow
@pytest.mark.skipif(not have_postgres(), reason="PostgreSQL not installed")
async def test_nothing_lost_on_postgresql_through_database_restarts(tmp_path: Path) -> None:
    """The same harness with the held mail in PostgreSQL: the database is stopped for a
    second twice while messages are sent (holds get 451 and are retried) and once while
    they are released; a gateway is killed in each phase."""
    report = await run(
        tmp_path, messages=80, clients=4, kills=1, release=True, release_kills=1,
        chaos_seconds=5, postgres=True, store_restarts=2,
    )  # fmt: skip
    print(report.summary())
    assert report.violations == []
    assert report.unexpected_exits == 0
    assert report.store_restarts == 3
    assert report.held == report.released > 0
    assert report.bounced > 0
