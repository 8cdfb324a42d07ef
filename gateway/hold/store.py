"""Durable hold store: SQLite (WAL, synchronous=FULL), one connection on one thread.

A message is held by one INSERT in one transaction; the client hears ``250 2.6.0`` only
after the COMMIT returned, which with synchronous=FULL means the WAL was fsynced. A
failure rolls back, so no partial row is left; the client gets ``451 4.3.0``.

Claims (a release attempt marking the messages it is about to relay) commit without
waiting for the fsync (``synchronous=NORMAL`` for that transaction): durable across a
crash of the process, and on disk once a later FULL commit or a checkpoint syncs the
WAL. A claim lost to a power failure changes nothing that matters: the message is still
held and is relayed again, as it would be with its claim. Waiting for the disk once per
lane was most of a release pass (docs/performance.md).

The store also answers the admin CLI (list, show, release, drop), which may run in
another process at the same time: SQLite's locking makes that safe, and a busy timeout
turns short lock waits into waits rather than errors.

At the boundary:

errors       every sqlite3 error and OSError leaves as :class:`HoldStoreError`, with a
             one-line message naming the file and what to do: translated in one place
             (``_errors``), used by ``_read`` (every query), ``_write`` (every
             transaction), opening, closing and the lock
files        held mail is private: the database, its -wal and -shm and the lock file are
             0600, a directory the store creates is 0700, whatever the umask (SQLite
             gives -wal and -shm the database file's mode)
serving      :class:`AsyncHoldStore` (``gateway serve``) runs ``PRAGMA quick_check`` at
             open, so a damaged file stops start-up with one line, and holds
             :class:`StoreLock`, so a second gateway on the same store is refused; the
             synchronous :class:`HoldStore` (the CLI) takes no lock and skips the check.
             The workers of ``gateway serve --workers N`` share the file: their
             supervisor holds the lock, and release claims are exclusive per device
             (``claim``), so no two workers relay the same message
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.domain import Access, DeviceClaims, HeldSubmission, Overrides
from gateway.errors import HoldStoreDamaged, HoldStoreError, HoldStoreInUse, HoldStoreLowOnSpace
from gateway.ops.workers import Peers
from gateway.policy.history import FileText, PolicyVersion, Snapshot

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
    release_requested INTEGER NOT NULL DEFAULT 0,      -- set by `gateway hold release`
    options        TEXT NOT NULL DEFAULT '[]',         -- JSON list: MAIL parameters (BODY=)
    claim_id       TEXT,                               -- the release attempt relaying it
    claimed_at     REAL,                               -- unix time of that claim
    bounce_of      TEXT                                -- a bounce (DSN): the hold_id it reports
);
-- The bytes of each held message, apart from its metadata: SQLite reads a row's columns
-- in order, so metadata stored after a large BLOB would walk the BLOB's overflow pages on
-- every release pass. held.message stays empty for rows written since; a store written
-- by an older gateway keeps its bytes there until they are released (read with coalesce).
CREATE TABLE IF NOT EXISTS held_bodies (
    seq            INTEGER PRIMARY KEY,                -- held.seq
    message        BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS held_bodies_follow AFTER DELETE ON held BEGIN
    DELETE FROM held_bodies WHERE seq = OLD.seq;
END;
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
-- One row, rewritten by the write probe that tells whether the store can be written.
CREATE TABLE IF NOT EXISTS health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    written_at REAL NOT NULL
);
-- Admin actions taken through the admin API (who, what, when), newest last.
CREATE TABLE IF NOT EXISTS admin_audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,                          -- unix time
    actor      TEXT NOT NULL,                          -- the admin token's name
    role       TEXT NOT NULL,
    action     TEXT NOT NULL,                          -- e.g. hold.release
    target     TEXT NOT NULL,                          -- JSON: ids, filter
    count      INTEGER NOT NULL                        -- messages it touched
);
CREATE TABLE IF NOT EXISTS devices (
    device_id  TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    claims     TEXT NOT NULL,
    last_seen  REAL NOT NULL,
    last_send  REAL,                                   -- unix time of its last SMTP AUTH
    last_sync  REAL                                    -- and of its last IMAP/POP3 login
);
-- When each device was first seen matching each policy with grace_hours (never changes).
CREATE TABLE IF NOT EXISTS policy_first_seen (
    device_id  TEXT NOT NULL,
    policy_id  TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (device_id, policy_id)
);
-- Operator overrides without editing policy files (gateway policy suspend / exempt): rows
-- past ``until`` (unix time) are ignored and pruned; user_or_device is user:NAME or device:ID.
CREATE TABLE IF NOT EXISTS policy_suspensions (policy_id TEXT PRIMARY KEY, until REAL NOT NULL,
    reason TEXT NOT NULL, actor TEXT NOT NULL, created_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS policy_exemptions (policy_id TEXT NOT NULL,
    user_or_device TEXT NOT NULL, until REAL NOT NULL, reason TEXT NOT NULL,
    actor TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (policy_id, user_or_device)) WITHOUT ROWID;
-- Every policy set a gateway put in force, once per version (gateway/policy/history.py):
-- when it first came into force and by what, when a gateway last loaded it, its files'
-- text (bounded) and its policies' fingerprints. At most KEEP_VERSIONS rows.
CREATE TABLE IF NOT EXISTS policy_versions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    version        TEXT NOT NULL UNIQUE,
    loaded_at      REAL NOT NULL,                      -- unix time
    trigger        TEXT NOT NULL,                      -- startup, sighup, watch, periodic
    loaded_by      TEXT NOT NULL,                      -- host name and process id
    last_loaded_at REAL NOT NULL,
    policy_count   INTEGER NOT NULL,
    file_count     INTEGER NOT NULL,
    text_bytes     INTEGER NOT NULL,
    truncated      INTEGER NOT NULL,
    files          TEXT NOT NULL,                      -- JSON: [FileText]
    policies       TEXT                                -- JSON: {id: [fingerprint, state]}
);
"""

# Columns added after the first release of the store: (table, name, declaration). A store
# written by an older gateway gains them at open (ALTER TABLE ... ADD COLUMN keeps its rows).
_ADDED_COLUMNS = (
    ("held", "options", "TEXT NOT NULL DEFAULT '[]'"),
    ("held", "claim_id", "TEXT"),
    ("held", "claimed_at", "REAL"),
    ("held", "bounce_of", "TEXT"),
    ("devices", "last_send", "REAL"),
    ("devices", "last_sync", "REAL"),
)

HEADER_LIMIT = 64 * 1024  # bytes of a held message read for a bounce's header part


def header_block(message: bytes) -> bytes:
    """The header section of a message (RFC 5322 s 2.1), up to the blank line; all of it
    when there is none (or it lies past what was read)."""
    end = message.find(b"\r\n\r\n")
    return message[: end + 2] if end >= 0 else message


_INSERT = (
    "INSERT INTO held (hold_id, received_at, sender, recipients, user, device_id, claims, "
    "policy_ids, policy_version, size, options, release_requested, bounce_of, message) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, x'')"
)
# One held message's bytes: from held_bodies, or from held.message in a row written by an
# older gateway. Formatted with fixed expressions only; values are bound parameters.
_BODY = (
    "SELECT coalesce({}, {}) FROM held h LEFT JOIN held_bodies b ON b.seq = h.seq "
    "WHERE h.hold_id = ?"
)


@dataclass(frozen=True)
class HeldMessage:
    """One held message as stored, without its bytes: release and expiry decide from
    this, and load a body (``HoldStore.content``) only for a message actually sent, so
    memory does not grow with the number or size of held messages."""

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
    options: tuple[str, ...] = ()  # MAIL parameters for the upstream (BODY=8BITMIME)
    claim_id: str | None = None  # set while (or since) a release attempt relays it
    bounce_of: str | None = None  # this is a bounce (DSN) reporting on that hold_id

    @property
    def is_bounce(self) -> bool:
        return self.bounce_of is not None

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
            "options": list(self.options),
            "bounce_of": self.bounce_of,
        }


_COLUMNS = (
    "seq, hold_id, received_at, sender, recipients, user, device_id, claims, policy_ids, "
    "policy_version, size, attempts, last_error, release_requested, options, claim_id, bounce_of"
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
        options=tuple(json.loads(row["options"])),
        claim_id=row["claim_id"],
        bounce_of=row["bounce_of"],
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


DEFAULT_BUSY_TIMEOUT = 5.0  # seconds a statement waits for another connection's lock
DEFAULT_CLAIM_LEASE = 300.0  # seconds: [store] claim_lease_seconds' default

# The releaser a claim id names: "<releaser>.<attempt>" (or the whole id without a dot).
_HOLDER = (
    "(CASE WHEN instr(claim_id, '.') > 0 THEN substr(claim_id, 1, instr(claim_id, '.') - 1) "
    "ELSE claim_id END)"
)


class ClaimRefused(Exception):
    """A claim that could not take every message asked for: its transaction is rolled
    back (both backends)."""


_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_BUSY = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
_FULL = {sqlite3.SQLITE_FULL}
_IO = {sqlite3.SQLITE_IOERR}
_ACCESS = {
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_PERM,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_AUTH,
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _damaged(path: Path, problem: str) -> HoldStoreDamaged:
    return HoldStoreDamaged(
        f"hold store {path} is damaged: {_one_line(problem)}; "
        "restore it from a backup or move it aside"
    )


def _failure(path: Path, doing: str, exc: Exception, busy_timeout: float) -> HoldStoreError:
    """The one translation of a sqlite3 error or OSError into what an operator can act on."""
    detail = _one_line(str(exc))
    if isinstance(exc, OSError):
        where = exc.filename or path
        return HoldStoreError(
            f"hold store {path}: {doing} failed: {_one_line(exc.strerror or detail)} ({where}); "
            f"check that the gateway's user can write {path.parent}"
        )
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if primary in _DAMAGED:
        return _damaged(path, detail)
    if primary in _BUSY:
        return HoldStoreError(
            f"hold store {path} is locked by another connection: {doing} gave up after "
            f"{busy_timeout:g} s; if this persists, look for a process keeping it busy "
            "(a long-running `gateway hold` command, a backup, an sqlite3 shell)"
        )
    if primary in _FULL:
        return HoldStoreError(
            f"hold store {path}: {doing} failed: {detail}; free space on the disk holding "
            f"{path.parent}"
        )
    if primary in _IO:
        return HoldStoreError(
            f"hold store {path}: {doing} failed: {detail}; check the disk and the kernel log"
        )
    if primary in _ACCESS:
        return HoldStoreError(
            f"hold store {path}: {doing} failed: {detail}; check that the gateway's user owns "
            f"{path} (and its -wal and -shm) and can write {path.parent}"
        )
    if isinstance(exc, sqlite3.ProgrammingError):  # e.g. used after close: a gateway bug
        return HoldStoreError(
            f"hold store {path}: {doing} failed: {detail} (a bug in the gateway; please report it)"
        )
    return HoldStoreError(f"hold store {path}: {doing} failed: {detail}")


@contextlib.contextmanager
def _errors(path: Path, doing: str, busy_timeout: float = 0.0) -> Iterator[None]:
    """Let no sqlite3 error or OSError out: they leave as HoldStoreError, chained."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise _failure(path, doing, exc, busy_timeout) from exc


def _private_directory(directory: Path) -> None:
    """Create ``directory`` (and missing parents) 0700; leave existing directories alone:
    they are not the store's to change (/tmp, /var/lib)."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours
        os.chmod(created, 0o700)  # the umask may have taken bits the store needs


def _private_file(path: Path) -> None:
    """Create ``path`` 0600 if it is missing; take group and other bits off it if it is
    ours (a store written by an older gateway, or under a loose umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        _tighten(path)
    else:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits the store needs
        finally:
            os.close(fd)


def _tighten(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == os.geteuid() and mode & ~0o600:
        os.chmod(path, mode & 0o600)


class StoreLock:
    """One serving gateway per store: an exclusive ``flock`` on ``<database>.lock``.

    The file (0600) holds the holder's pid, for the refusal message. The kernel drops the
    lock when the holder's descriptor closes, however its process ends, so a crash leaves
    no stale lock. ``flock`` locks belong to an open file, not a process: a second
    opener in the same process is refused too.
    """

    WAIT_FOR_PID = 1.0  # seconds: a holder writes its pid just after taking the lock

    def __init__(self, database: Path) -> None:
        self.database = database
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        with _errors(self.database, "locking"):
            _private_directory(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _tighten(self.path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise HoldStoreInUse(
                        f"hold store {self.database} is in use by another gateway "
                        f"(pid {self._holder(fd)}); run one gateway per store"
                    ) from exc
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd

    def _holder(self, fd: int) -> str:
        deadline = time.monotonic() + self.WAIT_FOR_PID
        while True:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit() or time.monotonic() > deadline:
                return text if text.isdigit() else "unknown"
            time.sleep(0.05)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _errors(self.database, "unlocking"):
            try:
                os.ftruncate(fd, 0)  # no pid of a gateway that is gone
            finally:
                os.close(fd)  # closing the descriptor drops the lock


class HoldStore:
    """Synchronous core; :class:`AsyncHoldStore` runs it on a dedicated thread.

    ``check`` runs ``PRAGMA quick_check`` at open (serving does; the CLI does not, so that
    it can still list and drop what is readable in a damaged store).
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        check: bool = False,
        min_free_bytes: int = 0,
        lease: float = DEFAULT_CLAIM_LEASE,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.min_free_bytes = min_free_bytes
        self.lease = lease  # seconds another process's claim is respected (see claim)
        with self._errors("open"):
            _private_directory(path.parent)
            _private_file(path)  # SQLite gives -wal and -shm this file's mode
            for companion in ("-wal", "-shm"):
                _tighten(path.with_name(path.name + companion))
            self._db = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        try:
            with self._errors("open"):
                self._db.row_factory = sqlite3.Row
                self._db.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                if check:
                    self._check()
                self._db.executescript(SCHEMA)
                self._migrate()
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            raise

    def _check(self) -> None:
        """Stop here, with the first problem, if SQLite finds the file damaged."""
        (result,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
        if result != "ok":  # "*** in database main ***" then one problem per line
            problems = [line for line in str(result).splitlines() if not line.startswith("***")]
            raise _damaged(self.path, problems[0] if problems else str(result))

    def _migrate(self) -> None:
        """Add the columns a store written by an older gateway lacks (one transaction)."""
        present = {
            (table, row["name"])
            for table in ("held", "devices")
            for row in self._db.execute(f"PRAGMA table_info({table})")
        }
        missing = [added for added in _ADDED_COLUMNS if (added[0], added[1]) not in present]
        if not missing:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, name, kind in missing:  # fixed names and declarations, nothing from input
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    def _errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return _errors(self.path, doing, self.busy_timeout)

    def close(self) -> None:
        with self._errors("close"):
            self._db.close()

    def __enter__(self) -> HoldStore:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with HoldStore(path) as store:`` closes the connection (an unclosed one is a
        ResourceWarning from Python 3.13)."""
        self.close()

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        """Every query goes through here: all rows, or a HoldStoreError."""
        with self._errors("read"):
            rows: list[sqlite3.Row] = self._db.execute(sql, params).fetchall()
            return rows

    def _write(
        self,
        sql: str,
        params: Sequence[object] = (),
        *,
        many: Sequence[Sequence[object]] | None = None,
        synced: bool = True,
    ) -> int:
        """One statement (or one statement over ``many`` rows) in one transaction; rolled
        back on any failure. Returns the number of rows changed."""

        def statement() -> int:
            if many is None:
                return self._db.execute(sql, params).rowcount
            return self._db.executemany(sql, many).rowcount

        return self._transaction(statement, synced=synced)

    def _transaction(self, work: Callable[[], T], *, synced: bool = True) -> T:
        """``work`` in one write transaction, committed, or rolled back on any failure.
        ``synced=False``: the COMMIT does not wait for the fsync (claims only)."""
        with self._errors("write"):
            if not synced:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work()
                    self._db.execute("COMMIT")
                except BaseException:
                    # Some failures (a full disk, an I/O error) end the transaction already;
                    # a failing ROLLBACK must not hide the error that caused it.
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            finally:
                if not synced:
                    self._db.execute("PRAGMA synchronous=FULL")
            return result

    def _insert_held(self, values: Sequence[object], message: bytes) -> None:
        """One held row (metadata, ``values`` in _INSERT order) and its body."""
        seq = self._db.execute(_INSERT, values).lastrowid
        self._db.execute("INSERT INTO held_bodies (seq, message) VALUES (?, ?)", (seq, message))

    def _room_for(self, size: int) -> None:
        """Refuse a hold that would leave less than ``min_free_bytes`` on the disk (the
        message is written twice, to the WAL and then the database)."""
        if not self.min_free_bytes:
            return
        with self._errors("checking free space"):
            disk = os.statvfs(self.path.parent)
        free = disk.f_bavail * disk.f_frsize
        if free - 2 * size < self.min_free_bytes:
            raise HoldStoreLowOnSpace(
                f"hold store {self.path}: {free // 2**20} MiB free, below the floor of "
                f"{self.min_free_bytes // 2**20} MiB ([hold] min_free_bytes) with this "
                f"message; free space on the disk holding {self.path.parent}"
            )

    def hold(self, held: HeldSubmission) -> str:
        self._room_for(len(held.content))
        hold_id = uuid.uuid4().hex
        claims = held.claims
        values = (
            hold_id,
            held.received_at.astimezone(UTC).isoformat(),
            held.sender,
            json.dumps(list(held.recipients)),
            claims.user,
            claims.device.id,
            json.dumps(claims.to_json()),
            json.dumps(list(held.decision.policy_ids)),
            held.decision.policy_version,
            len(held.content),
            json.dumps(list(held.options)),
            0,
            None,
        )
        self._transaction(lambda: self._insert_held(values, held.content))
        return hold_id

    def select(
        self, where: HoldFilter = HoldFilter(), limit: int = 1000, after: int = 0
    ) -> list[HeldMessage]:
        """Held messages in arrival order; ``after`` pages on by seq (the admin API's cursor)."""
        clause, params = where.where()
        clause += (" AND " if clause else " WHERE ") + "seq > ?"
        rows = self._read(
            f"SELECT {_COLUMNS} FROM held{clause} ORDER BY seq LIMIT ?",
            [*params, after, limit],  # fixed column list, values bound as parameters
        )  # clause is built from fixed strings
        return [_row(r) for r in rows]

    def get(self, hold_id: str, with_content: bool = True) -> HeldMessage | None:
        rows = self._read(
            f"SELECT {_COLUMNS} FROM held WHERE hold_id = ?",
            (hold_id,),  # fixed column list, values bound as parameters
        )
        if not rows:
            return None
        (row,) = rows
        return _row(row, self.content(hold_id) if with_content else None)

    def due(
        self, now: datetime, device_id: str | None = None, limit: int = 500, after: int = 0
    ) -> list[HeldMessage]:
        """Held messages whose retry time has come, oldest first, without their bytes;
        ``after`` pages on by arrival order (seq)."""
        sql = f"SELECT {_COLUMNS} FROM held WHERE next_attempt <= ? AND seq > ?"
        params: list[object] = [now.timestamp(), after]
        if device_id is not None:
            sql += " AND device_id = ?"
            params.append(device_id)
        rows = self._read(sql + " ORDER BY seq LIMIT ?", [*params, limit])
        return [_row(r) for r in rows]

    def content(self, hold_id: str) -> bytes | None:
        """One held message's bytes (None if it is gone: released or dropped meanwhile)."""
        rows = self._read(_BODY.format("b.message", "h.message"), (hold_id,))
        return bytes(rows[0][0]) if rows else None

    def contents(self, hold_ids: Sequence[str]) -> dict[str, bytes]:
        """Several held messages' bytes in one query, by hold id (those gone are absent):
        release reads a lane's next messages together. The caller bounds the total."""
        if not hold_ids:
            return {}
        marks = ",".join("?" * len(hold_ids))
        rows = self._read(
            "SELECT h.hold_id, coalesce(b.message, h.message) FROM held h "
            f"LEFT JOIN held_bodies b ON b.seq = h.seq WHERE h.hold_id IN ({marks})",
            tuple(hold_ids),
        )
        return {row[0]: bytes(row[1]) for row in rows}

    def headers(self, hold_id: str) -> bytes:
        """The header block of a held message (for a bounce), at most HEADER_LIMIT bytes
        read, whatever the message's size."""
        rows = self._read(
            _BODY.format("substr(b.message, 1, ?)", "substr(h.message, 1, ?)"),
            (HEADER_LIMIT, HEADER_LIMIT, hold_id),
        )
        if not rows:
            return b""
        return header_block(bytes(rows[0][0]))

    def claim(
        self,
        hold_ids: Sequence[str],
        claim_id: str,
        at: float,
        attempts: Sequence[int] | None = None,
    ) -> int:
        """Mark messages as being relayed by one release attempt, before they go upstream:
        if this write fails, nothing is sent that could not be recorded afterwards.

        All of ``hold_ids`` or none (0), as on the shared PostgreSQL store, since the
        worker processes of one ``gateway serve --workers N`` share this file: none when
        another process's live claim (younger than the lease) holds mail of the same device,
        or when a message was settled, dropped or retried meanwhile (``attempts`` changed).
        Claim ids are "<releaser>.<attempt>": a releaser's own earlier claims are its to
        take back. ``BEGIN IMMEDIATE`` serialises the check and the write across processes."""
        if not hold_ids:
            return 0
        lane = LaneClaim(tuple(hold_ids), claim_id, None if attempts is None else tuple(attempts))
        return self.claim_lanes([lane], at)[0]

    def claim_lanes(self, lanes: Sequence[LaneClaim], at: float) -> list[int]:
        """:meth:`claim` for several lanes in one transaction (one commit for a page of a
        release pass, not one per device), each lane all or nothing (a savepoint each);
        how many messages of each lane were claimed. The commit need not wait for the
        fsync: a claim lost in a crash leaves the message held, to be relayed again."""
        stale = at - self.lease

        def one_lane(lane: LaneClaim) -> int:
            ids = list(lane.hold_ids)
            marks = ",".join("?" * len(ids))
            holder = lane.claim_id.split(".", 1)[0]
            devices = [
                r[0]
                for r in self._db.execute(
                    f"SELECT DISTINCT device_id FROM held WHERE hold_id IN ({marks}) "
                    "AND bounce_of IS NULL",
                    ids,
                )
            ]
            if devices:
                device_marks = ",".join("?" * len(devices))
                busy = self._db.execute(
                    f"SELECT 1 FROM held WHERE device_id IN ({device_marks}) "
                    f"AND bounce_of IS NULL AND claim_id IS NOT NULL AND {_HOLDER} <> ? "
                    "AND claimed_at >= ? LIMIT 1",
                    [*devices, holder, stale],
                ).fetchone()
                if busy is not None:
                    return 0  # another process relays this device's mail now
            expected = list(lane.attempts) if lane.attempts is not None else [None] * len(ids)
            changed = 0
            for hold_id, tries in zip(ids, expected, strict=True):
                changed += self._db.execute(
                    "UPDATE held SET claim_id = ?, claimed_at = ? WHERE hold_id = ? "
                    f"AND (claim_id IS NULL OR {_HOLDER} = ? OR claimed_at < ?) "
                    "AND (? IS NULL OR attempts = ?)",
                    (lane.claim_id, at, hold_id, holder, stale, tries, tries),
                ).rowcount
            if changed != len(ids):
                raise ClaimRefused
            return changed

        def work() -> list[int]:
            counts = []
            for lane in lanes:
                if not lane.hold_ids:
                    counts.append(0)
                    continue
                self._db.execute("SAVEPOINT lane")
                try:
                    counts.append(one_lane(lane))
                except ClaimRefused:
                    self._db.execute("ROLLBACK TO lane")  # this lane only: tried again later
                    counts.append(0)
                self._db.execute("RELEASE lane")
            return counts

        if not lanes:
            return []
        return self._transaction(work, synced=False)

    def expire_claims(self) -> int:
        """Make every claim stale (kept, so ``claimed`` still counts them): called by the
        one process holding the store's lock before any releaser runs, when no claim can
        belong to a live process, so the mail of a crashed run is not held back a lease."""
        return self._write("UPDATE held SET claimed_at = 0 WHERE claim_id IS NOT NULL")

    def unclaim(self, hold_ids: Sequence[str]) -> int:
        """Claimed messages that were not sent after all (their device's run stopped)."""
        if not hold_ids:
            return 0
        marks = ",".join("?" * len(hold_ids))
        return self._write(
            f"UPDATE held SET claim_id = NULL, claimed_at = NULL WHERE hold_id IN ({marks})",
            list(hold_ids),
            synced=False,
        )

    def claimed(self) -> int:
        """Messages claimed by a release attempt that never settled them: after a crash,
        these may have reached the upstream and are sent again (a duplicate at most)."""
        return int(self._read("SELECT COUNT(*) FROM held WHERE claim_id IS NOT NULL")[0][0])

    def settle(self, settlement: Settlement) -> bool:
        """Record a release attempt's outcome in one transaction: the bounce (if any) is
        stored as a new held message addressed to the sender, and the original is deleted
        or keeps only the recipients to retry. False if the message was gone already
        (settled by another pass, or dropped by an admin): nothing was written."""
        return self._transaction(lambda: self._settle(settlement))

    def _settle(self, settlement: Settlement) -> bool:
        hold_id = settlement.hold_id
        row = self._db.execute(
            "SELECT claim_id, claimed_at FROM held WHERE hold_id = ?", (hold_id,)
        ).fetchone()
        if row is None:
            return False
        if (
            settlement.unless_claimed
            and row["claim_id"] is not None
            and row["claimed_at"] is not None
            and row["claimed_at"] >= time.time() - self.lease
        ):
            return False  # another worker is relaying it: the next pass looks again
        if settlement.bounce is not None:
            rows = self._db.execute(
                "SELECT sender, user, device_id, claims, policy_ids, policy_version FROM held "
                "WHERE hold_id = ?",
                (hold_id,),
            ).fetchall()
            for row in rows:  # none if an admin dropped it meanwhile: no bounce then
                values = (
                    uuid.uuid4().hex,
                    settlement.at.astimezone(UTC).isoformat(),
                    "",
                    json.dumps([row["sender"]]),
                    row["user"],
                    row["device_id"],
                    row["claims"],
                    row["policy_ids"],
                    row["policy_version"],
                    len(settlement.bounce),
                    "[]",
                    1,  # released whatever the device's state: it goes to the sender
                    hold_id,
                )
                self._insert_held(values, settlement.bounce)
        if settlement.retry:
            self._db.execute(
                "UPDATE held SET recipients = ?, attempts = attempts + 1, next_attempt = ?, "
                "last_error = ?, claim_id = NULL, claimed_at = NULL WHERE hold_id = ?",
                (
                    json.dumps(list(settlement.retry)),
                    settlement.retry_at,
                    settlement.error,
                    hold_id,
                ),
            )
        else:
            self._db.execute("DELETE FROM held WHERE hold_id = ?", (hold_id,))
        return True

    def probe_write(self, at: float) -> None:
        """A small write that fails when the store cannot be written (full disk, lock,
        read-only file): what readiness and a faulted release check before going on."""
        self._write("INSERT OR REPLACE INTO health (id, written_at) VALUES (1, ?)", (at,))

    def device_ids(self) -> set[str]:
        return {r[0] for r in self._read("SELECT DISTINCT device_id FROM held")}

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM held")[0][0])

    def stats(self) -> HeldStats:
        """Count, bytes and the oldest arrival in one aggregate (a metrics tick's read).
        ISO 8601 UTC texts order as their times, so MIN finds the oldest."""
        count, size, oldest = self._read(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(received_at) FROM held"
        )[0]
        return HeldStats(int(count), int(size), datetime.fromisoformat(oldest) if oldest else None)

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
            "UPDATE held SET attempts = attempts + 1, next_attempt = ?, last_error = ?, "
            "claim_id = NULL, claimed_at = NULL WHERE hold_id = ?",
            (next_attempt, error, hold_id),
        )

    def record_devices(self, seen: Sequence[tuple[DeviceClaims, float, Access]]) -> None:
        """Upsert the inventory in one transaction (called in batches, not per AUTH): the
        claims, and when the device last sent or synced mail."""
        if not seen:
            return
        self._write(
            "INSERT INTO devices (device_id, user, claims, last_seen, last_send, last_sync) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(device_id) DO UPDATE SET user = excluded.user, claims = excluded.claims, "
            "last_seen = max(devices.last_seen, excluded.last_seen), "
            "last_send = coalesce(excluded.last_send, devices.last_send), "
            "last_sync = coalesce(excluded.last_sync, devices.last_sync)",
            many=[
                (
                    c.device.id,
                    c.user,
                    json.dumps(c.to_json()),
                    at,
                    at if access is Access.SEND else None,
                    at if access is Access.SYNC else None,
                )
                for c, at, access in seen
            ],
        )

    def claim_notice(self, device_id: str, policy_id: str, phase: str, now: datetime) -> bool:
        """True if this notice was not sent before (and is now recorded as sent)."""
        return (
            self._write(
                "INSERT OR IGNORE INTO notices (device_id, policy_id, phase, sent_at) VALUES (?, ?, ?, ?)",
                (device_id, policy_id, phase, now.timestamp()),
            )
            == 1
        )

    def first_seen(self, device_id: str, policy_id: str, now: datetime) -> datetime:
        """When this device was first seen matching this policy: recorded as ``now`` if it
        never was (the first writer wins, so every replica agrees)."""

        def work() -> float:
            self._db.execute(
                "INSERT OR IGNORE INTO policy_first_seen (device_id, policy_id, first_seen) "
                "VALUES (?, ?, ?)",
                (device_id, policy_id, now.timestamp()),
            )
            (first,) = self._db.execute(
                "SELECT first_seen FROM policy_first_seen WHERE device_id = ? AND policy_id = ?",
                (device_id, policy_id),
            ).fetchone()
            return float(first)

        return datetime.fromtimestamp(self._transaction(work), UTC)

    def noticed_devices(self, policy_id: str) -> list[str]:
        """Devices that were sent a notice mail for this policy (warn, hold or released;
        not mailbox notices, which end in ":sync"): who a withdrawal goes to."""
        rows = self._read(
            "SELECT DISTINCT device_id FROM notices WHERE policy_id = ? "
            "AND phase IN ('warn', 'hold', 'released') ORDER BY device_id",
            (policy_id,),
        )
        return [row[0] for row in rows]

    def notices_sent(self, policy_ids: Sequence[str]) -> set[tuple[str, str, str]]:
        """(device, policy, phase) of the notice mails sent for these policies (not mailbox
        notices): whom `gateway impact` need not count as told anew."""
        found: set[tuple[str, str, str]] = set()
        ids = list(dict.fromkeys(policy_ids))
        for start in range(0, len(ids), 500):  # SQLite's bound on variables per statement
            chunk = ids[start : start + 500]
            rows = self._read(
                "SELECT device_id, policy_id, phase FROM notices WHERE policy_id IN "
                f"({', '.join('?' * len(chunk))}) AND phase NOT LIKE '%:sync'",
                chunk,
            )
            found.update((r[0], r[1], r[2]) for r in rows)
        return found

    def first_seen_times(self, device_id: str) -> dict[str, datetime]:
        """Per policy, when this device was first seen matching it (read only: explain)."""
        rows = self._read(
            "SELECT policy_id, first_seen FROM policy_first_seen WHERE device_id = ?", (device_id,)
        )
        return {row[0]: datetime.fromtimestamp(row[1], UTC) for row in rows}

    def first_seen_of_policies(self, policy_ids: Sequence[str]) -> dict[str, dict[str, datetime]]:
        """Per device, per policy of ``policy_ids``, when it was first seen matching it: one
        query for an impact preview (as many rows as devices matched those policies)."""
        if not policy_ids:
            return {}
        marks = ",".join("?" * len(policy_ids))
        rows = self._read(
            "SELECT device_id, policy_id, first_seen FROM policy_first_seen "
            f"WHERE policy_id IN ({marks})",
            list(policy_ids),
        )
        found: dict[str, dict[str, datetime]] = {}
        for device_id, policy_id, first_seen in rows:
            found.setdefault(device_id, {})[policy_id] = datetime.fromtimestamp(first_seen, UTC)
        return found

    def unclaim_notice(self, device_id: str, policy_id: str, phase: str) -> None:
        self._write(
            "DELETE FROM notices WHERE device_id = ? AND policy_id = ? AND phase = ?",
            (device_id, policy_id, phase),
        )

    def devices(self, seen_since: datetime) -> list[DeviceClaims]:
        rows = self._read(
            "SELECT claims FROM devices WHERE last_seen >= ? ORDER BY device_id",
            (seen_since.timestamp(),),
        )
        return [DeviceClaims.from_json(json.loads(row[0])) for row in rows]

    def device_accesses(self, seen_since: datetime) -> dict[str, frozenset[Access]]:
        """What each device seen since then used the gateway for. A device recorded before
        the gateway told sending from syncing apart has neither: it counts as both."""
        rows = self._read(
            "SELECT device_id, last_send, last_sync FROM devices WHERE last_seen >= ?",
            (seen_since.timestamp(),),
        )
        return {row["device_id"]: accesses_used(row["last_send"], row["last_sync"]) for row in rows}

    def prune_devices(self, seen_before: datetime) -> int:
        return self._write("DELETE FROM devices WHERE last_seen < ?", (seen_before.timestamp(),))

    def record_admin_action(
        self, at: float, actor: str, role: str, action: str, target: dict[str, object], count: int
    ) -> None:
        """One admin action in the audit table (the admin API writes one per request that
        changes something, after it was done)."""
        self._write(
            "INSERT INTO admin_audit (at, actor, role, action, target, count) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (at, actor, role, action, json.dumps(target, sort_keys=True), count),
        )

    def suspend_policy(
        self, policy_id: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        """Suspend a policy until ``until`` (a second suspension replaces the first)."""
        self._write(
            "INSERT OR REPLACE INTO policy_suspensions (policy_id, until, reason, actor, "
            "created_at) VALUES (?, ?, ?, ?, ?)",
            (policy_id, until.timestamp(), reason, actor, now.timestamp()),
        )

    def resume_policy(self, policy_id: str) -> int:
        """End a policy's suspension; how many there were (0 or 1)."""
        return self._write("DELETE FROM policy_suspensions WHERE policy_id = ?", (policy_id,))

    def exempt_from_policy(
        self, policy_id: str, subject: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        """A break-glass exemption of one ``user:NAME`` or ``device:ID`` from one policy."""
        self._write(
            "INSERT OR REPLACE INTO policy_exemptions (policy_id, user_or_device, until, "
            "reason, actor, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (policy_id, subject, until.timestamp(), reason, actor, now.timestamp()),
        )

    def remove_exemption(self, policy_id: str, subject: str) -> int:
        return self._write(
            "DELETE FROM policy_exemptions WHERE policy_id = ? AND user_or_device = ?",
            (policy_id, subject),
        )

    def prune_overrides(self, now: datetime) -> int:
        """Delete the overrides that ended by ``now``; how many."""
        at = now.timestamp()
        return self._write("DELETE FROM policy_suspensions WHERE until <= ?", (at,)) + self._write(
            "DELETE FROM policy_exemptions WHERE until <= ?", (at,)
        )

    def policy_overrides(self, now: datetime) -> list[PolicyOverride]:
        """The overrides in force at ``now`` (ended ones are ignored), suspensions first."""
        at = now.timestamp()
        rows = self._read(
            "SELECT policy_id, NULL AS subject, until, reason, actor, created_at "
            "FROM policy_suspensions WHERE until > ? UNION ALL SELECT policy_id, "
            "user_or_device, until, reason, actor, created_at FROM policy_exemptions "
            "WHERE until > ? ORDER BY subject, policy_id",
            (at, at),
        )
        return [override_of_row(dict(r)) for r in rows]

    def admin_actions(self, limit: int = 100, before: int | None = None) -> list[AdminAction]:
        """The audit table, newest first; ``before`` pages back by seq."""
        rows = self._read(
            "SELECT seq, at, actor, role, action, target, count FROM admin_audit "
            "WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (before if before is not None else 2**62, limit),
        )
        return [
            AdminAction(
                r["seq"],
                datetime.fromtimestamp(r["at"], UTC),
                r["actor"],
                r["role"],
                r["action"],
                json.loads(r["target"]),
                r["count"],
            )
            for r in rows
        ]

    def record_policy_version(
        self, snap: Snapshot, at: float, trigger: str, loaded_by: str, keep: int
    ) -> bool:
        """Store a version put in force, once: a version already stored (a restart, a
        revert, another replica) only has its ``last_loaded_at`` moved. Then the least
        recently loaded beyond ``keep`` are pruned. True if it was new."""

        def work() -> bool:
            inserted = self._db.execute(
                "INSERT INTO policy_versions (version, loaded_at, trigger, loaded_by, "
                "last_loaded_at, policy_count, file_count, text_bytes, truncated, files, "
                "policies) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (version) DO NOTHING",
                version_values(snap, at, trigger, loaded_by),
            ).rowcount
            if not inserted:
                self._db.execute(
                    "UPDATE policy_versions SET last_loaded_at = max(last_loaded_at, ?) "
                    "WHERE version = ?",
                    (at, snap.version),
                )
            self._db.execute(PRUNE_VERSIONS.replace("%s", "?"), (keep,))
            return inserted == 1

        return self._transaction(work)

    def policy_versions(self, limit: int = 100, before: int | None = None) -> list[PolicyVersion]:
        """The stored versions without their text, newest first; ``before`` pages by seq."""
        rows = self._read(
            f"SELECT {VERSION_SUMMARY} FROM policy_versions WHERE seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (before if before is not None else 2**62, limit),
        )
        return [policy_version_of_row(dict(r)) for r in rows]

    def policy_version(self, version: str) -> PolicyVersion | None:
        """One stored version with its files' text and policies, or None."""
        rows = self._read(
            f"SELECT {VERSION_SUMMARY}, files, policies FROM policy_versions WHERE version = ?",
            (version,),
        )
        return policy_version_of_row(dict(rows[0])) if rows else None

    def expired(self, before: datetime, limit: int = 100, after: int = 0) -> list[HeldMessage]:
        """Held longer than allowed, oldest first, without their bytes; paged by seq;
        leaving out mail another worker's live claim is relaying."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM held WHERE received_at < ? AND seq > ? "
            "AND (claim_id IS NULL OR claimed_at < ?) ORDER BY seq LIMIT ?",
            (before.astimezone(UTC).isoformat(), after, time.time() - self.lease, limit),
        )
        return [_row(r) for r in rows]


@dataclass(frozen=True)
class LaneClaim:
    """One lane's claim in a batch (``claim_lanes``): its messages, in order, the attempt's
    id, and each message's attempts as read (a shared store checks them)."""

    hold_ids: tuple[str, ...]
    claim_id: str
    attempts: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Settlement:
    """The outcome of one release attempt for one held message, recorded at once.

    ``retry``: the recipients to try again (4xx) at ``retry_at``, with ``error``; none
    means the message is done. ``bounce``: a DSN for the recipients that failed for good
    (5xx), stored as a held message to the sender and released like any other.
    """

    hold_id: str
    at: datetime
    retry: tuple[str, ...] = ()
    retry_at: float = 0.0
    error: str | None = None
    bounce: bytes | None = None
    # An expiry or an admin's drop, decided from a read made before this settlement: on a
    # store shared by several gateways or workers it settles nothing while a release
    # attempt's claim is live (that process may be relaying the message now; its own
    # outcome settles it), so a sender is never told that mail was not delivered when it was.
    unless_claimed: bool = False


def accesses_used(last_send: float | None, last_sync: float | None) -> frozenset[Access]:
    """What a device was seen doing, from the inventory's two times; a device recorded
    before sending and syncing were told apart has neither and counts as both."""
    used = frozenset(
        access
        for access, at in ((Access.SEND, last_send), (Access.SYNC, last_sync))
        if at is not None
    )
    return used or frozenset(Access)


VERSION_SUMMARY = (
    "seq, version, loaded_at, trigger, loaded_by, last_loaded_at, policy_count, file_count, "
    "text_bytes, truncated"
)
# Keep the ``keep`` most recently loaded versions (one parameter, written %s: each backend
# puts its own mark in).
PRUNE_VERSIONS = (
    "DELETE FROM policy_versions WHERE seq NOT IN (SELECT seq FROM policy_versions "
    "ORDER BY last_loaded_at DESC, seq DESC LIMIT %s)"
)


def version_values(snap: Snapshot, at: float, trigger: str, loaded_by: str) -> tuple[object, ...]:
    """The values of a policy_versions row, in the INSERT's column order; JSON as text."""
    policies = None if snap.policies is None else json.dumps(snap.policies, sort_keys=True)
    files = json.dumps([f.as_dict() for f in snap.files])
    return (snap.version, at, trigger, loaded_by, at, snap.policy_count, len(snap.files),
            snap.text_bytes, snap.truncated, files, policies)  # fmt: skip


def policy_version_of_row(row: dict[str, Any]) -> PolicyVersion:
    """A policy_versions row of either backend (its JSON columns as text or decoded)."""
    snap = None
    if "files" in row:

        def decoded(value: Any) -> Any:
            return json.loads(value) if isinstance(value, str) else value

        policies = decoded(row["policies"])
        snap = Snapshot(
            row["version"],
            tuple(FileText.from_dict(f) for f in decoded(row["files"])),
            None if policies is None else {k: (v[0], v[1]) for k, v in policies.items()},
            row["policy_count"],
            files_complete=not row["truncated"],
        )
    return PolicyVersion(
        seq=row["seq"],
        version=row["version"],
        loaded_at=datetime.fromtimestamp(row["loaded_at"], UTC),
        trigger=row["trigger"],
        loaded_by=row["loaded_by"],
        last_loaded_at=datetime.fromtimestamp(row["last_loaded_at"], UTC),
        policy_count=row["policy_count"],
        file_count=row["file_count"],
        text_bytes=row["text_bytes"],
        truncated=bool(row["truncated"]),
        snapshot=snap,
    )


@dataclass(frozen=True)
class AdminAction:
    """One row of the admin audit table."""

    seq: int
    at: datetime
    actor: str
    role: str
    action: str
    target: dict[str, object]
    count: int


@dataclass(frozen=True)
class PolicyOverride:
    """A suspension (``subject`` None) or a break-glass exemption of one ``user:NAME`` or
    ``device:ID`` from one policy, until ``until``."""

    policy_id: str
    subject: str | None
    until: datetime
    reason: str
    actor: str
    created_at: datetime

    def as_dict(self) -> dict[str, object]:
        return {
            "policy_id": self.policy_id,
            "kind": "suspension" if self.subject is None else "exemption",
            "subject": self.subject,
            "until": self.until.isoformat(),
            "reason": self.reason,
            "actor": self.actor,
            "created_at": self.created_at.isoformat(),
        }


def override_of_row(row: dict[str, Any]) -> PolicyOverride:
    return PolicyOverride(
        row["policy_id"],
        row["subject"],
        datetime.fromtimestamp(row["until"], UTC),
        row["reason"],
        row["actor"],
        datetime.fromtimestamp(row["created_at"], UTC),
    )


def overrides_of(rows: Sequence[PolicyOverride]) -> Overrides:
    """The engine's value of the overrides in force."""
    return Overrides(
        frozenset(r.policy_id for r in rows if r.subject is None),
        frozenset((r.policy_id, r.subject) for r in rows if r.subject is not None),
    )


@dataclass(frozen=True)
class HeldStats:
    """What the hold store holds, in brief (metrics)."""

    messages: int
    bytes: int
    oldest: datetime | None  # arrival of the oldest held message


class HoldBackend(Protocol):
    """What a hold store does, whichever database holds it: :class:`HoldStore` (SQLite,
    one gateway) and ``gateway.hold.postgres.PostgresHoldStore`` (shared by several).
    Every method raises :class:`HoldStoreError` and nothing else from the database."""

    def close(self) -> None: ...
    def hold(self, held: HeldSubmission) -> str: ...
    def select(
        self, where: HoldFilter = ..., limit: int = 1000, after: int = 0
    ) -> list[HeldMessage]: ...
    def get(self, hold_id: str, with_content: bool = True) -> HeldMessage | None: ...
    def due(
        self, now: datetime, device_id: str | None = None, limit: int = 500, after: int = 0
    ) -> list[HeldMessage]: ...
    def content(self, hold_id: str) -> bytes | None: ...
    def contents(self, hold_ids: Sequence[str]) -> dict[str, bytes]: ...
    def headers(self, hold_id: str) -> bytes: ...
    def claim(
        self,
        hold_ids: Sequence[str],
        claim_id: str,
        at: float,
        attempts: Sequence[int] | None = None,
    ) -> int: ...
    def claim_lanes(self, lanes: Sequence[LaneClaim], at: float) -> list[int]: ...
    def unclaim(self, hold_ids: Sequence[str]) -> int: ...
    def claimed(self) -> int: ...
    def settle(self, settlement: Settlement) -> bool: ...
    def probe_write(self, at: float) -> None: ...
    def device_ids(self) -> set[str]: ...
    def count(self) -> int: ...
    def stats(self) -> HeldStats: ...
    def remove(self, hold_ids: Sequence[str]) -> int: ...
    def request_release(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int: ...
    def drop(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int: ...
    def postpone(self, hold_id: str, next_attempt: float, error: str) -> None: ...
    def record_devices(self, seen: Sequence[tuple[DeviceClaims, float, Access]]) -> None: ...
    def claim_notice(self, device_id: str, policy_id: str, phase: str, now: datetime) -> bool: ...
    def unclaim_notice(self, device_id: str, policy_id: str, phase: str) -> None: ...
    def noticed_devices(self, policy_id: str) -> list[str]: ...
    def notices_sent(self, policy_ids: Sequence[str]) -> set[tuple[str, str, str]]: ...
    def first_seen(self, device_id: str, policy_id: str, now: datetime) -> datetime: ...
    def first_seen_times(self, device_id: str) -> dict[str, datetime]: ...
    def first_seen_of_policies(
        self, policy_ids: Sequence[str]
    ) -> dict[str, dict[str, datetime]]: ...
    def record_admin_action(
        self, at: float, actor: str, role: str, action: str, target: dict[str, object], count: int
    ) -> None: ...
    def admin_actions(self, limit: int = 100, before: int | None = None) -> list[AdminAction]: ...
    def suspend_policy(
        self, policy_id: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None: ...
    def resume_policy(self, policy_id: str) -> int: ...
    def exempt_from_policy(
        self, policy_id: str, subject: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None: ...
    def remove_exemption(self, policy_id: str, subject: str) -> int: ...
    def policy_overrides(self, now: datetime) -> list[PolicyOverride]: ...
    def prune_overrides(self, now: datetime) -> int: ...
    def devices(self, seen_since: datetime) -> list[DeviceClaims]: ...
    def device_accesses(self, seen_since: datetime) -> dict[str, frozenset[Access]]: ...
    def prune_devices(self, seen_before: datetime) -> int: ...
    def expired(self, before: datetime, limit: int = 100, after: int = 0) -> list[HeldMessage]: ...
    def record_policy_version(
        self, snap: Snapshot, at: float, trigger: str, loaded_by: str, keep: int
    ) -> bool: ...
    def policy_versions(
        self, limit: int = 100, before: int | None = None
    ) -> list[PolicyVersion]: ...
    def policy_version(self, version: str) -> PolicyVersion | None: ...


class AsyncStore:
    """The hold store for the event loop (``gateway serve``): each call runs a
    :class:`HoldBackend` method on a worker thread. Subclasses say how the backend is
    opened (``_run``) and closed."""

    async def _run(self, call: Callable[[HoldBackend], T]) -> T:
        raise NotImplementedError

    async def open(self) -> None:
        await self._run(lambda store: None)

    async def close(self) -> None:
        raise NotImplementedError

    async def listen(self, on_notice: Callable[[str], None]) -> None:
        """Hear other gateways sharing the store until cancelled (PostgreSQL's LISTEN);
        a SQLite store has one gateway; its workers hear each other in AsyncHoldStore."""
        return

    async def hold(self, message: HeldSubmission) -> str:
        return await self._run(lambda store: store.hold(message))

    async def due(
        self, now: datetime, device_id: str | None = None, limit: int = 500, after: int = 0
    ) -> list[HeldMessage]:
        return await self._run(lambda store: store.due(now, device_id, limit, after))

    async def remove(self, hold_ids: Sequence[str]) -> int:
        return await self._run(lambda store: store.remove(hold_ids))

    async def content(self, hold_id: str) -> bytes | None:
        return await self._run(lambda store: store.content(hold_id))

    async def contents(self, hold_ids: Sequence[str]) -> dict[str, bytes]:
        return await self._run(lambda store: store.contents(hold_ids))

    async def headers(self, hold_id: str) -> bytes:
        return await self._run(lambda store: store.headers(hold_id))

    async def claim(
        self,
        hold_ids: Sequence[str],
        claim_id: str,
        at: float,
        attempts: Sequence[int] | None = None,
    ) -> int:
        return await self._run(lambda store: store.claim(hold_ids, claim_id, at, attempts))

    async def claim_lanes(self, lanes: Sequence[LaneClaim], at: float) -> list[int]:
        return await self._run(lambda store: store.claim_lanes(lanes, at))

    async def unclaim(self, hold_ids: Sequence[str]) -> int:
        return await self._run(lambda store: store.unclaim(hold_ids))

    async def claimed(self) -> int:
        return await self._run(lambda store: store.claimed())

    async def settle(self, settlement: Settlement) -> bool:
        return await self._run(lambda store: store.settle(settlement))

    async def probe_write(self, at: float) -> None:
        await self._run(lambda store: store.probe_write(at))

    async def expired(
        self, before: datetime, limit: int = 100, after: int = 0
    ) -> list[HeldMessage]:
        return await self._run(lambda store: store.expired(before, limit, after))

    async def record_devices(self, seen: Sequence[tuple[DeviceClaims, float, Access]]) -> None:
        await self._run(lambda store: store.record_devices(seen))

    async def device_accesses(self, seen_since: datetime) -> dict[str, frozenset[Access]]:
        return await self._run(lambda store: store.device_accesses(seen_since))

    async def claim_notice(self, device_id: str, policy_id: str, phase: str, now: datetime) -> bool:
        return await self._run(lambda store: store.claim_notice(device_id, policy_id, phase, now))

    async def first_seen(self, device_id: str, policy_id: str, now: datetime) -> datetime:
        return await self._run(lambda s: s.first_seen(device_id, policy_id, now))

    async def noticed_devices(self, policy_id: str) -> list[str]:
        return await self._run(lambda s: s.noticed_devices(policy_id))

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

    async def stats(self) -> HeldStats:
        return await self._run(lambda store: store.stats())

    # The admin API's calls (gateway/admin).

    async def select(
        self, where: HoldFilter = HoldFilter(), limit: int = 1000, after: int = 0
    ) -> list[HeldMessage]:
        return await self._run(lambda store: store.select(where, limit, after))

    async def get(self, hold_id: str, with_content: bool = True) -> HeldMessage | None:
        return await self._run(lambda store: store.get(hold_id, with_content))

    async def request_release(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        return await self._run(lambda store: store.request_release(where, hold_ids))

    async def drop(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        return await self._run(lambda store: store.drop(where, hold_ids))

    async def record_admin_action(
        self, at: float, actor: str, role: str, action: str, target: dict[str, object], count: int
    ) -> None:
        await self._run(
            lambda store: store.record_admin_action(at, actor, role, action, target, count)
        )

    async def admin_actions(self, limit: int = 100, before: int | None = None) -> list[AdminAction]:
        return await self._run(lambda store: store.admin_actions(limit, before))

    # Operator overrides (gateway policy suspend / exempt, the admin API).

    async def suspend_policy(
        self, policy_id: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        await self._run(lambda s: s.suspend_policy(policy_id, until, reason, actor, now))

    async def resume_policy(self, policy_id: str) -> int:
        return await self._run(lambda s: s.resume_policy(policy_id))

    async def exempt_from_policy(
        self, policy_id: str, subject: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        await self._run(
            lambda s: s.exempt_from_policy(policy_id, subject, until, reason, actor, now)
        )

    async def remove_exemption(self, policy_id: str, subject: str) -> int:
        return await self._run(lambda s: s.remove_exemption(policy_id, subject))

    async def policy_overrides(self, now: datetime) -> list[PolicyOverride]:
        return await self._run(lambda s: s.policy_overrides(now))

    async def prune_overrides(self, now: datetime) -> int:
        return await self._run(lambda s: s.prune_overrides(now))

    # Policy history (gateway/policy/history.py).

    async def record_policy_version(
        self, snap: Snapshot, at: float, trigger: str, loaded_by: str, keep: int
    ) -> bool:
        return await self._run(
            lambda s: s.record_policy_version(snap, at, trigger, loaded_by, keep)
        )

    async def policy_versions(
        self, limit: int = 100, before: int | None = None
    ) -> list[PolicyVersion]:
        return await self._run(lambda s: s.policy_versions(limit, before))

    async def policy_version(self, version: str) -> PolicyVersion | None:
        return await self._run(lambda s: s.policy_version(version))


class AsyncHoldStore(AsyncStore):
    """The hold store for the event loop (``gateway serve``): every call runs on one
    dedicated thread. Opening takes the store's :class:`StoreLock`, checks the file and
    makes the claims of an earlier run stale; closing releases the lock.

    A worker of ``gateway serve --workers N`` (``peers`` given) does none of that: its
    supervisor holds the lock and did the check; the workers tell each other of holds,
    release requests and override changes (``listen`` hears them)."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        min_free_bytes: int = 0,
        lease: float = DEFAULT_CLAIM_LEASE,
        peers: Peers | None = None,
    ) -> None:
        self.min_free_bytes = min_free_bytes
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hold-store")
        self._store: HoldStore | None = None
        self._lock = StoreLock(path)
        self.path = path
        self.busy_timeout = busy_timeout
        self.lease = lease
        self.peers = peers

    def _open(self) -> HoldStore:
        if self.peers is not None:
            return HoldStore(
                self.path,
                busy_timeout=self.busy_timeout,
                min_free_bytes=self.min_free_bytes,
                lease=self.lease,
            )
        self._lock.acquire()
        try:
            store = open_checked(self.path, self.busy_timeout, self.min_free_bytes, self.lease)
        except BaseException:
            self._lock.release()
            raise
        return store

    async def _run(self, call: Callable[[HoldBackend], T]) -> T:
        loop = asyncio.get_running_loop()

        def in_thread() -> T:
            if self._store is None:
                self._store = self._open()
            return call(self._store)

        return await loop.run_in_executor(self._executor, in_thread)

    async def listen(self, on_notice: Callable[[str], None]) -> None:
        if self.peers is not None:
            await self.peers.listen(on_notice)

    def _tell(self, notice: str) -> None:
        if self.peers is not None:
            self.peers.tell(notice)

    async def hold(self, message: HeldSubmission) -> str:
        hold_id = await super().hold(message)
        self._tell(f"held {message.claims.device.id}")
        return hold_id

    async def request_release(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        marked = await super().request_release(where, hold_ids)
        if marked:
            self._tell("release")
        return marked

    async def suspend_policy(
        self, policy_id: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        await super().suspend_policy(policy_id, until, reason, actor, now)
        self._tell("overrides")

    async def resume_policy(self, policy_id: str) -> int:
        resumed = await super().resume_policy(policy_id)
        self._tell("overrides")
        return resumed

    async def exempt_from_policy(
        self, policy_id: str, subject: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        await super().exempt_from_policy(policy_id, subject, until, reason, actor, now)
        self._tell("overrides")

    async def remove_exemption(self, policy_id: str, subject: str) -> int:
        removed = await super().remove_exemption(policy_id, subject)
        self._tell("overrides")
        return removed

    async def close(self) -> None:
        def close(store: HoldBackend) -> None:
            store.close()

        try:
            if self._store is not None:
                await self._run(close)
        finally:
            self._store = None
            try:
                self._lock.release()  # after the connection closed (or failed to)
            finally:
                self._executor.shutdown(wait=True)
                if self.peers is not None:
                    self.peers.close()


def open_checked(
    path: Path,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    min_free_bytes: int = 0,
    lease: float = DEFAULT_CLAIM_LEASE,
) -> HoldStore:
    """The store as the one process holding its :class:`StoreLock` opens it: checked
    (``PRAGMA quick_check``), migrated, and with every claim made stale, since none can
    belong to a live process (a single gateway, or a supervisor before its workers)."""
    store = HoldStore(
        path, busy_timeout=busy_timeout, check=True, min_free_bytes=min_free_bytes, lease=lease
    )
    try:
        store.expire_claims()
    except BaseException:
        store.close()
        raise
    return store


def held_rows(path: Path) -> list[HeldMessage]:
    """Every held message in the store at ``path`` (opened, read, closed): for tools and
    tests that look once."""
    with HoldStore(path) as store:
        return store.select()
