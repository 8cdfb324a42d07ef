"""A store written by an older gateway is upgraded in place and its mail still released;
readiness follows whether the store can be written."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.domain import Device, DeviceClaims, DeviceClass, Platform
from gateway.hold.store import HoldStore
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.hold.kit import readyz

# The held table as the first release wrote it (no options, claims or bounces).
FIRST_SCHEMA = """
CREATE TABLE held (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    hold_id        TEXT NOT NULL UNIQUE,
    received_at    TEXT NOT NULL,
    sender         TEXT NOT NULL,
    recipients     TEXT NOT NULL,
    user           TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    claims         TEXT NOT NULL,
    policy_ids     TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    message        BLOB NOT NULL,
    size           INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_attempt   REAL NOT NULL DEFAULT 0,
    last_error     TEXT,
    release_requested INTEGER NOT NULL DEFAULT 0
);
"""
MESSAGE = b"From: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: old\r\n\r\nkept\r\n"


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


def _first_release_store(path: Path) -> None:
    now = datetime.now(UTC)
    claims = DeviceClaims(
        issuer="mdm",
        subject="alice@example.test",
        audience=("gateway",),
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        device=Device("phone-1", Platform.IOS, DeviceClass.MOBILE),
    )
    db = sqlite3.connect(str(path), isolation_level=None)
    db.executescript(FIRST_SCHEMA)
    db.execute(
        "INSERT INTO held (hold_id, received_at, sender, recipients, user, device_id, claims, "
        "policy_ids, policy_version, message, size) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            "old-1",
            now.isoformat(),
            "alice@example.test",
            json.dumps(["bob@example.test"]),
            "alice@example.test",
            "phone-1",
            json.dumps(claims.to_json()),
            json.dumps(["remove-tiktok"]),
            "v0",
            MESSAGE,
            len(MESSAGE),
        ),
    )
    db.close()


def test_a_store_from_the_first_release_gains_the_new_columns_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    database = tmp_path / "hold.db"
    _first_release_store(database)
    store = HoldStore(database)
    try:
        (held,) = store.due(datetime.now(UTC) + timedelta(seconds=1))
        assert (held.hold_id, held.options, held.claim_id, held.bounce_of) == (
            "old-1",
            (),
            None,
            None,
        )
        assert store.content("old-1") == MESSAGE
        assert store.policy_versions() == []  # the policy history's table is added too
    finally:
        store.close()
    db = sqlite3.connect(str(database))
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(held)")}
    finally:
        db.close()
    assert {"options", "claim_id", "claimed_at", "bounce_of"} <= columns


async def test_mail_held_by_an_older_gateway_is_released_by_this_one(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)  # no ban
        _first_release_store(tmp_path / "hold.db")
        async with running_gateway(config):
            (released,) = await upstream.wait_for(1)
    assert released.content.endswith(MESSAGE)


async def test_readyz_is_503_while_the_store_cannot_be_written(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Defect 11's second half: a hold would get 451, so the gateway says it is not ready
    (within a release interval) and says why; ready again once the store takes writes."""
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port,
            extra="busy_timeout_seconds = 0.2\n",
        )  # fmt: skip
        async with running_gateway(config, release_tick=0.2) as gateway:
            assert (await asyncio.to_thread(readyz, gateway))[0] == 200
            locker = sqlite3.connect(str(gateway.settings.hold.database), isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # a backup or an sqlite3 shell, say
            try:
                async with asyncio.timeout(10):
                    while (state := await asyncio.to_thread(readyz, gateway))[0] == 200:  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
                status, text = state
                assert status == 503
                assert text.startswith("not ready: hold store cannot be written:")
                assert "locked by another connection" in text
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            async with asyncio.timeout(10):
                while (await asyncio.to_thread(readyz, gateway))[0] != 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            metrics = gateway.server.services.render_metrics().decode()
            assert "gateway_hold_store_writable 1.0" in metrics
