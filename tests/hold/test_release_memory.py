"""Release and expiry decide from metadata and load bodies a bounded batch at a time
(defect 1 of the durability issue): memory does not grow with the number or size of held
messages.

Measured with tracemalloc around one pass, in the gateway's own process; the held mail
went in over real SMTP sessions into a real SQLite file. bench/held_rss.py measures the
RSS of a serving process across release ticks.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import RunningGateway
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import ReceivedMessage
from tests.hold.kit import held_mail_gateway
from tests.stories import TIKTOK, tiktok_ban

MESSAGES = 16
MIB = 1024 * 1024
BIG = make_message(body=("x" * 510 + "\r\n") * 2048)  # 1 MiB
QUARTER = make_message(body=("x" * 510 + "\r\n") * 512)  # 256 KiB: four to a read batch


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def _peak(during: Callable[[], Awaitable[object]]) -> int:
    """Peak bytes allocated by Python while ``during`` runs (the body bytes included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        await during()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


async def _hold_big_messages(
    gateway: RunningGateway, issuer: TestIssuer, message: bytes = BIG, count: int = MESSAGES
) -> None:
    device = FakeDevice(issuer, apps={TIKTOK})
    for _ in range(count):
        assert (await device.send(gateway.port, message=message, timeout=30)).accepted


async def test_a_pass_over_mail_that_stays_held_loads_no_bodies(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with held_mail_gateway(tmp_path, issuer) as (gateway, _upstream):
        await _hold_big_messages(gateway, issuer)
        releaser = gateway.server.services.releaser
        peak = await _peak(releaser.run)
        assert peak < 2 * MIB, f"{peak / MIB:.1f} MiB for {MESSAGES} MiB held"


@pytest.mark.parametrize(
    ("message", "count"),
    [(BIG, MESSAGES), (QUARTER, 4 * MESSAGES)],
    ids=["1-MiB-messages-one-per-read", "256-KiB-messages-read-four-at-a-time"],
)
async def test_releasing_loads_a_bounded_batch_of_bodies_at_a_time(
    tmp_path: Path, issuer: TestIssuer, message: bytes, count: int
) -> None:
    """16 MiB held from one device either way; a lane reads at most READ_BATCH_BYTES of
    its bodies (or one larger body) per query."""
    async with held_mail_gateway(tmp_path, issuer) as (gateway, upstream):
        await _hold_big_messages(gateway, issuer, message, count)
        (gateway.policy_dir / "ban.toml").write_text(tiktok_ban("hold", state="retracted"))
        await gateway.server.reload("test")
        await gateway.server.services.releaser.idle()
        releaser = gateway.server.services.releaser
        received: list[int] = []

        def count_and_forget(message: ReceivedMessage) -> None:
            # The fake upstream runs in this process: keep only sizes, not 16 MiB.
            received.append(len(message.content))
            upstream.messages.remove(message)

        upstream.faults.on_accept = count_and_forget
        peak = await _peak(releaser.run)
        assert len(received) == count
        # A batch of bodies, and the copies both ends of the SMTP connection make of one.
        assert peak < 6 * MIB, f"{peak / MIB:.1f} MiB to release {count} x {len(message)} B"


async def test_expiry_pages_and_reads_only_headers(tmp_path: Path, issuer: TestIssuer) -> None:
    clock = [datetime.now(UTC)]
    async with held_mail_gateway(
        tmp_path, issuer, extra="expire_after_hours = 1\n", clock=lambda: clock[0]
    ) as (gateway, upstream):
        await _hold_big_messages(gateway, issuer)
        clock[0] += timedelta(hours=2)
        releaser = gateway.server.services.releaser
        peak = await _peak(releaser.expire)
        assert peak < 2 * MIB, f"{peak / MIB:.1f} MiB to expire {MESSAGES} x 1 MiB"
        await releaser.run()  # the bounces (headers only) go out
        bounces = await upstream.wait_for(MESSAGES)
    assert {b.sender for b in bounces} == {""}
    assert max(len(b.content) for b in bounces) < 16 * 1024


def _bytes_read() -> int:
    """Bytes this process has read through read()/pread() (Linux /proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


async def test_a_pass_reads_metadata_from_disk_not_the_bodies(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Bodies live apart from metadata (held_bodies): SQLite reads a row's columns in
    order, so metadata after a BLOB in the same row made every pass read every body."""
    if not os.path.exists("/proc/self/io"):  # noqa: ASYNC240
        pytest.skip("needs Linux /proc/self/io")
    async with held_mail_gateway(tmp_path, issuer) as (gateway, _upstream):
        await _hold_big_messages(gateway, issuer)
    # A fresh connection, so that nothing is in SQLite's page cache.
    store = HoldStore(tmp_path / "hold.db")
    try:
        before = _bytes_read()
        due = store.due(datetime.now(UTC) + timedelta(days=1))
        read = _bytes_read() - before
        assert len(due) == MESSAGES
        assert read < MIB, f"{read / MIB:.1f} MiB read to list {MESSAGES} x 1 MiB held"
        assert store.content(due[0].hold_id) is not None
    finally:
        store.close()


async def test_a_lane_frees_the_body_it_sent_before_it_reads_the_next(
    tmp_path: Path, issuer: TestIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four 600 KiB messages of one device: one body per read batch. When the lane reads
    its next batch, no body it has sent is still referenced (counted with a bytes
    subclass that knows how many of it are alive)."""
    alive = [0]

    class Body(bytes):
        def __init__(self, *_: object) -> None:
            alive[0] += 1

        def __del__(self) -> None:
            alive[0] -= 1

    message = make_message(body=("x" * 510 + "\r\n") * 1200)
    async with held_mail_gateway(tmp_path, issuer) as (gateway, upstream):
        await _hold_big_messages(gateway, issuer, message, 4)
        releaser = gateway.server.services.releaser
        await releaser.idle()
        alive_at_each_read: list[int] = []
        contents = releaser.store.contents

        async def counted(hold_ids: list[str]) -> dict[str, bytes]:
            alive_at_each_read.append(alive[0])
            return {k: Body(v) for k, v in (await contents(hold_ids)).items()}

        monkeypatch.setattr(releaser.store, "contents", counted)
        (gateway.policy_dir / "ban.toml").write_text(tiktok_ban("hold", state="retracted"))
        await gateway.server.reload("test")
        await releaser.idle()
        await releaser.run()
        await upstream.wait_for(4)
    assert alive_at_each_read == [0, 0, 0, 0]
