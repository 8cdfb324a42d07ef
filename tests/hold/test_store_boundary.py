"""The hold store's edges: errors leave it as HoldStoreError, its files are private, a
damaged file stops start-up, and one serving gateway owns a store at a time.

Real files, real SQLite, and a real second process wherever another process matters.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.config.settings import load_settings
from gateway.domain import (
    Access,
    Action,
    Decision,
    Device,
    DeviceClaims,
    DeviceClass,
    HeldSubmission,
    Phase,
    Platform,
    PolicyMatch,
)
from gateway.errors import HoldStoreError
from gateway.hold.store import AsyncHoldStore, HoldFilter, HoldStore
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.hold.test_durability import cli, serve
from tests.stories import tiktok_ban

NOW = datetime.now(UTC)
PAGE = 4096  # SQLite's default page size, which the store keeps


def claims(n: int = 1) -> DeviceClaims:
    return DeviceClaims(
        issuer="https://mdm.example.test",
        subject=f"user{n}@example.test",
        audience=("gw",),
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        device=Device(f"phone-{n}", Platform.IOS, DeviceClass.MOBILE),
    )


def held(n: int = 1) -> HeldSubmission:
    decision = Decision(
        Action.HOLD,
        Phase.ENFORCE,
        "Remove TikTok.",
        "v1",
        (PolicyMatch("remove-tiktok", Action.HOLD, Phase.ENFORCE, "Remove TikTok."),),
    )
    return HeldSubmission(
        f"user{n}@example.test",
        ("bob@example.test",),
        b"Subject: held\r\n\r\nbody\r\n",
        claims(n),
        decision,
        NOW,
    )


def filled(path: Path, messages: int = 5) -> Path:
    """A store with held mail, an inventory and a notice, closed (the WAL checkpointed)."""
    store = HoldStore(path)
    for n in range(messages):
        store.hold(held(n))
    store.record_devices([(claims(n), NOW.timestamp(), Access.SEND) for n in range(messages)])
    store.claim_notice("phone-1", "remove-tiktok", "enforce", NOW)
    store.close()
    return path


def data_pages(path: Path) -> list[int]:
    """The root pages of the tables and indexes the reads use: found from the schema
    rather than assumed, so the test does not depend on how many pages the schema takes."""
    db = sqlite3.connect(str(path))
    try:
        rows = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE tbl_name IN ('held', 'held_bodies', "
            "'devices') AND rootpage > 1"
        ).fetchall()
    finally:
        db.close()
    return sorted(page for (page,) in rows)


def zero_pages(path: Path, first: int, last: int | None = None) -> None:
    """Overwrite pages ``first``..``last`` (1-based, inclusive; default: to the end) with zeros."""
    size = path.stat().st_size
    end = size if last is None else last * PAGE
    with path.open("r+b") as file:
        file.seek((first - 1) * PAGE)
        file.write(bytes(end - (first - 1) * PAGE))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


HOLDER = """
import asyncio, sys
from pathlib import Path
from gateway.hold.store import AsyncHoldStore

async def main() -> None:
    store = AsyncHoldStore(Path(sys.argv[1]))
    await store.open()
    print("open", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # until the test closes our stdin
    await store.close()

asyncio.run(main())
"""


@contextmanager
def held_open_by_another_process(path: Path) -> Iterator[int]:
    """Another process with an open AsyncHoldStore on ``path``; yields its pid."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        assert line == "open\n", process.stderr.read() if process.stderr else line
        yield process.pid
    finally:
        process.stdin.close()
        try:
            assert process.wait(timeout=15) == 0
        finally:
            if process.returncode is None:
                process.kill()
                process.wait()
            process.stdout.close()
            if process.stderr is not None:
                process.stderr.close()


# --- every error leaves as HoldStoreError --------------------------------------------------


def test_record_devices_against_a_locked_store(tmp_path: Path) -> None:
    """Another connection holds the write lock: BEGIN IMMEDIATE times out. Before, the
    store then ran ROLLBACK with no transaction open, and "cannot rollback" escaped."""
    path = filled(tmp_path / "hold.db")
    store = HoldStore(path, busy_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(HoldStoreError) as raised:
            store.record_devices([(claims(9), NOW.timestamp(), Access.SEND)])
        message = str(raised.value)
        assert str(path) in message
        assert "locked" in message
        assert "\n" not in message
        assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
        other.execute("COMMIT")
        # Nothing was left half-open: the same call works once the lock is gone.
        store.record_devices([(claims(9), NOW.timestamp(), Access.SEND)])
        assert "phone-9" in {c.device.id for c in store.devices(NOW - timedelta(days=1))}
    finally:
        other.close()
        store.close()


WRITES: dict[str, Callable[[HoldStore], object]] = {
    "hold": lambda store: store.hold(held(7)),
    "record_devices": lambda store: store.record_devices(
        [(claims(7), NOW.timestamp(), Access.SEND)]
    ),
    "claim_notice": lambda store: store.claim_notice("phone-7", "p", "enforce", NOW),
    "unclaim_notice": lambda store: store.unclaim_notice("phone-1", "remove-tiktok", "enforce"),
    "postpone": lambda store: store.postpone("no-such-id", 0.0, "4.4.0 try later"),
    "remove": lambda store: store.remove(["no-such-id"]),
    "request_release": lambda store: store.request_release(HoldFilter(), ["no-such-id"]),
    "drop": lambda store: store.drop(HoldFilter(), ["no-such-id"]),
    "prune_devices": lambda store: store.prune_devices(NOW - timedelta(days=90)),
}


@pytest.mark.parametrize("write", WRITES, ids=list(WRITES))
def test_every_write_against_a_locked_store_names_the_file(tmp_path: Path, write: str) -> None:
    path = filled(tmp_path / "hold.db")
    store = HoldStore(path, busy_timeout=0.1)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(HoldStoreError) as raised:
            WRITES[write](store)
        assert str(path) in str(raised.value)
        assert "locked" in str(raised.value)
        assert raised.value.__cause__ is not None
    finally:
        other.close()
        store.close()


READS: dict[str, Callable[[HoldStore], object]] = {
    "count": lambda store: store.count(),
    "device_ids": lambda store: store.device_ids(),
    "expired": lambda store: store.expired(NOW + timedelta(days=1)),
    "devices": lambda store: store.devices(NOW - timedelta(days=1)),
}


@pytest.mark.parametrize("read", READS, ids=list(READS))
def test_reads_of_a_damaged_store(tmp_path: Path, read: str) -> None:
    """The pages of the held mail and the inventory zeroed, the schema left whole; the
    synchronous store (the CLI's) opens without a check, so the damage shows at the first
    read, which raised a raw DatabaseError before."""
    path = filled(tmp_path / "hold.db")
    for page in data_pages(path):
        zero_pages(path, first=page, last=page)
    store = HoldStore(path)
    try:
        with pytest.raises(HoldStoreError) as raised:
            READS[read](store)
        message = str(raised.value)
        assert message.startswith(f"hold store {path} is damaged: ")
        assert "\n" not in message
        assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    finally:
        store.close()


def test_every_method_of_a_closed_store(tmp_path: Path) -> None:
    store = HoldStore(filled(tmp_path / "hold.db"))
    store.close()
    calls: dict[str, Callable[[HoldStore], object]] = {
        **READS,
        **WRITES,
        "select": lambda s: s.select(),
        "get": lambda s: s.get("no-such-id"),
        "due": lambda s: s.due(NOW),
    }
    outcomes: dict[str, tuple[str, bool, bool]] = {}
    for name, call in calls.items():
        try:
            call(store)
        except Exception as exc:  # every outcome collected, so one run names every leak
            outcomes[name] = (
                type(exc).__name__,
                str(tmp_path / "hold.db") in str(exc),
                exc.__cause__ is not None,
            )
        else:
            outcomes[name] = ("no error", False, False)
    assert outcomes == dict.fromkeys(calls, ("HoldStoreError", True, True))


def test_close_failing(tmp_path: Path) -> None:
    """sqlite3's close can fail (a misuse the library reports); it leaves as HoldStoreError."""

    class FailingClose:
        def __init__(self, inner: sqlite3.Connection) -> None:
            self.inner = inner

        def close(self) -> None:
            self.inner.close()
            raise sqlite3.OperationalError("unable to close due to unfinalized statements")

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    store = HoldStore(tmp_path / "hold.db")
    store._db = FailingClose(store._db)  # type: ignore[assignment]
    with pytest.raises(HoldStoreError) as raised:
        store.close()
    assert str(tmp_path / "hold.db") in str(raised.value)
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)


def test_a_path_the_store_cannot_create(tmp_path: Path) -> None:
    """An OSError while opening (here: the directory is a file) leaves as HoldStoreError."""
    (tmp_path / "state").write_text("not a directory")
    with pytest.raises(HoldStoreError) as raised:
        HoldStore(tmp_path / "state" / "hold.db")
    assert str(tmp_path / "state" / "hold.db") in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)


# --- permissions -------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask-022", "umask-000"])
async def test_files_are_private_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    before = mode(tmp_path)
    path = tmp_path / "state" / "hold" / "hold.db"
    with umask(mask):
        store = AsyncHoldStore(path)
        await store.open()
        await store.hold(held(1))  # the WAL and its index exist once something is written
        files = {p.name: mode(p) for p in path.parent.iterdir()}
        await store.close()
        sync = HoldStore(path)  # the CLI's store: it reopens the WAL
        sync.hold(held(2))
        reopened = {p.name: mode(p) for p in path.parent.iterdir()}
        sync.close()
    assert files == {
        "hold.db": 0o600,
        "hold.db-wal": 0o600,
        "hold.db-shm": 0o600,
        "hold.db.lock": 0o600,
    }
    assert reopened == files
    assert mode(path.parent) == 0o700  # created by the store
    assert mode(path.parent.parent) == 0o700  # also created by the store
    assert mode(tmp_path) == before  # existed already: not ours to change


def test_an_existing_store_is_tightened(tmp_path: Path) -> None:
    """A store written by an older gateway (files 0644): the store makes them 0600, and
    leaves the directory, which it did not create, alone."""
    tmp_path.chmod(0o755)
    path = tmp_path / "hold.db"
    with umask(0o022):
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x)")  # open connection: the -wal and -shm stay
        assert mode(path) == mode(tmp_path / "hold.db-wal") == 0o644
        store = HoldStore(path)
        store.hold(held(1))
        db.close()
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "hold.db": 0o600,
        "hold.db-wal": 0o600,
        "hold.db-shm": 0o600,
    }
    store.close()
    assert mode(tmp_path) == 0o755


# --- a damaged store stops start-up --------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "problem"),
    [(2, "Page 2: "), (1, "file is not a database")],
    ids=["table-page", "header"],
)
async def test_damaged_store_stops_start_up_with_one_line(
    tmp_path: Path, page: int, problem: str
) -> None:
    path = filled(tmp_path / "hold.db")
    zero_pages(path, first=page, last=page)
    for _ in range(2):  # a failed open leaves nothing held: the second attempt says the same
        store = AsyncHoldStore(path)
        with pytest.raises(HoldStoreError) as raised:
            await store.open()
        await store.close()
        message = str(raised.value)
        assert message.startswith(f"hold store {path} is damaged: ")
        assert problem in message
        assert message.endswith("; restore it from a backup or move it aside")
        assert "\n" not in message


async def test_a_healthy_store_opens_for_serving(tmp_path: Path) -> None:
    path = filled(tmp_path / "hold.db")
    store = AsyncHoldStore(path)
    await store.open()
    assert await store.count() == 5
    await store.close()


# --- one serving gateway per store -------------------------------------------------------


def in_use(path: Path, pid: int) -> str:
    return f"hold store {path} is in use by another gateway (pid {pid}); run one gateway per store"


async def test_a_second_opener_in_another_process_is_refused(tmp_path: Path) -> None:
    path = filled(tmp_path / "hold.db")
    with held_open_by_another_process(path) as pid:
        second = AsyncHoldStore(path)
        with pytest.raises(HoldStoreError) as raised:
            await second.open()
        await second.close()
        assert str(raised.value) == in_use(path, pid)
        assert (tmp_path / "hold.db.lock").read_text().strip() == str(pid)
    # The holder closed its store: the next opener gets it.
    third = AsyncHoldStore(path)
    await third.open()
    assert await third.count() == 5
    await third.close()


async def test_a_second_opener_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hold.db"
    first = AsyncHoldStore(path)
    await first.open()
    second = AsyncHoldStore(path)
    with pytest.raises(HoldStoreError) as raised:
        await second.open()
    await second.close()
    assert str(raised.value) == in_use(path, os.getpid())
    await first.close()
    again = AsyncHoldStore(path)
    await again.open()
    await again.close()


def test_the_cli_store_works_while_a_gateway_holds_the_lock(tmp_path: Path) -> None:
    path = filled(tmp_path / "hold.db")
    with held_open_by_another_process(path):
        store = HoldStore(path)
        hold_id = store.hold(held(8))
        assert store.request_release(HoldFilter(), [hold_id]) == 1
        assert len(store.select()) == 6
        assert store.drop(HoldFilter(), [hold_id]) == 1
        store.close()


def gateway_serve(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *options],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_a_second_gateway_serve_exits_with_one_line_naming_the_first(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("hold")},
        )
        database = load_settings(config, {}).hold.database
        async with serve(config) as (first, _):
            quiet = await asyncio.to_thread(gateway_serve, config, "--log-level", "warning")
            default = await asyncio.to_thread(gateway_serve, config)
            # The admin CLI does not take the lock: it works while the gateway runs.
            listed = await asyncio.to_thread(cli, config, "hold", "list")
        refusal = f"gateway: error: {in_use(database, first.pid)}"
        assert quiet.returncode == 2
        assert quiet.stderr.splitlines() == [refusal]
        # At the default level the policies are loaded (and logged, as JSON) before the
        # store is opened: besides those info records, the same one line and no traceback.
        assert default.returncode == 2
        records = [json.loads(line) for line in default.stderr.splitlines()[:-1]]
        assert {record["level"] for record in records} <= {"info"}
        assert default.stderr.splitlines()[-1] == refusal
        assert listed.returncode == 0, listed.stderr


async def test_a_serving_gateway_takes_over_the_claims_a_crashed_run_left_at_once(
    tmp_path: Path,
) -> None:
    """Claims are exclusive per device for a lease (the workers of one supervisor share
    the file); the one process holding the store's lock at start (a gateway, or the
    supervisor) makes the claims of the run before stale, so their mail is not held back
    for a lease. The claims are kept, so the restart still says they may be sent again."""
    path = tmp_path / "hold.db"
    with HoldStore(path, lease=300) as crashed:
        ids = [crashed.hold(held(1)) for _ in range(2)]
        assert crashed.claim(ids, "crashed.1", time.time()) == 2
    with HoldStore(path, lease=300) as other:
        assert other.claim(ids, "other.1", time.time()) == 0  # a live claim, as far as it knows
    store = AsyncHoldStore(path, lease=300)
    try:
        assert await store.claimed() == 2
        assert await store.claim(ids, "restarted.1", time.time()) == 2
    finally:
        await store.close()
