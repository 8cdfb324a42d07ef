"""Hold-store failures, SIGKILL during DATA, and clock jumps."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from base64 import b64encode
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.hold.store import HoldStore, held_rows
from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from gateway.testing.upstream import FakeUpstream
from tests.faults.nothing_lost import Gateway
from tests.security.test_smtp_input import authenticated, start_data
from tests.stories import TIKTOK, tiktok_ban

BAN = tiktok_ban("hold")


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


class FailingCommit:
    """A sqlite3 connection whose COMMIT fails as a full disk or a failed fsync would."""

    def __init__(self, inner: sqlite3.Connection, error: str) -> None:
        self.inner = inner
        self.error = error

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            raise sqlite3.OperationalError(self.error)
        return self.inner.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("error", ["database or disk is full", "disk I/O error"])
async def test_store_full_or_failing_to_sync_gives_451_and_no_row(
    tmp_path: Path, issuer: TestIssuer, error: str
) -> None:
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": BAN}) as (gw, upstream):
        store = gw.server.services.hold_store

        def break_commits(inner: HoldStore) -> None:
            inner._db = FailingCommit(inner._db, error)  # type: ignore[assignment]

        await store._run(break_commits)
        result = await FakeDevice(issuer, apps={TIKTOK}).send(gw.port)
        assert result.data == (451, "4.3.0 Temporary storage failure; please try again later")
        assert held_rows(gw.settings.hold.database) == []  # rolled back: no partial row
        assert upstream.messages == []


async def test_hold_store_really_full(tmp_path: Path, issuer: TestIssuer) -> None:
    """SQLite's own SQLITE_FULL (max_page_count), not a simulation of it."""
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": BAN}) as (gw, _):

        def cap(inner: HoldStore) -> None:
            pages = inner._db.execute("PRAGMA page_count").fetchone()[0]
            inner._db.execute(f"PRAGMA max_page_count = {pages + 2}")

        await gw.server.services.hold_store._run(cap)
        big = make_message(body=("x" * 900 + "\r\n") * 200)
        result = await FakeDevice(issuer, apps={TIKTOK}).send(gw.port, message=big)
        assert result.data == (451, "4.3.0 Temporary storage failure; please try again later")
        assert held_rows(gw.settings.hold.database) == []


@pytest.mark.slow
async def test_sigkill_during_data_leaves_no_ghost(tmp_path: Path, issuer: TestIssuer) -> None:
    """No 250 was sent, so nothing may appear: not upstream, not in the hold store."""
    async with FakeUpstream.running() as upstream:
        gateway = Gateway.configured(tmp_path, issuer, upstream.port, {"ban.toml": BAN})
        port = gateway.port
        await gateway.start()
        try:
            for apps in (set(), {TIKTOK}):  # a relayed and a held message, both cut mid-DATA
                device = FakeDevice(issuer, apps=apps)
                async with await RawSmtp.connect(port) as client:
                    assert (await client.reply())[0] == 220
                    await client.command("EHLO device.test")
                    blob = b64encode(plain_response(device.user, device.token()))
                    assert (await client.command(b"AUTH PLAIN " + blob))[0] == 235
                    await start_data(client)
                    await client.send(b"Subject: half\r\n\r\nthe first half of a message\r\n")
                    await asyncio.sleep(0.2)
                    await gateway.kill()
                    assert await client.closed()
                await gateway.start()
        finally:
            await gateway.stop()
        assert upstream.messages == []
        assert held_rows(tmp_path / "hold.db") == []


async def test_clock_jump_expires_tokens_but_not_sessions(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Token times follow the wall clock (here: jumped a day ahead mid-session); timeouts
    and limits follow the monotonic clock, so the session is not cut for idleness."""
    wall = [datetime.now(UTC)]
    async with gateway_with_upstream(
        tmp_path, issuer, clock=lambda: wall[0], smtp={"idle_timeout": 2}
    ) as (gw, upstream):
        client = await authenticated(gw, issuer)
        async with client:
            assert (await client.command("MAIL FROM:<alice@example.test>"))[0] == 250
            assert (await client.command("RSET"))[0] == 250
            wall[0] += timedelta(days=1)  # NTP step, VM resume, or an admin's date command
            await asyncio.sleep(0.5)
            assert await client.command("MAIL FROM:<alice@example.test>") == (
                421,
                "4.7.0 Device token expired; reconnect and authenticate again",
            )
            assert await client.closed()
        # A fresh token, issued at the new wall-clock time, works at once.
        device = FakeDevice(issuer)
        result = await device.send(gw.port, at=wall[0])
        assert result.data is not None
        assert result.data[0] == 250
        # The same token again (a phone that did not refresh) is refused at AUTH.
        wall[0] += timedelta(days=1)
        stale = await device.send(gw.port, token=device.token(at=wall[0] - timedelta(days=1)))
        assert stale.auth is not None
        assert stale.auth[0] == 535
        assert len(upstream.messages) == 1


@pytest.mark.slow
async def test_sigkill_during_release_loses_nothing(tmp_path: Path, issuer: TestIssuer) -> None:
    """Killed while held mail is being released: after a restart every message reaches the
    upstream at least once, byte-identical, each device's in order; duplicates allowed."""
    async with FakeUpstream.running() as upstream:
        gateway = Gateway.configured(tmp_path, issuer, upstream.port, {"ban.toml": BAN})
        port = gateway.port
        await gateway.start()
        sent: dict[str, list[bytes]] = {}
        try:
            for n in range(40):
                device = FakeDevice(issuer, device_id=f"phone-{n % 20}", apps={TIKTOK})
                content = make_message(subject=f"held {n}")
                sent.setdefault(device.device_id, []).append(content)
                assert (await device.send(port, message=content)).data == (
                    250,
                    "2.6.0 held: Remove TikTok.",
                )
            upstream.faults.delay = 0.2  # each release takes a while: the kill lands mid-way
            (tmp_path / "policies" / "ban.toml").write_text(tiktok_ban("hold", state="retracted"))
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while len(upstream.messages) < 5:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            await gateway.kill()
            upstream.faults.delay = 0.0
            killed_at = len(upstream.messages)
            await gateway.start()  # the retracted ban is in force: release at start-up
            async with asyncio.timeout(30):
                while held_rows(tmp_path / "hold.db"):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await gateway.stop()
    assert 5 <= killed_at < 40
    by_subject: dict[bytes, int] = {}
    for message in upstream.messages:
        body = message.content[message.content.index(b"From: ") :]
        by_subject[body] = by_subject.get(body, 0) + 1
    expected = [c for contents in sent.values() for c in contents]
    assert set(by_subject) == set(expected)  # every message, byte-identical
    duplicates = sum(by_subject.values()) - len(expected)
    # At most what was in flight (8 lanes) or relayed but not yet deleted (a 0.25 s batch).
    assert duplicates <= 8 + 8 * 2
    for contents in sent.values():  # each device's first deliveries in arrival order
        first_seen = [
            next(
                i
                for i, m in enumerate(upstream.messages)
                if m.content.endswith(c[c.index(b"From: ") :])
            )
            for c in contents
        ]
        assert first_seen == sorted(first_seen)


@pytest.mark.slow
async def test_sigkill_after_the_message_is_safe_but_before_the_250(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Killed after the upstream took the message (relayed) or after the commit (held), but
    before the client heard 250: the message is kept, and the client's retry may make a
    duplicate. A duplicate is allowed; a loss is not."""
    async with FakeUpstream.running() as upstream:
        gateway = Gateway.configured(tmp_path, issuer, upstream.port, {"ban.toml": BAN})
        await gateway.start()
        database = tmp_path / "hold.db"
        try:
            # Relayed: the upstream records the message, then is slow to say 250.
            upstream.faults.delay_after_accept = 2.0
            relayed = asyncio.create_task(
                FakeDevice(issuer).send(gateway.port, message=make_message(subject="relayed"))
            )
            await upstream.wait_for(1)
            await gateway.kill()
            with pytest.raises(Exception):  # noqa: B017, PT011  # any client-side failure
                await relayed
            upstream.faults.delay_after_accept = 0.0
            # Held: kill the moment the row is committed.
            await gateway.start()
            held = asyncio.create_task(
                FakeDevice(issuer, apps={TIKTOK}).send(
                    gateway.port, message=make_message(subject="held")
                )
            )
            async with asyncio.timeout(10):
                while not database.exists() or not held_rows(database):  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
            await gateway.kill()
            try:
                outcome = await held
                got_250 = outcome.data is not None and outcome.data[0] == 250
            except Exception:  # killed before the reply: no 250
                got_250 = False
            await gateway.start()
        finally:
            await gateway.stop()
    assert [b"Subject: relayed" in m.content for m in upstream.messages] == [True]
    (row,) = held_rows(database)  # survived the kill, whether or not 250 went out
    assert row.user == "alice@example.test"
    print(f"held message: client got 250 before the kill: {got_250}")
