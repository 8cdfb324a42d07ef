"""Durable hold store: SQLite (WAL, synchronous=FULL), one connection on one thread.

A message is held by one INSERT in one transaction; the client hears ``250 2.6.0`` only
after the COMMIT returned, which with synchronous=FULL means the WAL was fsynced. A
failure rolls back, so no partial row is left; the client gets ``451 4.3.0``.

The store also answers the admin CLI (list, show, release, drop), which may run in
another process at the same time: SQLite's locking makes that safe, and a busy timeout
turns short lock waits into waits rather than errors.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from gateway.domain import DeviceClaims, HeldSubmission
from gateway.errors import HoldStoreError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    hold_id        TEXT NOT NULL UNIQUE,
    received_at    TEXT NOT NULL,
    sender         TEXT NOT NULL,
    recipients     TEXT NOT NULL,                      -- JSON list
    user           TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    claims         TEXT NOT NULL,                      -- JSON, see DeviceClaims.to_json
    policy_ids     TEXT NOT NULL,                      -- JSON list
    policy_version TEXT NOT NULL,
    message        BLOB NOT NULL,
    size           INTEGER NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_attempt   REAL NOT NULL DEFAULT 0,            -- unix time
    last_error     TEXT,
    release_requested INTEGER NOT NULL DEFAULT 0       -- set by `gateway hold release`
);
CREATE INDEX IF NOT EXISTS held_device ON held (device_id, seq);
CREATE INDEX IF NOT EXISTS held_user ON held (user);

-- Device inventory: the last claims each device presented (no tokens, no mail), kept for
-- impact previews and the reload guard; pruned after the retention period.
-- Notices sent, at most one per device, policy and phase.
CREATE TABLE IF NOT EXISTS notices (
    device_id  TEXT NOT NULL,
    policy_id  TEXT NOT NULL,
    phase      TEXT NOT NULL,
    sent_at    REAL NOT NULL,
    PRIMARY KEY (device_id, policy_id, phase)
);
CREATE TABLE IF NOT EXISTS devices (
    device_id  TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    claims     TEXT NOT NULL,
    last_seen  REAL NOT NULL
);
"""


@dataclass(frozen=True)
class HeldMessage:
    """One held message as stored (the bytes are loaded only where needed)."""

    seq: int
    hold_id: str
    received_at: datetime
    sender: str
    recipients: tuple[str, ...]
    user: str
    device_id: str
    claims: DeviceClaims
    policy_ids: tuple[str, ...]
    policy_version: str
    size: int
    attempts: int
    last_error: str | None
    release_requested: bool
    content: bytes | None = None

    def summary(self) -> dict[str, object]:
        return {
            "hold_id": self.hold_id,
            "received_at": self.received_at.isoformat(),
            "sender": self.sender,
            "recipients": list(self.recipients),
            "user": self.user,
            "device_id": self.device_id,
            "policy_ids": list(self.policy_ids),
            "policy_version": self.policy_version,
            "size": self.size,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "release_requested": self.release_requested,
        }


_COLUMNS = (
    "seq, hold_id, received_at, sender, recipients, user, device_id, claims, policy_ids, "
    "policy_version, size, attempts, last_error, release_requested"
)


def _row(row: sqlite3.Row, content: bytes | None = None) -> HeldMessage:
    return HeldMessage(
        seq=row["seq"],
        hold_id=row["hold_id"],
        received_at=datetime.fromisoformat(row["received_at"]),
        sender=row["sender"],
        recipients=tuple(json.loads(row["recipients"])),
        user=row["user"],
        device_id=row["device_id"],
        claims=DeviceClaims.from_json(json.loads(row["claims"])),
        policy_ids=tuple(json.loads(row["policy_ids"])),
        policy_version=row["policy_version"],
        size=row["size"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        release_requested=bool(row["release_requested"]),
        content=content,
    )


@dataclass(frozen=True)
class HoldFilter:
    user: str | None = None
    device_id: str | None = None
    policy_id: str | None = None

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        params: list[object] = []
        if self.user:
            clauses.append("user = ?")
            params.append(self.user.casefold())
        if self.device_id:
            clauses.append("device_id = ?")
            params.append(self.device_id)
        if self.policy_id:
            clauses.append("EXISTS (SELECT 1 FROM json_each(held.policy_ids) WHERE value = ?)")
            params.append(self.policy_id)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class HoldStore:
    """Synchronous core; :class:`AsyncHoldStore` runs it on a dedicated thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(path), timeout=5.0, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise HoldStoreError(f"cannot open hold store {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, params: Sequence[object]) -> int:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise HoldStoreError(f"hold store write failed: {exc}") from exc
        return cursor.rowcount

    def hold(self, held: HeldSubmission) -> str:
        hold_id = uuid.uuid4().hex
        claims = held.claims
        self._write(
            "INSERT INTO held (hold_id, received_at, sender, recipients, user, device_id, claims, "
            "policy_ids, policy_version, message, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                hold_id,
                held.received_at.astimezone(UTC).isoformat(),
                held.sender,
                json.dumps(list(held.recipients)),
                claims.user,
                claims.device.id,
                json.dumps(claims.to_json()),
                json.dumps(list(held.decision.policy_ids)),
                held.decision.policy_version,
                held.content,
                len(held.content),
            ),
        )
        return hold_id

    def select(self, where: HoldFilter = HoldFilter(), limit: int = 1000) -> list[HeldMessage]:
        clause, params = where.where()
        try:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM held{clause} ORDER BY seq LIMIT ?",
                [*params, limit],  # fixed column list, values bound as parameters
            )  # clause is built from fixed strings
            return [_row(r) for r in rows]
        except sqlite3.Error as exc:
            raise HoldStoreError(f"hold store read failed: {exc}") from exc

    def get(self, hold_id: str, with_content: bool = True) -> HeldMessage | None:
        try:
            row = self._db.execute(
                f"SELECT {_COLUMNS}, message FROM held WHERE hold_id = ?",
                (hold_id,),  # fixed column list, values bound as parameters
            ).fetchone()
        except sqlite3.Error as exc:
            raise HoldStoreError(f"hold store read failed: {exc}") from exc
        if row is None:
            return None
        return _row(row, bytes(row["message"]) if with_content else None)

    def due(
        self, now: datetime, device_id: str | None = None, limit: int = 500, after: int = 0
    ) -> list[HeldMessage]:
        """Held messages whose retry time has come, oldest first, with their bytes; ``after``
        pages on by arrival order (seq)."""
        sql = f"SELECT {_COLUMNS}, message FROM held WHERE next_attempt <= ? AND seq > ?"
        params: list[object] = [now.timestamp(), after]
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        try:
            rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", [*params, limit]).fetchall()
        except sqlite3.Error as exc:
            raise HoldStoreError(f"hold store read failed: {exc}") from exc
        return [_row(r, bytes(r["message"])) for r in rows]

    def device_ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT DISTINCT device_id FROM held")}

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM held").fetchone()[0])

    def remove(self, hold_ids: Sequence[str]) -> int:
        if not hold_ids:
            return 0
        marks = ",".join("?" * len(hold_ids))
        return self._write(f"DELETE FROM held WHERE hold_id IN ({marks})", list(hold_ids))

    @staticmethod
    def _selection(where: HoldFilter, hold_ids: Sequence[str]) -> tuple[str, list[object]]:
        """WHERE clause for a filter, narrowed to the given ids when there are any."""
        clause, params = where.where()
        if hold_ids:
            marks = ",".join("?" * len(hold_ids))
            clause += (" AND " if clause else " WHERE ") + f"hold_id IN ({marks})"
            params += list(hold_ids)
        return clause, params

    def request_release(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        clause, params = self._selection(where, hold_ids)
        return self._write(
            f"UPDATE held SET release_requested = 1, next_attempt = 0{clause}", params
        )

    def drop(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        clause, params = self._selection(where, hold_ids)
        return self._write(f"DELETE FROM held{clause}", params)

    def postpone(self, hold_id: str, next_attempt: float, error: str) -> None:
        self._write(
            "UPDATE held SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE hold_id = ?",
            (next_attempt, error, hold_id),
        )

    def record_devices(self, seen: Sequence[tuple[DeviceClaims, float]]) -> None:
        """Upsert the inventory in one transaction (called in batches, not per AUTH)."""
        if not seen:
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO devices (device_id, user, claims, last_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(device_id) DO UPDATE SET user = excluded.user, claims = excluded.claims, "
                "last_seen = excluded.last_seen",
                [(c.device.id, c.user, json.dumps(c.to_json()), at) for c, at in seen],
            )
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._db.execute("ROLLBACK")
            raise HoldStoreError(f"inventory write failed: {exc}") from exc

    def claim_notice(self, device_id: str, policy_id: str, phase: str, now: datetime) -> bool:
        """True if this notice was not sent before (and is now recorded as sent)."""
        return (
            self._write(
                "INSERT OR IGNORE INTO notices (device_id, policy_id, phase, sent_at) VALUES (?, ?, ?, ?)",
                (device_id, policy_id, phase, now.timestamp()),
            )
            == 1
        )

    def unclaim_notice(self, device_id: str, policy_id: str, phase: str) -> None:
        self._write(
            "DELETE FROM notices WHERE device_id = ? AND policy_id = ? AND phase = ?",
            (device_id, policy_id, phase),
        )

    def devices(self, seen_since: datetime) -> list[DeviceClaims]:
        rows = self._db.execute(
            "SELECT claims FROM devices WHERE last_seen >= ? ORDER BY device_id",
            (seen_since.timestamp(),),
        )
        return [DeviceClaims.from_json(json.loads(row[0])) for row in rows]

    def prune_devices(self, seen_before: datetime) -> int:
        return self._write("DELETE FROM devices WHERE last_seen < ?", (seen_before.timestamp(),))

    def expired(self, before: datetime) -> list[HeldMessage]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS}, message FROM held WHERE received_at < ? ORDER BY seq",
            (before.astimezone(UTC).isoformat(),),
        ).fetchall()
        return [_row(r, bytes(r["message"])) for r in rows]


class AsyncHoldStore:
    """The hold store for the event loop: every call runs on one dedicated thread."""

    def __init__(self, path: Path) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hold-store")
        self._store: HoldStore | None = None
        self.path = path

    async def _run(self, call: Callable[[HoldStore], T]) -> T:
        loop = asyncio.get_running_loop()

        def in_thread() -> T:
            if self._store is None:
                self._store = HoldStore(self.path)
            return call(self._store)

        return await loop.run_in_executor(self._executor, in_thread)

    async def open(self) -> None:
        await self._run(lambda store: None)

    async def hold(self, message: HeldSubmission) -> str:
        return await self._run(lambda store: store.hold(message))

    async def due(
        self, now: datetime, device_id: str | None = None, limit: int = 500, after: int = 0
    ) -> list[HeldMessage]:
        return await self._run(lambda store: store.due(now, device_id, limit, after))

    async def remove(self, hold_ids: Sequence[str]) -> int:
        return await self._run(lambda store: store.remove(hold_ids))

    async def postpone(self, hold_id: str, next_attempt: float, error: str) -> None:
        await self._run(lambda store: store.postpone(hold_id, next_attempt, error))

    async def expired(self, before: datetime) -> list[HeldMessage]:
        return await self._run(lambda store: store.expired(before))

    async def record_devices(self, seen: Sequence[tuple[DeviceClaims, float]]) -> None:
        await self._run(lambda store: store.record_devices(seen))

    async def claim_notice(self, device_id: str, policy_id: str, phase: str, now: datetime) -> bool:
        return await self._run(lambda store: store.claim_notice(device_id, policy_id, phase, now))

    async def unclaim_notice(self, device_id: str, policy_id: str, phase: str) -> None:
        await self._run(lambda store: store.unclaim_notice(device_id, policy_id, phase))

    async def devices(self, seen_since: datetime) -> list[DeviceClaims]:
        return await self._run(lambda store: store.devices(seen_since))

    async def prune_devices(self, seen_before: datetime) -> int:
        return await self._run(lambda store: store.prune_devices(seen_before))

    async def device_ids(self) -> set[str]:
        return await self._run(lambda store: store.device_ids())

    async def count(self) -> int:
        return await self._run(lambda store: store.count())

    async def close(self) -> None:
        def close(store: HoldStore) -> None:
            store.close()

        if self._store is not None:
            await self._run(close)
            self._store = None
        self._executor.shutdown(wait=True)
