"""The hold store on PostgreSQL, shared by several gateways (``[store] url``).

The same :class:`~gateway.hold.store.HoldBackend` as the SQLite store, in hand-written SQL
over psycopg 3 and a ``psycopg_pool`` connection pool: each method is one transaction on
one pooled connection, committed before it returns, so a hold is durable (the server's
WAL fsynced, with ``synchronous_commit`` on, its default) before the client hears 250.

What differs from SQLite, because several gateways write at once:

claims    a release attempt claims a device's due messages (``claim``) before relaying
          them (committed without waiting for the WAL's fsync: a claim lost in a crash
          leaves the message held and relayed again, as with its claim). The claim is taken under a per-device transaction-level advisory lock, the
          rows with ``FOR UPDATE SKIP LOCKED``, and only if no other live claim holds any
          of that device's mail: so two gateways never relay the same message, and a
          device's mail goes out in order from one gateway at a time. A claim is a lease
          (``[store] claim_lease_seconds``): a crashed gateway's claims expire.
settle    locks the row first (``FOR UPDATE``); a message already settled or dropped by
          another gateway or an admin is left alone, so an expiry or refusal bounce is
          written once.
schema    versioned (``schema_version``); migrations run at start under an advisory lock,
          or by hand (``gateway store migrate``).
errors    every psycopg error leaves as :class:`HoldStoreError`, translated once
          (``_failure``) into what an operator can act on; the password is never in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import psycopg_pool
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from gateway.config.settings import StoreSettings
from gateway.domain import Access, DeviceClaims, HeldSubmission
from gateway.errors import HoldStoreError, HoldStoreLowOnSpace
from gateway.hold.store import (
    HEADER_LIMIT,
    PRUNE_VERSIONS,
    VERSION_SUMMARY,
    AdminAction,
    AsyncStore,
    HeldMessage,
    HeldStats,
    HoldBackend,
    HoldFilter,
    LaneClaim,
    PolicyOverride,
    Settlement,
    accesses_used,
    header_block,
    override_of_row,
    policy_version_of_row,
    version_values,
)
from gateway.policy.history import PolicyVersion, Snapshot

T = TypeVar("T")
log = structlog.get_logger("gateway.hold")
Cursor = psycopg.Cursor[dict[str, Any]]

# Advisory lock keys (two-int form: this namespace, then a key).
_LOCKS = 0x47415445  # "GATE"
_MIGRATE_LOCK = 1

# Each migration once, in order; a store records the versions applied in schema_version.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE held (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- arrival order
    hold_id        text NOT NULL UNIQUE,
    received_at    timestamptz NOT NULL,
    sender         text NOT NULL,
    recipients     jsonb NOT NULL,
    "user"         text NOT NULL,
    device_id      text NOT NULL,
    claims         jsonb NOT NULL,
    policy_ids     jsonb NOT NULL,
    policy_version text NOT NULL,
    size           bigint NOT NULL,
    attempts       integer NOT NULL DEFAULT 0,
    next_attempt   double precision NOT NULL DEFAULT 0,
    last_error     text,
    release_requested boolean NOT NULL DEFAULT false,
    options        jsonb NOT NULL DEFAULT '[]',
    claim_id       text,
    claimed_at     double precision,
    bounce_of      text
);
-- The bytes apart from the metadata, so that release passes never read them.
CREATE TABLE held_bodies (
    seq            bigint PRIMARY KEY REFERENCES held (seq) ON DELETE CASCADE,
    message        bytea NOT NULL
);
CREATE INDEX held_device ON held (device_id, seq);
CREATE INDEX held_user ON held ("user");
CREATE INDEX held_due ON held (next_attempt, seq);
CREATE TABLE notices (
    device_id  text NOT NULL,
    policy_id  text NOT NULL,
    phase      text NOT NULL,
    sent_at    double precision NOT NULL,
    PRIMARY KEY (device_id, policy_id, phase)
);
CREATE TABLE health (
    id         integer PRIMARY KEY CHECK (id = 1),
    written_at double precision NOT NULL
);
CREATE TABLE devices (
    device_id  text PRIMARY KEY,
    "user"     text NOT NULL,
    claims     jsonb NOT NULL,
    last_seen  double precision NOT NULL,
    last_send  double precision,
    last_sync  double precision
);
""",
    ),
    (
        2,
        """
-- grace_hours: when each device was first seen matching each policy (first writer wins).
CREATE TABLE policy_first_seen (
    device_id  text NOT NULL,
    policy_id  text NOT NULL,
    first_seen double precision NOT NULL,
    PRIMARY KEY (device_id, policy_id)
);
""",
    ),
    (
        3,
        """
-- Admin actions through the admin API: who, what, when (gateway/admin).
CREATE TABLE admin_audit (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         double precision NOT NULL,
    actor      text NOT NULL,
    role       text NOT NULL,
    action     text NOT NULL,
    target     jsonb NOT NULL,
    count      integer NOT NULL
);
""",
    ),
    (
        4,
        """
-- Operator overrides without editing policy files (gateway policy suspend / exempt).
CREATE TABLE policy_suspensions (
    policy_id  text PRIMARY KEY,
    until      double precision NOT NULL,
    reason     text NOT NULL,
    actor      text NOT NULL,
    created_at double precision NOT NULL
);
CREATE TABLE policy_exemptions (
    policy_id      text NOT NULL,
    user_or_device text NOT NULL,
    until          double precision NOT NULL,
    reason         text NOT NULL,
    actor          text NOT NULL,
    created_at     double precision NOT NULL,
    PRIMARY KEY (policy_id, user_or_device)
);
""",
    ),
    (
        5,
        """
-- Every policy set a gateway put in force, once per version however many gateways load it
-- (gateway/policy/history.py): first in force when and by what, last loaded when, the
-- files' text (bounded) and the policies' fingerprints. At most KEEP_VERSIONS rows.
CREATE TABLE policy_versions (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version        text NOT NULL UNIQUE,
    loaded_at      double precision NOT NULL,
    trigger        text NOT NULL,
    loaded_by      text NOT NULL,
    last_loaded_at double precision NOT NULL,
    policy_count   integer NOT NULL,
    file_count     integer NOT NULL,
    text_bytes     integer NOT NULL,
    truncated      boolean NOT NULL,
    files          jsonb NOT NULL,
    policies       jsonb
);
""",
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
_EVERYTHING = HoldFilter()

_COLUMNS = (
    'seq, hold_id, received_at, sender, recipients, "user", device_id, claims, policy_ids, '
    "policy_version, size, attempts, last_error, release_requested, options, claim_id, bounce_of"
)
_INSERT = (
    'WITH h AS (INSERT INTO held (hold_id, received_at, sender, recipients, "user", device_id, '
    "claims, policy_ids, policy_version, size, options, release_requested, bounce_of) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq, device_id) "
    "INSERT INTO held_bodies (seq, message) SELECT seq, %s FROM h"
)
# The same, telling the other gateways (delivered at COMMIT, so never before the row exists).
CHANNEL = "gateway_hold"
_INSERT_AND_NOTIFY = (
    _INSERT.replace("INSERT INTO held_bodies", ", b AS (INSERT INTO held_bodies")
    + f") SELECT pg_notify('{CHANNEL}', 'held ' || device_id) FROM h"
)


# A claim (PostgresHoldStore.claim): the per-device advisory locks, taken in device order
# (ORDER BY comes before volatile functions in the select list), then all or nothing of
# the messages: none when another gateway's live claim holds mail of one of the devices,
# or when one of the messages is not claimable (settled, dropped, retried, or being
# written by another transaction: SKIP LOCKED).
_CLAIM_LOCKS = (
    b"SELECT pg_advisory_xact_lock(%(lock)s, hashtext(device_id)) FROM (SELECT DISTINCT "
    b"device_id FROM held WHERE hold_id = ANY(%(ids)s) AND bounce_of IS NULL) AS d "
    b"ORDER BY device_id"
)
# Every lane of a batch in one statement: each lane (``lane``: its index) is claimed whole
# or not at all. A row is claimable when unclaimed, claimed by this gateway's own earlier
# attempt, or its claim is stale, and (when the lane says) its attempts are as read; rows
# another transaction is writing are skipped, which fails their lane rather than waiting.
# A lane also fails while another gateway's live claim holds mail of its device.
_CLAIM = b"""WITH wanted AS (
  SELECT DISTINCT * FROM unnest(%(ids)s::text[], %(lanes)s::int[], %(attempts)s::int[])
    AS w(hold_id, lane, attempts)),
lanes AS (
  SELECT * FROM unnest(%(lane_ids)s::int[], %(claims)s::text[], %(counts)s::int[])
    AS l(lane, claim, count)),
target AS (
  SELECT h.seq, w.lane FROM held h JOIN wanted w ON w.hold_id = h.hold_id
  WHERE (h.claim_id IS NULL OR split_part(h.claim_id, '.', 1) = %(holder)s
         OR h.claimed_at < %(stale)s)
    AND (w.attempts IS NULL OR h.attempts = w.attempts)
  FOR UPDATE OF h SKIP LOCKED),
busy AS (
  SELECT DISTINCT w.lane FROM wanted w
  JOIN held mine ON mine.hold_id = w.hold_id AND mine.bounce_of IS NULL
  JOIN held other ON other.device_id = mine.device_id AND other.bounce_of IS NULL
   AND other.claim_id IS NOT NULL AND split_part(other.claim_id, '.', 1) <> %(holder)s
   AND other.claimed_at >= %(stale)s),
whole AS (
  SELECT t.lane FROM target t JOIN lanes l ON l.lane = t.lane
  GROUP BY t.lane, l.count HAVING count(*) = l.count
  EXCEPT SELECT lane FROM busy)
UPDATE held SET claim_id = l.claim, claimed_at = %(at)s
FROM target t JOIN whole USING (lane) JOIN lanes l USING (lane)
WHERE held.seq = t.seq
RETURNING t.lane"""


def _row(row: dict[str, Any], content: bytes | None = None) -> HeldMessage:
    return HeldMessage(
        seq=row["seq"],
        hold_id=row["hold_id"],
        received_at=row["received_at"].astimezone(UTC),
        sender=row["sender"],
        recipients=tuple(row["recipients"]),
        user=row["user"],
        device_id=row["device_id"],
        claims=DeviceClaims.from_json(row["claims"]),
        policy_ids=tuple(row["policy_ids"]),
        policy_version=row["policy_version"],
        size=row["size"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        release_requested=bool(row["release_requested"]),
        content=content,
        options=tuple(row["options"]),
        claim_id=row["claim_id"],
        bounce_of=row["bounce_of"],
    )


def _where(where: HoldFilter, hold_ids: Sequence[str] = ()) -> tuple[str, list[object]]:
    """A filter as a WHERE clause of fixed fragments; every value a bound parameter."""
    clauses: list[str] = []
    params: list[object] = []
    if where.user:
        clauses.append('"user" = %s')
        params.append(where.user.casefold())
    if where.device_id:
        clauses.append("device_id = %s")
        params.append(where.device_id)
    if where.policy_id:
        clauses.append("policy_ids @> %s")
        params.append(Jsonb([where.policy_id]))
    if hold_ids:
        clauses.append("hold_id = ANY(%s)")
        params.append(list(hold_ids))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def describe(url: str) -> str:
    """The server a URL names, for messages: user@host:port/database, never a password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "(an unreadable [store] url)"
    user = parts.get("user") or "(default user)"
    host = parts.get("host") or "localhost"
    return f"postgresql://{user}@{host}:{parts.get('port') or 5432}/{parts.get('dbname') or user}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


_AUTH_HINTS = ("password authentication failed", "no password supplied", "pg_hba.conf")


def _failure(server: str, doing: str, exc: Exception, timeout: float) -> HoldStoreError:
    """The one translation of a psycopg error into what an operator can act on."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return HoldStoreError(
            f"hold store {server}: {doing} failed: no connection within {timeout:g} s; "
            "check that PostgreSQL runs and accepts connections from this host, or raise "
            "[store] pool_size if every connection is busy"
        )
    detail = _one_line(str(exc))
    state = getattr(exc, "sqlstate", None) or ""
    if state in ("28P01", "28000") or any(hint in detail for hint in _AUTH_HINTS):
        return HoldStoreError(
            f"hold store {server}: PostgreSQL refused the login: {detail}; check the user "
            "in [store] url, the password in [store] password_file (or PGPASSWORD) and "
            "the server's pg_hba.conf"
        )
    if state == "3D000" or ("database" in detail and "does not exist" in detail):
        return HoldStoreError(
            f"hold store {server}: {detail}; create the database (createdb) or fix the "
            "database name in [store] url"
        )
    if state == "53100":
        return HoldStoreLowOnSpace(
            f"hold store {server}: {doing} failed: PostgreSQL is out of disk space "
            f"({detail}); free space on the database server's data disk"
        )
    if state == "53300":
        return HoldStoreError(
            f"hold store {server}: {detail}; raise the server's max_connections or lower "
            "[store] pool_size (each gateway opens up to pool_size connections)"
        )
    if state == "25006":
        return HoldStoreError(
            f"hold store {server}: {doing} failed: the server is read-only (a standby?); "
            "point [store] url at the primary (target_session_attrs=read-write)"
        )
    if state == "42501":
        return HoldStoreError(
            f"hold store {server}: {doing} failed: {detail}; grant the gateway's user the "
            "rights on its database (it owns its tables)"
        )
    if isinstance(exc, psycopg.OperationalError) or state.startswith(("08", "57P")):
        return HoldStoreError(
            f"hold store {server}: {doing} failed: cannot reach PostgreSQL ({detail}); "
            "check that the server runs and that host and port in [store] url are right"
        )
    if isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError):
        return HoldStoreError(
            f"hold store {server}: {doing} failed: {detail} (a bug in the gateway; please "
            "report it)"
        )
    return HoldStoreError(f"hold store {server}: {doing} failed: {detail}")


def _connect_options(settings: StoreSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "connect_timeout": max(1, math.ceil(settings.connect_timeout)),
        "application_name": "compliance-gateway",
    }
    if settings.password is not None:
        options["password"] = settings.password  # else libpq reads PGPASSWORD
    return options


def migrate(conn: psycopg.Connection[Any], server: str) -> list[int]:
    """Apply the migrations this store lacks, in one transaction under an advisory lock
    (several gateways starting at once apply them once); the versions applied."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCKS, _MIGRATE_LOCK))
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = cur.fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise HoldStoreError(
                f"hold store {server} has schema version {current}, newer than this gateway "
                f"knows ({SCHEMA_VERSION}); run the newer gateway, or restore a backup"
            )
        applied = []
        for version, sql in MIGRATIONS:
            if version > current:
                cur.execute(sql.encode())  # fixed text, no parameters
                cur.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                applied.append(version)
        return applied


def schema_version(conn: psycopg.Connection[Any]) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
        row = cur.fetchone()
        if not row or not row[0]:
            return 0
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        row = cur.fetchone()
        return int(row[0]) if row else 0


class PostgresHoldStore:
    """Synchronous (the CLI, and the worker threads of :class:`AsyncPostgresHoldStore`);
    safe to call from several threads at once (one pooled connection per call)."""

    def __init__(
        self, settings: StoreSettings, *, migrate_schema: bool = True, pool_size: int | None = None
    ) -> None:
        if settings.url is None:
            raise HoldStoreError("no [store] url: the PostgreSQL store needs one")
        self.server = describe(settings.url)
        self.lease = settings.claim_lease
        self.timeout = settings.connect_timeout
        options = _connect_options(settings)
        with self._errors("connecting"):
            # A direct connection first: its error says what is wrong (a pool's says
            # only that no connection came), and it applies the migrations.
            with psycopg.connect(settings.url, autocommit=True, **options) as conn:
                if migrate_schema:
                    migrate(conn, self.server)
                elif (found := schema_version(conn)) != SCHEMA_VERSION:
                    raise HoldStoreError(
                        f"hold store {self.server} has schema version {found}, this gateway "
                        f"needs {SCHEMA_VERSION}: run `gateway store migrate`"
                    )
            self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = (
                psycopg_pool.ConnectionPool(
                    settings.url,
                    kwargs={**options, "autocommit": True},  # transactions are explicit
                    min_size=1,
                    max_size=pool_size or settings.pool_size,
                    open=False,
                    # No check at each checkout (a round trip per call, a quarter of a
                    # hold's time): a connection found broken checks the idle ones instead.
                    timeout=settings.connect_timeout,
                    name="hold-store",
                )
            )
            try:
                self._pool.open(wait=True, timeout=settings.connect_timeout)
            except BaseException:
                self._pool.close()
                raise

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except HoldStoreError:
            raise
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            if isinstance(exc, psycopg.OperationalError):
                self._drop_broken()
            raise _failure(self.server, doing, exc, self.timeout) from exc

    def _drop_broken(self) -> None:
        """After a connection failed (the server restarted, the network dropped it), test
        the pool's idle connections and replace the broken ones, so that this failure is
        the only one they cause: the next call gets a live connection or a new one."""
        pool = getattr(self, "_pool", None)  # None while the first connection is made
        if pool is None or pool.closed:
            return
        try:
            pool.check()
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
            log.warning("store_pool_check_failed", error=_one_line(str(exc)))

    def _transaction(self, doing: str, work: Callable[[Cursor], T]) -> T:
        """``work`` in one transaction on one pooled connection: committed, or rolled back
        on any failure."""
        with (
            self._errors(doing),
            self._pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cur,
        ):
            return work(cur)

    def _statement(self, doing: str, work: Callable[[Cursor], T]) -> T:
        """One statement, which autocommit makes its own transaction: no BEGIN and COMMIT
        round trips (a hold is one statement, answered once it is committed)."""
        with (
            self._errors(doing),
            self._pool.connection() as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            return work(cur)

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        def query(cur: Cursor) -> list[dict[str, Any]]:
            cur.execute(sql.encode(), params)
            return cur.fetchall()

        return self._statement("read", query)

    def _write(self, sql: str, params: Sequence[object] = ()) -> int:
        def statement(cur: Cursor) -> int:
            cur.execute(sql.encode(), params)
            return cur.rowcount

        return self._statement("write", statement)

    def close(self) -> None:
        with self._errors("close"):
            self._pool.close()

    # --- held mail ------------------------------------------------------------------------

    def hold(self, held: HeldSubmission) -> str:
        hold_id = uuid.uuid4().hex
        claims = held.claims
        values = (
            hold_id,
            held.received_at.astimezone(UTC),
            held.sender,
            Jsonb(list(held.recipients)),
            claims.user,
            claims.device.id,
            Jsonb(claims.to_json()),
            Jsonb(list(held.decision.policy_ids)),
            held.decision.policy_version,
            len(held.content),
            Jsonb(list(held.options)),
            False,
            None,
            held.content,
        )
        self._write(_INSERT_AND_NOTIFY, values)
        return hold_id

    def select(
        self, where: HoldFilter = _EVERYTHING, limit: int = 1000, after: int = 0
    ) -> list[HeldMessage]:
        """Held messages in arrival order; ``after`` pages on by seq (the admin API)."""
        clause, params = _where(where)
        clause += (" AND " if clause else " WHERE ") + "seq > %s"
        rows = self._read(
            f"SELECT {_COLUMNS} FROM held{clause} ORDER BY seq LIMIT %s", [*params, after, limit]
        )
        return [_row(r) for r in rows]

    def get(self, hold_id: str, with_content: bool = True) -> HeldMessage | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM held WHERE hold_id = %s", (hold_id,))
        if not rows:
            return None
        return _row(rows[0], self.content(hold_id) if with_content else None)

    def due(
        self, now: datetime, device_id: str | None = None, limit: int = 500, after: int = 0
    ) -> list[HeldMessage]:
        sql = f"SELECT {_COLUMNS} FROM held WHERE next_attempt <= %s AND seq > %s"
        params: list[object] = [now.timestamp(), after]
        if device_id is not None:
            sql += " AND device_id = %s"
            params.append(device_id)
        rows = self._read(sql + " ORDER BY seq LIMIT %s", [*params, limit])
        return [_row(r) for r in rows]

    def content(self, hold_id: str) -> bytes | None:
        rows = self._read(
            "SELECT b.message FROM held h JOIN held_bodies b ON b.seq = h.seq WHERE h.hold_id = %s",
            (hold_id,),
        )
        return bytes(rows[0]["message"]) if rows else None

    def contents(self, hold_ids: Sequence[str]) -> dict[str, bytes]:
        if not hold_ids:
            return {}
        rows = self._read(
            "SELECT h.hold_id, b.message FROM held h JOIN held_bodies b ON b.seq = h.seq "
            "WHERE h.hold_id = ANY(%s)",
            (list(hold_ids),),
        )
        return {row["hold_id"]: bytes(row["message"]) for row in rows}

    def headers(self, hold_id: str) -> bytes:
        rows = self._read(
            "SELECT substring(b.message FROM 1 FOR %s) AS start FROM held h "
            "JOIN held_bodies b ON b.seq = h.seq WHERE h.hold_id = %s",
            (HEADER_LIMIT, hold_id),
        )
        if not rows:
            return b""
        return header_block(bytes(rows[0]["start"]))

    def claim(
        self,
        hold_ids: Sequence[str],
        claim_id: str,
        at: float,
        attempts: Sequence[int] | None = None,
    ) -> int:
        """Claim all of ``hold_ids`` for one release attempt, or none (0): none when another
        gateway's live claim holds mail of the same device (it relays it), or when a
        message was settled, dropped or retried meanwhile (``attempts`` changed).

        Per device, claims are serialised by a transaction-level advisory lock, so two
        gateways cannot both find a device free; rows another transaction is writing are
        skipped (``SKIP LOCKED``), which makes the claim fail rather than wait."""
        if not hold_ids:
            return 0
        attempted = None if attempts is None else tuple(attempts)
        return self.claim_lanes([LaneClaim(tuple(hold_ids), claim_id, attempted)], at)[0]

    def claim_lanes(self, lanes: Sequence[LaneClaim], at: float) -> list[int]:
        """:meth:`claim` for several lanes in one transaction, sent as one pipeline: the
        locks of all their devices (sorted), then one statement that claims each lane
        all or nothing (one statement a page, not one a lane: bench/stores.py)."""
        counts = [0] * len(lanes)
        todo = [(index, lane) for index, lane in enumerate(lanes) if lane.hold_ids]
        if not todo:
            return counts
        stale = at - self.lease
        # "<gateway>.<attempt>": claims of this gateway's earlier attempts are its own to
        # take back (its passes run one at a time, so none of them is still relaying):
        # after a database outage the gateway does not wait out its own leases.
        every_id = [hold_id for _, lane in todo for hold_id in lane.hold_ids]
        params = {
            "ids": every_id,
            "lanes": [index for index, lane in todo for _ in lane.hold_ids],
            "attempts": [
                None if lane.attempts is None else lane.attempts[position]
                for _, lane in todo
                for position in range(len(lane.hold_ids))
            ],
            "lane_ids": [index for index, _ in todo],
            "claims": [lane.claim_id for _, lane in todo],
            "counts": [len(lane.hold_ids) for _, lane in todo],
            "holder": todo[0][1].claim_id.split(".", 1)[0],
            "stale": stale,
            "at": at,
        }
        with self._errors("write"), self._pool.connection() as conn:
            with (
                conn.pipeline(),  # one round trip for the whole transaction
                conn.transaction(),
            ):
                with conn.cursor() as cur:
                    # The commit need not wait for the WAL's fsync: a claim lost in a crash
                    # of the server leaves the message held, to be relayed again (as with
                    # its claim).
                    cur.execute(b"SET LOCAL synchronous_commit = off")
                    # Sorted: no two claims wait on each other in a cycle.
                    cur.execute(_CLAIM_LOCKS, {"lock": _LOCKS + 1, "ids": every_id})
                # A statement of its own, after the locks: its snapshot sees the claims of
                # whoever held a lock before us. Its rows are read after the commit, so
                # that reading them does not cost a round trip of its own.
                claim = conn.cursor()
                claim.execute(_CLAIM, params)
            with claim:
                for row in claim.fetchall():
                    counts[row[0]] += 1  # the lane's messages all, or 0 (nothing written)
        return counts

    def unclaim(self, hold_ids: Sequence[str]) -> int:
        if not hold_ids:
            return 0
        return self._write(
            "UPDATE held SET claim_id = NULL, claimed_at = NULL WHERE hold_id = ANY(%s)",
            (list(hold_ids),),
        )

    def claimed(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM held WHERE claim_id IS NOT NULL")[0]["n"])

    def settle(self, settlement: Settlement) -> bool:
        """One transaction: the row locked first, so that of two gateways settling the same
        message (an expiry on each) only the first writes, and its bounce once; the others
        get False (so that they count and log no expiry of their own). An expiry also gets
        False while a release attempt's claim on the message is live: the expiring gateway
        read it unclaimed, but another has claimed it since and may be relaying it."""

        def work(cur: Cursor) -> bool:
            hold_id = settlement.hold_id
            cur.execute(
                'SELECT sender, "user", device_id, claims, policy_ids, policy_version, '
                "claim_id, claimed_at FROM held WHERE hold_id = %s FOR UPDATE",
                (hold_id,),
            )
            row = cur.fetchone()
            if row is None:
                return False  # settled elsewhere, or dropped by an admin: no bounce then
            if (
                settlement.unless_claimed
                and row["claim_id"] is not None
                and row["claimed_at"] >= time.time() - self.lease
            ):
                return False  # being relayed: the next expiry pass looks again
            if settlement.bounce is not None:
                cur.execute(
                    _INSERT.encode(),
                    (
                        uuid.uuid4().hex,
                        settlement.at.astimezone(UTC),
                        "",
                        Jsonb([row["sender"]]),
                        row["user"],
                        row["device_id"],
                        Jsonb(row["claims"]),
                        Jsonb(row["policy_ids"]),
                        row["policy_version"],
                        len(settlement.bounce),
                        Jsonb([]),
                        True,  # released whatever the device's state: it goes to the sender
                        hold_id,
                        settlement.bounce,
                    ),
                )
            if settlement.retry:
                cur.execute(
                    "UPDATE held SET recipients = %s, attempts = attempts + 1, "
                    "next_attempt = %s, last_error = %s, claim_id = NULL, claimed_at = NULL "
                    "WHERE hold_id = %s",
                    (Jsonb(list(settlement.retry)), settlement.retry_at, settlement.error, hold_id),
                )
            else:
                cur.execute("DELETE FROM held WHERE hold_id = %s", (hold_id,))
            return True

        return self._transaction("write", work)

    def probe_write(self, at: float) -> None:
        self._write(
            "INSERT INTO health (id, written_at) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
            (at,),
        )

    def device_ids(self) -> set[str]:
        return {r["device_id"] for r in self._read("SELECT DISTINCT device_id FROM held")}

    def count(self) -> int:
        return int(self._read("SELECT count(*) AS n FROM held")[0]["n"])

    def stats(self) -> HeldStats:
        row = self._read(
            "SELECT count(*) AS n, coalesce(sum(size), 0) AS size, min(received_at) AS oldest "
            "FROM held"
        )[0]
        oldest = row["oldest"]
        return HeldStats(
            int(row["n"]), int(row["size"]), oldest.astimezone(UTC) if oldest else None
        )

    def remove(self, hold_ids: Sequence[str]) -> int:
        if not hold_ids:
            return 0
        return self._write("DELETE FROM held WHERE hold_id = ANY(%s)", (list(hold_ids),))

    def request_release(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        """Mark for release and wake every gateway (NOTIFY at COMMIT): one of them relays
        each message at once instead of at its next tick."""
        clause, params = _where(where, hold_ids)

        def work(cur: Cursor) -> int:
            cur.execute(
                f"UPDATE held SET release_requested = true, next_attempt = 0{clause}".encode(),
                params,
            )
            count = cur.rowcount
            if count:
                cur.execute("SELECT pg_notify(%s, 'release')", (CHANNEL,))
            return count

        return self._transaction("write", work)

    def drop(self, where: HoldFilter, hold_ids: Sequence[str] = ()) -> int:
        clause, params = _where(where, hold_ids)
        return self._write(f"DELETE FROM held{clause}", params)

    def postpone(self, hold_id: str, next_attempt: float, error: str) -> None:
        self._write(
            "UPDATE held SET attempts = attempts + 1, next_attempt = %s, last_error = %s, "
            "claim_id = NULL, claimed_at = NULL WHERE hold_id = %s",
            (next_attempt, error, hold_id),
        )

    def expired(self, before: datetime, limit: int = 100, after: int = 0) -> list[HeldMessage]:
        """As SQLite's, leaving out mail another gateway's live claim is relaying."""
        rows = self._read(
            f"SELECT {_COLUMNS} FROM held WHERE received_at < %s AND seq > %s "
            "AND (claim_id IS NULL OR claimed_at < %s) ORDER BY seq LIMIT %s",
            (before.astimezone(UTC), after, datetime.now(UTC).timestamp() - self.lease, limit),
        )
        return [_row(r) for r in rows]

    # --- devices and notices --------------------------------------------------------------

    def record_devices(self, seen: Sequence[tuple[DeviceClaims, float, Access]]) -> None:
        if not seen:
            return

        def work(cur: Cursor) -> None:
            cur.executemany(
                'INSERT INTO devices (device_id, "user", claims, last_seen, last_send, last_sync) '
                "VALUES (%s, %s, %s, %s, %s, %s) "
                'ON CONFLICT (device_id) DO UPDATE SET "user" = excluded."user", '
                "claims = excluded.claims, "
                "last_seen = greatest(devices.last_seen, excluded.last_seen), "
                "last_send = coalesce(excluded.last_send, devices.last_send), "
                "last_sync = coalesce(excluded.last_sync, devices.last_sync)",
                [
                    (
                        c.device.id,
                        c.user,
                        Jsonb(c.to_json()),
                        at,
                        at if access is Access.SEND else None,
                        at if access is Access.SYNC else None,
                    )
                    for c, at, access in seen
                ],
            )

        self._transaction("write", work)

    def claim_notice(self, device_id: str, policy_id: str, phase: str, now: datetime) -> bool:
        """True if this notice was not sent before, by any gateway (the primary key)."""
        return (
            self._write(
                "INSERT INTO notices (device_id, policy_id, phase, sent_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (device_id, policy_id, phase, now.timestamp()),
            )
            == 1
        )

    def unclaim_notice(self, device_id: str, policy_id: str, phase: str) -> None:
        self._write(
            "DELETE FROM notices WHERE device_id = %s AND policy_id = %s AND phase = %s",
            (device_id, policy_id, phase),
        )

    def noticed_devices(self, policy_id: str) -> list[str]:
        """Devices sent a notice mail for this policy (who a withdrawal goes to)."""
        rows = self._read(
            "SELECT DISTINCT device_id FROM notices WHERE policy_id = %s "
            "AND phase IN ('warn', 'hold', 'released') ORDER BY device_id",
            (policy_id,),
        )
        return [row["device_id"] for row in rows]

    def notices_sent(self, policy_ids: Sequence[str]) -> set[tuple[str, str, str]]:
        """(device, policy, phase) of the notice mails sent for these policies (impact)."""
        rows = self._read(
            "SELECT device_id, policy_id, phase FROM notices WHERE policy_id = ANY(%s) "
            "AND phase NOT LIKE '%%:sync'",
            (list(policy_ids),),
        )
        return {(r["device_id"], r["policy_id"], r["phase"]) for r in rows}

    def first_seen(self, device_id: str, policy_id: str, now: datetime) -> datetime:
        """When this device was first seen matching this policy, by any gateway: recorded
        as ``now`` if it never was (the first writer wins)."""

        def work(cur: Cursor) -> float:
            cur.execute(
                b"INSERT INTO policy_first_seen (device_id, policy_id, first_seen) "
                b"VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (device_id, policy_id, now.timestamp()),
            )
            cur.execute(
                b"SELECT first_seen FROM policy_first_seen WHERE device_id = %s AND policy_id = %s",
                (device_id, policy_id),
            )
            row = cur.fetchone()
            assert row is not None  # inserted above, or already there
            return float(row["first_seen"])

        return datetime.fromtimestamp(self._transaction("write", work), UTC)

    def record_admin_action(
        self, at: float, actor: str, role: str, action: str, target: dict[str, object], count: int
    ) -> None:
        """One admin action in the audit table, seen by every gateway on the store."""
        self._write(
            "INSERT INTO admin_audit (at, actor, role, action, target, count) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (at, actor, role, action, Jsonb(target), count),
        )

    def admin_actions(self, limit: int = 100, before: int | None = None) -> list[AdminAction]:
        """The audit table, newest first; ``before`` pages back by seq."""
        rows = self._read(
            "SELECT seq, at, actor, role, action, target, count FROM admin_audit "
            "WHERE seq < %s ORDER BY seq DESC LIMIT %s",
            (before if before is not None else 2**62, limit),
        )
        return [
            AdminAction(
                r["seq"],
                datetime.fromtimestamp(r["at"], UTC),
                r["actor"],
                r["role"],
                r["action"],
                dict(r["target"]),
                r["count"],
            )
            for r in rows
        ]

    def record_policy_version(
        self, snap: Snapshot, at: float, trigger: str, loaded_by: str, keep: int
    ) -> bool:
        """Store a version put in force once, whichever gateway loads it first (the unique
        version and ON CONFLICT: replicas loading one set at once write one row); later
        loads move its ``last_loaded_at``. Then prune beyond ``keep``. True if it was new."""
        values = version_values(snap, at, trigger, loaded_by)

        def work(cur: Cursor) -> bool:
            cur.execute(
                b"INSERT INTO policy_versions (version, loaded_at, trigger, loaded_by, "
                b"last_loaded_at, policy_count, file_count, text_bytes, truncated, files, "
                b"policies) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb) "
                b"ON CONFLICT (version) DO NOTHING",
                values,
            )
            inserted = cur.rowcount == 1
            if not inserted:
                cur.execute(
                    b"UPDATE policy_versions SET last_loaded_at = greatest(last_loaded_at, %s) "
                    b"WHERE version = %s",
                    (at, snap.version),
                )
            cur.execute(PRUNE_VERSIONS.encode(), (keep,))
            return inserted

        return self._transaction("write", work)

    def policy_versions(self, limit: int = 100, before: int | None = None) -> list[PolicyVersion]:
        """The stored versions without their text, newest first; ``before`` pages by seq."""
        rows = self._read(
            f"SELECT {VERSION_SUMMARY} FROM policy_versions WHERE seq < %s "
            "ORDER BY seq DESC LIMIT %s",
            (before if before is not None else 2**62, limit),
        )
        return [policy_version_of_row(r) for r in rows]

    def policy_version(self, version: str) -> PolicyVersion | None:
        """One stored version with its files' text and policies, or None."""
        rows = self._read(
            f"SELECT {VERSION_SUMMARY}, files, policies FROM policy_versions WHERE version = %s",
            (version,),
        )
        return policy_version_of_row(rows[0]) if rows else None

    def _override_write(self, sql: str, params: Sequence[object]) -> int:
        """One change of the overrides, waking every gateway on the store (NOTIFY at
        COMMIT) so each reads them at once."""

        def work(cur: Cursor) -> int:
            cur.execute(sql.encode(), params)
            count = cur.rowcount
            cur.execute("SELECT pg_notify(%s, 'overrides')", (CHANNEL,))
            return count

        return self._transaction("write", work)

    def suspend_policy(
        self, policy_id: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        """Suspend a policy on every gateway sharing the store (replaces an earlier one)."""
        self._override_write(
            "INSERT INTO policy_suspensions (policy_id, until, reason, actor, created_at) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (policy_id) DO UPDATE SET "
            "until = EXCLUDED.until, reason = EXCLUDED.reason, actor = EXCLUDED.actor, "
            "created_at = EXCLUDED.created_at",
            (policy_id, until.timestamp(), reason, actor, now.timestamp()),
        )

    def resume_policy(self, policy_id: str) -> int:
        return self._override_write(
            "DELETE FROM policy_suspensions WHERE policy_id = %s", (policy_id,)
        )

    def exempt_from_policy(
        self, policy_id: str, subject: str, until: datetime, reason: str, actor: str, now: datetime
    ) -> None:
        self._override_write(
            "INSERT INTO policy_exemptions (policy_id, user_or_device, until, reason, actor, "
            "created_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (policy_id, "
            "user_or_device) DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason, "
            "actor = EXCLUDED.actor, created_at = EXCLUDED.created_at",
            (policy_id, subject, until.timestamp(), reason, actor, now.timestamp()),
        )

    def remove_exemption(self, policy_id: str, subject: str) -> int:
        return self._override_write(
            "DELETE FROM policy_exemptions WHERE policy_id = %s AND user_or_device = %s",
            (policy_id, subject),
        )

    def prune_overrides(self, now: datetime) -> int:
        """Delete the overrides that ended by ``now``; how many."""
        at = now.timestamp()
        return self._write("DELETE FROM policy_suspensions WHERE until <= %s", (at,)) + (
            self._write("DELETE FROM policy_exemptions WHERE until <= %s", (at,))
        )

    def policy_overrides(self, now: datetime) -> list[PolicyOverride]:
        """The overrides in force at ``now`` (ended ones are ignored), suspensions first."""
        at = now.timestamp()
        rows = self._read(
            "SELECT policy_id, NULL::text AS subject, until, reason, actor, created_at "
            "FROM policy_suspensions WHERE until > %s UNION ALL SELECT policy_id, "
            "user_or_device, until, reason, actor, created_at FROM policy_exemptions "
            "WHERE until > %s ORDER BY subject NULLS FIRST, policy_id",
            (at, at),
        )
        return [override_of_row(r) for r in rows]

    def first_seen_times(self, device_id: str) -> dict[str, datetime]:
        rows = self._read(
            "SELECT policy_id, first_seen FROM policy_first_seen WHERE device_id = %s",
            (device_id,),
        )
        return {row["policy_id"]: datetime.fromtimestamp(row["first_seen"], UTC) for row in rows}

    def first_seen_of_policies(self, policy_ids: Sequence[str]) -> dict[str, dict[str, datetime]]:
        if not policy_ids:
            return {}
        rows = self._read(
            "SELECT device_id, policy_id, first_seen FROM policy_first_seen "
            "WHERE policy_id = ANY(%s)",
            (list(policy_ids),),
        )
        found: dict[str, dict[str, datetime]] = {}
        for row in rows:
            at = datetime.fromtimestamp(row["first_seen"], UTC)
            found.setdefault(row["device_id"], {})[row["policy_id"]] = at
        return found

    def devices(self, seen_since: datetime) -> list[DeviceClaims]:
        rows = self._read(
            "SELECT claims FROM devices WHERE last_seen >= %s ORDER BY device_id",
            (seen_since.timestamp(),),
        )
        return [DeviceClaims.from_json(row["claims"]) for row in rows]

    def device_accesses(self, seen_since: datetime) -> dict[str, frozenset[Access]]:
        rows = self._read(
            "SELECT device_id, last_send, last_sync FROM devices WHERE last_seen >= %s",
            (seen_since.timestamp(),),
        )
        return {row["device_id"]: accesses_used(row["last_send"], row["last_sync"]) for row in rows}

    def prune_devices(self, seen_before: datetime) -> int:
        return self._write("DELETE FROM devices WHERE last_seen < %s", (seen_before.timestamp(),))


class AsyncPostgresHoldStore(AsyncStore):
    """The PostgreSQL store for the event loop: calls run on ``pool_size`` worker threads,
    each on its own pooled connection, so one slow statement does not hold up the rest.
    Opening connects, applies migrations and fails with one actionable line."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.server = describe(settings.url or "")
        self._executor = ThreadPoolExecutor(
            max_workers=settings.pool_size, thread_name_prefix="hold-store"
        )
        self._store: PostgresHoldStore | None = None

    async def _run(self, call: Callable[[HoldBackend], T]) -> T:
        loop = asyncio.get_running_loop()
        if self._store is None:
            self._store = await loop.run_in_executor(
                self._executor, lambda: PostgresHoldStore(self.settings)
            )
        store = self._store
        return await loop.run_in_executor(self._executor, lambda: call(store))

    async def listen(self, on_notice: Callable[[str], None]) -> None:
        """Hear the other gateways (``LISTEN``) until cancelled: ``held <device id>`` after
        a hold, ``release`` after an admin release. On a connection of its own, rebuilt
        after a failure with a growing pause; after a reconnection ``release`` is passed on,
        since notifications sent meanwhile are lost (the periodic pass is the fallback)."""
        url = self.settings.url or ""
        options = _connect_options(self.settings)
        pause, connected_before = 0.5, False
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    url, autocommit=True, **options
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}".encode())
                    pause = 0.5
                    if connected_before:
                        on_notice("release")
                    connected_before = True
                    log.info("store_notifications_listening", store=self.server)
                    async for note in conn.notifies():
                        on_notice(note.payload)
            except (psycopg.Error, OSError) as exc:
                problem = _failure(self.server, "listening", exc, self.settings.connect_timeout)
                log.warning("store_notifications_lost", error=str(problem), retry_in=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)

    async def close(self) -> None:
        store, self._store = self._store, None
        try:
            if store is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, store.close)
        finally:
            self._executor.shutdown(wait=True)
