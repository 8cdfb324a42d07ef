"""The hold store's two backends side by side: SQLite and PostgreSQL, holding and releasing.

    python -m bench.stores            # the full run: 3 repetitions (a few minutes)
    python -m bench.stores --smoke    # seconds: does the bench work?

HOLD     messages/s through the write path ``gateway serve`` takes when it holds a message:
         ``AsyncStore.hold`` (SQLite: one store thread, WAL, ``synchronous=FULL``;
         PostgreSQL: ``[store] pool_size`` threads on a connection pool, one INSERT that
         commits with ``synchronous_commit`` on), each hold committed before it returns, as
         the client's 250 waits for it. Messages of 4 KiB and 64 KiB, from one session at a
         time and from 16 at once; a fresh store per repetition.
RELEASE  a store filled with held mail from 1,000 devices, a real ``python -m gateway serve``
         on it relaying to Postfix's ``smtp-sink``; the ban is retracted (SIGHUP) and the
         clock runs until the store is empty: claim, read, relay, delete, the release path.

PostgreSQL is a throwaway server started as the tests start it (``initdb`` in a temporary
directory, an unprivileged user when run as root, a free loopback port; ``fsync`` on), on
the same disk as the SQLite files. Backends alternate within each repetition; figures are
medians of the repetitions, with the ratio PostgreSQL / SQLite.
Targets: PostgreSQL holds at least 0.5 x SQLite's; release at least 1,000 messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import structlog

from bench.held_rss import BAN, gateway_config, held_devices, make_body, spawn_gateway
from bench.run import Target, cpu_seconds, process_running, processes, start_sink
from gateway.config.settings import StoreSettings
from gateway.domain import Action, DeviceClaims, HeldSubmission
from gateway.hold.postgres import AsyncPostgresHoldStore, PostgresHoldStore
from gateway.hold.store import AsyncHoldStore, AsyncStore, HoldBackend, HoldStore
from gateway.policy.engine import decide
from gateway.policy.store import PolicyStore
from gateway.testing.issuer import TestIssuer
from gateway.testing.postgres import TemporaryPostgres, temporary_postgres

KB = 1024
BACKENDS = ("SQLite", "PostgreSQL")
HOLD_RATIO_TARGET = 0.5  # PostgreSQL holds / SQLite holds
RELEASE_TARGET = 1000.0  # messages/s
RELEASE_DEVICES = 1000
RELEASE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Plan:
    """How much one run does."""

    repetitions: int
    holds: dict[int, int]  # message size -> messages per hold cell
    sessions: tuple[int, ...]
    released: int
    release_size: int


PLANS = {
    "full": Plan(3, {4 * KB: 1500, 64 * KB: 600}, (1, 16), 6000, 4 * KB),
    "smoke": Plan(1, {4 * KB: 60, 64 * KB: 20}, (1, 16), 200, 4 * KB),
}


@dataclass(frozen=True)
class HoldCell:
    size: int
    sessions: int

    def __str__(self) -> str:
        return f"{self.size // KB} KiB, {self.sessions} session{'s' if self.sessions > 1 else ''}"


@dataclass
class Runs:
    """Messages/s of each repetition, per backend."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {b: [] for b in BACKENDS})

    def median(self, backend: str) -> float:
        values = self.rates[backend]
        return statistics.median(values) if values else float("nan")

    @property
    def ratio(self) -> float:
        sqlite = self.median("SQLite")
        return self.median("PostgreSQL") / sqlite if sqlite else float("nan")

    def listed(self, backend: str) -> str:
        return ", ".join(f"{r:,.0f}" for r in self.rates[backend])


# --- what is held ---------------------------------------------------------------------------


def submissions(
    policy_dir: Path, devices: Sequence[DeviceClaims], count: int, size: int
) -> list[HeldSubmission]:
    """``count`` messages as the gateway holds them: the engine's decision under the ban."""
    policies = PolicyStore(policy_dir, {})
    policies.reload(trigger="bench")
    body = make_body(size)
    now = datetime.now(UTC)
    out = []
    for n in range(count):
        claims = devices[n % len(devices)]
        decision = decide(policies.current, claims, now)
        if decision.action is not Action.HOLD:
            raise RuntimeError(f"the bench's policy does not hold its devices: {decision}")
        out.append(
            HeldSubmission(claims.subject, ("sink@example.test",), body, claims, decision, now)
        )
    return out


# --- the stores -----------------------------------------------------------------------------


@dataclass
class Stores:
    """Where each backend's stores go: SQLite files in ``work``, databases on ``postgres``."""

    work: Path
    postgres: TemporaryPostgres
    made: int = 0

    async def fresh(self, backend: str) -> tuple[Path, str | None]:
        """A new, empty store: (SQLite path, None) or (unused path, PostgreSQL URL)."""
        self.made += 1
        path = self.work / f"store-{self.made}" / "hold.db"
        path.parent.mkdir(parents=True)
        if backend == "SQLite":
            return path, None
        name = f"bench{self.made}"
        await self.postgres.psql(f"CREATE DATABASE {name}")
        return path, self.postgres.url.rsplit("/", 1)[0] + f"/{name}"


async def hold_rate(store: AsyncStore, messages: Sequence[HeldSubmission], sessions: int) -> float:
    """Messages/s of ``sessions`` concurrent holders sharing ``messages``."""
    pending = iter(messages)

    async def session() -> None:
        for held in pending:  # one event loop: the sessions take turns at the iterator
            await store.hold(held)

    started = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(sessions)))
    return len(messages) / (time.perf_counter() - started)


async def measure_holds(
    stores: Stores,
    backend: str,
    cells: Sequence[HoldCell],
    messages: dict[int, list[HeldSubmission]],
) -> list[float]:
    """One repetition of every hold cell on one fresh store of ``backend``."""
    path, url = await stores.fresh(backend)
    store: AsyncStore = (
        AsyncHoldStore(path) if url is None else AsyncPostgresHoldStore(StoreSettings(url=url))
    )
    await store.open()  # PostgreSQL: connect and migrate, outside the clock
    try:
        return [await hold_rate(store, messages[cell.size], cell.sessions) for cell in cells]
    finally:
        await store.close()


# --- release --------------------------------------------------------------------------------


def fill(store: HoldBackend, messages: Sequence[HeldSubmission]) -> None:
    for held in messages:
        store.hold(held)


@contextmanager
def counter(path: Path, url: str | None) -> Iterator[Callable[[], int]]:
    """Held messages left in the store the gateway releases from (read by another client)."""
    if url is None:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            yield lambda: int(db.execute("SELECT count(*) FROM held").fetchone()[0])
        finally:
            db.close()
        return
    with psycopg.connect(url, autocommit=True) as conn:

        def count() -> int:
            row = conn.execute(b"SELECT count(*) FROM held").fetchone()
            return int(row[0]) if row else 0

        yield count


def release_rate(
    path: Path, url: str | None, issuer: TestIssuer, sink: Target, count: int
) -> tuple[float, float]:
    """Start a gateway on a filled store, retract the ban, time until the store is empty:
    messages/s, and the gateway's CPU ms per message."""
    config, port = gateway_config(path.parent, issuer, sink)
    if url is not None:
        with config.open("a") as out:
            out.write(f'\n[store]\nurl = "{url}"\n')
    with processes() as started, counter(path, url) as left:
        process = spawn_gateway(started, config, port)
        time.sleep(0.5)  # the start-up pass (everything still banned) is over
        if left() != count:
            raise RuntimeError(f"the store holds {left()} messages, not {count}")
        policy = path.parent / "policies" / "ban.toml"
        cpu = cpu_seconds(process.pid)
        began = time.perf_counter()
        policy.write_text(BAN.replace('"enforce"', '"retracted"'))
        process.send_signal(signal.SIGHUP)
        deadline = began + RELEASE_TIMEOUT
        while (remaining := left()) and time.perf_counter() < deadline:
            time.sleep(0.02)
        elapsed = time.perf_counter() - began
        cpu = cpu_seconds(process.pid) - cpu
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited; see {path.parent / 'gateway.log'}")
    if remaining:
        raise RuntimeError(f"{remaining} held messages not released within {RELEASE_TIMEOUT} s")
    return count / elapsed, cpu / count * 1000


async def measure_release(
    stores: Stores,
    backend: str,
    messages: Sequence[HeldSubmission],
    issuer: TestIssuer,
    sink: Target,
) -> tuple[float, float]:
    path, url = await stores.fresh(backend)
    if url is None:
        store = HoldStore(path)
        store._db.execute("PRAGMA synchronous=OFF")  # filling only; the gateway uses FULL
        try:
            await asyncio.to_thread(fill, store, messages)
        finally:
            store.close()
    else:
        name = url.rsplit("/", 1)[1]
        await stores.postgres.psql(f"ALTER DATABASE {name} SET synchronous_commit = off")
        pg = await asyncio.to_thread(PostgresHoldStore, StoreSettings(url=url))
        try:
            await asyncio.to_thread(fill, pg, messages)  # filling only; the gateway's is on
        finally:
            pg.close()
        await stores.postgres.psql(f"ALTER DATABASE {name} RESET synchronous_commit")
    return await asyncio.to_thread(release_rate, path, url, issuer, sink, len(messages))


# --- the machine --------------------------------------------------------------------------


def fsync_micros(directory: Path, rounds: int = 50) -> float:
    """Median µs of writing 4 KiB and fsync on this disk: what every durable commit pays."""
    path = directory / "fsync-probe"
    samples = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
            samples.append((time.perf_counter() - started) * 1e6)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(samples)


# --- the report -------------------------------------------------------------------------------


def verdict(met: bool, judged: bool) -> str:
    return ("PASS" if met else "FAIL") if judged else "not judged (--smoke: too few messages)"


def print_holds(
    cells: Sequence[HoldCell], results: dict[HoldCell, Runs], repetitions: int, judged: bool
) -> bool:
    print(f"\n## Holds: messages/s, medians of {repetitions}\n")
    print(
        "| message, sessions | SQLite | PostgreSQL | PostgreSQL / SQLite | SQLite runs | PostgreSQL runs |"
    )
    print("|---|---:|---:|---:|---|---|")
    for cell in cells:
        runs = results[cell]
        print(
            f"| {cell} | {runs.median('SQLite'):,.0f} | {runs.median('PostgreSQL'):,.0f} "
            f"| {runs.ratio:.2f} | {runs.listed('SQLite')} | {runs.listed('PostgreSQL')} |"
        )
    lowest = min(results[cell].ratio for cell in cells)
    met = lowest >= HOLD_RATIO_TARGET
    print(
        f"\nPostgreSQL holds >= {HOLD_RATIO_TARGET} x SQLite's in every cell: lowest ratio "
        f"{lowest:.2f}: {verdict(met, judged)}"
    )
    return met or not judged


def print_release(
    runs: Runs, cpu: Runs, count: int, size: int, repetitions: int, judged: bool
) -> bool:
    print(f"\n## Release: messages/s, medians of {repetitions}\n")
    print(
        f"{count:,} held messages of {size // KB} KiB from {RELEASE_DEVICES:,} devices, relayed "
        "by one `gateway serve` to smtp-sink until the store is empty.\n"
    )
    print("| backend | messages/s | gateway CPU ms per message | runs |")
    print("|---|---:|---:|---|")
    for backend in BACKENDS:
        print(
            f"| {backend} | {runs.median(backend):,.0f} | {cpu.median(backend):.2f} "
            f"| {runs.listed(backend)} |"
        )
    print(f"\nPostgreSQL / SQLite: {runs.ratio:.2f}")
    verdicts = []
    for backend in BACKENDS:
        met = runs.median(backend) >= RELEASE_TARGET
        verdicts.append(met)
        print(
            f"{backend} release >= {RELEASE_TARGET:,.0f} messages/s: "
            f"{runs.median(backend):,.0f}: {verdict(met, judged)}"
        )
    return all(verdicts) or not judged


# --- main -----------------------------------------------------------------------------------


async def run(plan: Plan, mode: str) -> bool:
    cells = [HoldCell(size, sessions) for size in plan.holds for sessions in plan.sessions]
    issuer = TestIssuer.generate("bench")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-stores-") as tmp, processes() as started:
        work = Path(tmp)
        policy_dir = work / "policies"
        policy_dir.mkdir()
        (policy_dir / "ban.toml").write_text(BAN)
        devices = held_devices(issuer, RELEASE_DEVICES)
        to_hold = {
            size: submissions(policy_dir, devices, count, size)
            for size, count in plan.holds.items()
        }
        to_release = submissions(policy_dir, devices, plan.released, plan.release_size)
        print(
            f"# Hold store backends side by side ({mode}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        )
        command = " ".join(["python -m bench.stores", *sys.argv[1:]])
        print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; command: {command}")
        sink = start_sink(started)
        async with temporary_postgres(fsync=True) as postgres:
            version = (await postgres.psql("SHOW server_version")).strip()
            print(
                f"PostgreSQL {version} (throwaway, fsync on, synchronous_commit on, "
                f"[store] pool_size {StoreSettings().pool_size}); SQLite {sqlite3.sqlite_version} "
                "(WAL, synchronous=FULL); both on the same disk, where a 4 KiB write + fsync "
                f"takes {fsync_micros(work):,.0f} µs (median). Generator, gateway, PostgreSQL "
                "and smtp-sink share these CPUs."
            )
            stores = Stores(work, postgres)
            holds = {cell: Runs() for cell in cells}
            release, release_cpu = Runs(), Runs()
            for repetition in range(plan.repetitions):
                for backend in BACKENDS:
                    for cell, rate in zip(
                        cells, await measure_holds(stores, backend, cells, to_hold), strict=True
                    ):
                        holds[cell].rates[backend].append(rate)
                for backend in BACKENDS:
                    rate, cpu = await measure_release(stores, backend, to_release, issuer, sink)
                    release.rates[backend].append(rate)
                    release_cpu.rates[backend].append(cpu)
                print(f"  repetition {repetition + 1} measured", file=sys.stderr, flush=True)
        judged = mode != "smoke"
        holds_met = print_holds(cells, holds, plan.repetitions, judged)
        release_met = print_release(
            release, release_cpu, plan.released, plan.release_size, plan.repetitions, judged
        )
    print(f"\nsmtp-sink left running: {'yes' if process_running('smtp-sink') else 'no'}")
    print(f"overall: {'PASS' if holds_met and release_met else 'FAIL'}")
    return holds_met and release_met


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run: does the bench work?")
    args = parser.parse_args()
    if shutil.which("smtp-sink") is None:
        print(
            "bench: smtp-sink not found. Install Debian's postfix package for its test tools:\n"
            "  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix",
            file=sys.stderr,
        )
        return 2
    # Policy loads and the stores log; keep the report on stdout clean.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    mode = "smoke" if args.smoke else "full"
    asyncio.run(run(PLANS[mode], mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
