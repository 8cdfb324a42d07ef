"""The device inventory's writes: a fleet of phones that reconnect for every message must
not make each release tick rewrite every device (docs/performance.md, the phones' table)."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.devices.inventory import REWRITE_AFTER, Inventory
from gateway.domain import Access
from gateway.hold.store import AsyncHoldStore
from tests.policy.test_engine import claims

START = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)


def last_seen(database: Path) -> dict[str, float]:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT device_id, last_seen FROM devices").fetchall()
    db.close()
    return {device_id: seen for device_id, seen in rows}


async def test_a_device_back_with_the_same_claims_is_rewritten_at_most_once_a_minute(
    tmp_path: Path,
) -> None:
    now = [START]
    database = tmp_path / "hold.db"
    store = AsyncHoldStore(database)
    await store.open()
    try:
        inventory = Inventory(store, timedelta(days=30), lambda: now[0])
        phone = claims(device_id="phone-1")
        inventory.seen(phone)
        await inventory.flush()
        assert last_seen(database) == {"phone-1": START.timestamp()}

        now[0] = START + REWRITE_AFTER / 2  # back with the same claims: not written again
        inventory.seen(phone)
        await inventory.flush()
        assert last_seen(database) == {"phone-1": START.timestamp()}

        changed = replace(phone, apps=frozenset({"com.example.new"}))  # new claims: at once
        inventory.seen(changed)
        await inventory.flush()
        assert last_seen(database) == {"phone-1": now[0].timestamp()}
        assert (await store.devices(START))[0].apps == frozenset({"com.example.new"})

        now[0] += REWRITE_AFTER  # the same claims a minute on: written again
        inventory.seen(changed)
        inventory.seen(changed, Access.SYNC)  # another access is news too
        await inventory.flush()
        assert last_seen(database) == {"phone-1": now[0].timestamp()}
        assert (await store.device_accesses(START))["phone-1"] == frozenset(Access)
    finally:
        await store.close()
