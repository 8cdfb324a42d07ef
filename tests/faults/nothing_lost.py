"""The "nothing lost" harness: messages with unique ids sent while faults are injected and
the gateway is SIGKILLed and restarted; then every message is accounted for.

    python -m tests.faults.nothing_lost --messages 2000 --clients 8 --kills 5

Faults: a proxy between gateway and upstream refuses connections, cuts them after a random
number of bytes, or slows them; the gateway process is killed (SIGKILL) and restarted.
A fifth of the devices have a banned app, so their mail is held, not relayed.

With ``--release`` a second phase follows: the ban is retracted and the held mail is
released while the same faults go on, and the hold store fails too: another connection
holds its write lock past the busy timeout, and (as root, on a small tmpfs) its disk
fills up. Half the held messages also name a recipient that the upstream now refuses
for good, so each of those must arrive once for the other recipient and bounce once.
``--large N`` adds N held messages of ``--large-size`` bytes, and the gateway then runs in
a memory cgroup of ``--memory-limit`` MiB where the machine allows it (else its peak RSS
is measured): it must never be killed for memory.

Clients behave like real ones: a 4xx reply or a broken connection means "try again
later" (up to 10 attempts, backing off from 0.05 s to 2 s); 250 or 5xx is final. Afterwards:
  * every message that got 250 is at the upstream or in the hold store, byte-identical
    after the gateway's Received header;
  * no message that got a 5xx was delivered;
  * after the release phase the store is empty: every held message was delivered to each
    recipient the upstream accepts, and bounced (one DSN to its sender) for the one it
    refuses; duplicates at release are counted and bounded by the kills and cuts;
  * a message may be delivered although its client never saw the 250 only when the
    gateway's connection to the upstream broke after the data went out (451 4.4.2 "lost")
    or the gateway was killed mid-transaction: RFC 1047's window. These are counted, as are
    duplicates (the client then retries a message the upstream already has).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from gateway.config.settings import load_settings
from gateway.hold.backend import open_store as open_backend
from gateway.hold.store import HoldBackend
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.postgres import TemporaryPostgres, temporary_postgres
from gateway.testing.proxy import FaultProxy, ProxyFaults
from gateway.testing.upstream import FakeUpstream

TIKTOK = "com.zhiliaoapp.musically"
BAN = (
    f'[[policy]]\nid = "ban"\nmatch.apps_any = ["{TIKTOK}"]\naction = "hold"\n'
    'message = "Remove TikTok."\nstate = "enforce"\n'
)
RETRACTED = BAN.replace('state = "enforce"', 'state = "retracted"')
LOST = "4.4.2 Connection to upstream mail server lost; please try again later"
MAX_ATTEMPTS = 10
REFUSED_AT_RELEASE = "550 5.1.1 no such user (gone since)"


@dataclass
class Message:
    ident: str
    device: FakeDevice
    content: bytes
    recipients: tuple[str, ...] = ("bob@example.test",)
    attempts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def leaver(self) -> str | None:
        """A recipient the upstream refuses for good once the release phase begins."""
        return next((r for r in self.recipients if r.startswith("leaver-")), None)

    @property
    def final(self) -> tuple[int, str] | None:
        last = self.attempts[-1] if self.attempts else None
        return last if last and (last[0] == 250 or last[0] >= 500) else None


@dataclass
class Report:
    messages: int = 0
    accepted: int = 0  # got 250 (relayed or held)
    held: int = 0
    refused: int = 0  # got a final 5xx
    gave_up: int = 0  # still 4xx / broken after MAX_ATTEMPTS
    attempts: int = 0
    kills: int = 0
    proxy_cuts: int = 0
    proxy_refusals: int = 0
    duplicates: int = 0  # extra copies at the upstream
    delivered_without_250: int = 0  # RFC 1047 window: allowed, counted
    # The release phase (--release):
    released: int = 0  # held messages found at the upstream afterwards
    release_duplicates: int = 0  # extra copies of held messages
    release_kills: int = 0
    release_cuts: int = 0  # proxy cuts and refusals during the release phase
    bounced: int = 0  # held messages whose refused recipient got its DSN
    lock_faults: int = 0
    disk_full_faults: int = 0
    disk_full: str = "off"  # on, off, or why it could not be arranged
    release_seconds: float = 0.0
    memory: str = "not limited"  # how the gateway's memory was limited
    peak_rss_mib: float = 0.0  # the gateway's largest VmHWM over all its runs
    cgroup_peak_mib: float = 0.0  # the cgroup's peak, page cache of the store included
    unexpected_exits: int = 0  # the gateway died without being killed (OOM, crash)
    store_restarts: int = 0  # PostgreSQL stopped and started again (--postgres)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        data = dict(self.__dict__)
        data["violations"] = len(self.violations)
        return json.dumps(data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """`gateway serve` as a process that can be killed and started again on the same port."""

    def __init__(self, config: Path, port: int, admin_port: int | None = None) -> None:
        self.config = config
        self.port = port
        self.admin_port = admin_port  # /readyz and /metrics, on a port kept across restarts
        self.process: asyncio.subprocess.Process | None = None
        self.on_start: Callable[[int], None] | None = None  # called with each new pid
        self.log = config.parent / "gateway.log"  # every run's warnings, appended
        self.peak_seen = 0.0  # largest VmHWM of the processes killed or stopped so far
        self.restarts_at_start = 0  # times it exited before listening and was started again

    @classmethod
    def configured(
        cls,
        workdir: Path,
        issuer: TestIssuer,
        upstream_port: int,
        policies: dict[str, str],
        upstream_timeout: int = 10,
        hold: dict[str, object] | None = None,
        store_url: str | None = None,
        *,
        smtp: dict[str, object] | None = None,
        limits: dict[str, object] | None = None,
        store: dict[str, object] | None = None,
        admin: bool = False,
    ) -> Gateway:
        """Write a config for a fixed free port (kept across restarts); with ``store_url``
        the held mail lives in that PostgreSQL database. ``smtp``, ``limits`` and
        ``store`` set keys of those sections (a fleet's replica: PROXY headers from its
        balancer, a per-address limit, a shorter lease); with ``admin`` the admin
        listener (/readyz, /metrics) gets a fixed free port too, ``admin_port``."""
        port = free_port()
        admin_port = free_port() if admin else None
        sections: dict[str, dict[str, object]] = {}
        if store_url is not None:
            # A short lease: a lane claimed when the database went away (or by a killed
            # gateway) is free again within seconds rather than the default 5 minutes.
            sections["store"] = {
                "url": store_url,
                "connect_timeout_seconds": 1,
                "claim_lease_seconds": 3,
                **(store or {}),
            }
        config = write_config(
            workdir,
            issuer=issuer,
            upstream_port=upstream_port,
            policies=policies,
            smtp={"listen": f"127.0.0.1:{port}", "idle_timeout": 30, **(smtp or {})},
            limits=limits,
            upstream={"timeout": upstream_timeout},
            hold=hold,
            admin={"listen": f"127.0.0.1:{admin_port or 0}"},
            sections=sections,
        )
        return cls(config, port, admin_port)

    @property
    def died(self) -> bool:
        """The process ended without being asked to (a crash, or killed for memory)."""
        return self.process is not None and self.process.returncode is not None

    def peak_rss_mib(self) -> float:
        """VmHWM of the running process (0 if it is not running)."""
        if self.process is None or self.process.returncode is not None:
            return 0.0
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0.0
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def start(self) -> None:
        """Start it, and start it again if it exits before it listens, as a supervisor
        (systemd, Kubernetes) would: a gateway whose store is unreachable at start-up
        exits with one line rather than serving without it."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.log.open("ab") as log:
                self.process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
                    "--grace", "2", "--log-level", "warning",
                    stdout=asyncio.subprocess.DEVNULL, stderr=log,
                )  # fmt: skip
            while time.monotonic() < deadline and self.process.returncode is None:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                if self.on_start is not None:
                    self.on_start(self.process.pid)
                return
            self.restarts_at_start += 1
            await asyncio.sleep(0.5)
        raise RuntimeError("gateway did not start")

    async def kill(self) -> None:
        self.peak_seen = max(self.peak_seen, self.peak_rss_mib())
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """SIGTERM (the gateway drains), and SIGKILL if it has not exited within ``timeout``."""
        self.peak_seen = max(self.peak_seen, self.peak_rss_mib())
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                await self.kill()


async def send_until_final(message: Message, port: int, rng: random.Random) -> None:
    while len(message.attempts) < MAX_ATTEMPTS and message.final is None:
        try:
            result = await message.device.send(
                port, message=message.content, recipients=message.recipients, timeout=10
            )
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            message.attempts.append((0, f"connection: {type(exc).__name__}"))
        else:
            step = result.data or result.mail or result.auth or (0, "no reply")
            if result.rcpt and not result.data:
                step = next(iter(result.rcpt.values()))
            message.attempts.append(step)
        if message.final is None:
            # Back off as a phone's outbox does (0.05 s doubling to 2 s, with jitter): ten
            # attempts then span about 10 s, longer than a killed gateway takes to start
            # again on a loaded machine, so retries, not the attempt count, decide.
            backoff = min(2.0, 0.05 * 2 ** (len(message.attempts) - 1))
            await asyncio.sleep(backoff * (0.5 + rng.random()))


async def chaos(
    proxy: FaultProxy,
    gateway: Gateway,
    kills: int,
    progress: Callable[[], float],
    done: asyncio.Event,
    rng: random.Random,
) -> int:
    """Flip proxy faults every 50 ms; SIGKILL and restart the gateway each time another
    1/(kills+1) of the messages is settled, so the kills land mid-run at any size."""
    killed = 0
    while not done.is_set():
        roll = rng.random()
        if roll < 0.15:
            proxy.faults = ProxyFaults(refuse=True)
        elif roll < 0.45:
            proxy.faults = ProxyFaults(cut_after=rng.randint(0, 6000))
        elif roll < 0.55:
            proxy.faults = ProxyFaults(delay=0.02)
        else:
            proxy.faults = ProxyFaults()
        if killed < kills and progress() >= (killed + 1) / (kills + 1):
            await gateway.kill()
            killed += 1
            await asyncio.sleep(0.2)
            await gateway.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=0.05)
    proxy.faults = ProxyFaults()
    return killed


def body_after_trace(content: bytes) -> bytes:
    return content[content.index(b"From: ") :]


class StoreFaults:
    """Real faults on the gateway's hold store, from outside its process: another
    connection holding the write lock (BEGIN EXCLUSIVE), and a full disk (a ballast file
    filling the small tmpfs the store lives on)."""

    def __init__(self, database: Path | None, ballast: Path | None) -> None:
        self.database = database  # None: not a SQLite store (no lock faults)
        self.ballast = ballast
        self._locker: sqlite3.Connection | None = None
        self.locks = 0
        self.disk_fulls = 0

    def lock(self) -> None:
        if self._locker is not None or self.database is None:
            return
        locker = sqlite3.connect(
            str(self.database), timeout=0.5, isolation_level=None, check_same_thread=False
        )
        try:
            locker.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:  # the gateway kept writing: try another time
            locker.close()
            return
        self._locker = locker
        self.locks += 1

    def unlock(self) -> None:
        locker, self._locker = self._locker, None
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()

    def fill_disk(self) -> None:
        if self.ballast is None or self.ballast.exists():
            return
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError), self.ballast.open("wb") as ballast:
            while True:
                ballast.write(chunk)
                ballast.flush()
        self.disk_fulls += 1

    def free_disk(self) -> None:
        if self.ballast is not None:
            self.ballast.unlink(missing_ok=True)

    def clear(self) -> None:
        self.unlock()
        self.free_disk()


@contextlib.contextmanager
def small_disk(directory: Path, size_mib: int, *, allow_tmpfs: bool = True) -> Iterator[str]:
    """Mount a small filesystem of ``size_mib`` at ``directory`` (root only): an ext4 image
    on a loop device, whose page cache is reclaimable, or else a tmpfs (whose pages count
    as the writer's memory, so not under a memory limit). Yields "on ..." or why not."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield "unavailable: needs root to mount a small filesystem"
        return
    image = directory.with_name(directory.name + ".ext4")
    attempts: list[tuple[str, list[str]]] = []
    if shutil.which("mkfs.ext4"):
        attempts.append(("ext4 image", ["mount", "-o", "loop", str(image), str(directory)]))
    if allow_tmpfs:
        options = f"size={size_mib}m,mode=0700"
        attempts.append(("tmpfs", ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)]))
    why = "no way to make one"
    for kind, command in attempts:
        if kind == "ext4 image":
            with image.open("wb") as sparse:
                sparse.truncate(size_mib << 20)
            made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
            if made.returncode != 0:
                why = f"mkfs.ext4 failed: {made.stderr.decode(errors='replace').strip()}"
                continue
        mounted = subprocess.run(command, capture_output=True, check=False)
        if mounted.returncode != 0:
            why = f"mount failed: {mounted.stderr.decode(errors='replace').strip()}"
            continue
        try:
            yield f"on ({kind}, {size_mib} MiB)"
        finally:
            subprocess.run(["umount", "-l", str(directory)], check=False)
            image.unlink(missing_ok=True)
        return
    image.unlink(missing_ok=True)
    yield f"unavailable: {why}"


class MemoryCage:
    """A memory cgroup (v2, or v1's memory controller) that the gateway's processes join,
    so that going over the limit gets it killed as a container would be; where none can
    be made, the processes' peak RSS is measured instead."""

    def __init__(self, limit_mib: int) -> None:
        self.limit_mib = limit_mib
        self.path: Path | None = None
        self.mode = f"no memory cgroup could be made: limit {limit_mib} MiB not enforced"
        name = f"nothing-lost-{os.getpid()}"
        for root, limit_file in (
            (Path("/sys/fs/cgroup"), "memory.max"),
            (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
        ):
            if not (root / "cgroup.procs").exists():
                continue
            if limit_file == "memory.max" and "memory" not in _read(root / "cgroup.controllers"):
                continue
            try:
                (root / name).mkdir()
                (root / name / limit_file).write_text(str(limit_mib << 20))
            except OSError:
                with contextlib.suppress(OSError):
                    (root / name).rmdir()
                continue
            self.path = root / name
            self.mode = f"cgroup {'v2' if limit_file == 'memory.max' else 'v1'}, {limit_mib} MiB"
            break

    def join(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def peak_mib(self) -> float:
        if self.path is None:
            return 0.0
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            text = _read(self.path / name).strip()
            if text.isdigit():
                return int(text) / (1 << 20)
        return 0.0

    def close(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


async def release_chaos(
    proxy: FaultProxy,
    gateway: Gateway,
    store: StoreFaults,
    kills: int,
    seconds: float,
    rng: random.Random,
    report: Report,
) -> None:
    """For ``seconds``: every 200 ms maybe lock the store, fill its disk, or break the
    proxy, each for a few hundred milliseconds; SIGKILL and restart the gateway ``kills``
    times (with the store's faults cleared first, as an operator restarting it would)."""
    deadline = time.monotonic() + seconds
    kill_at = sorted(rng.uniform(0.2, 0.8) * seconds for _ in range(kills))
    started = time.monotonic()
    while time.monotonic() < deadline:
        if gateway.died:
            report.unexpected_exits += 1
            report.violations.append(f"gateway exited by itself: {gateway.process.returncode}")  # type: ignore[union-attr]
            store.clear()
            await gateway.start()
        roll = rng.random()
        if store.locks == 0 and store.database is not None:
            roll = 0.0  # every run has each store fault at least once: a lock first,
        elif store.disk_fulls == 0 and store.ballast is not None:
            roll = 0.3  # then a full disk, then whatever the dice say
        store.clear()
        if roll < 0.2:
            await asyncio.to_thread(store.lock)  # waits up to 0.5 s for the gateway's writes
        elif roll < 0.35:
            store.fill_disk()
        proxy.faults = (
            ProxyFaults(cut_after=rng.randint(0, 6000)) if 0.35 <= roll < 0.5 else ProxyFaults()
        )
        if kill_at and time.monotonic() - started >= kill_at[0]:
            kill_at.pop(0)
            store.clear()
            await gateway.kill()
            report.release_kills += 1
            await asyncio.sleep(0.2)
            await gateway.start()
        await asyncio.sleep(0.1 + rng.random() * 0.3)
    store.clear()
    proxy.faults = ProxyFaults()


async def restart_store(
    server: TemporaryPostgres,
    restarts: int,
    progress: Callable[[], float],
    done: asyncio.Event,
    report: Report,
) -> None:
    """Stop the PostgreSQL server for a second each time another 1/(restarts+1) of the
    messages is settled: holds meanwhile get 451 and are retried by their clients."""
    while report.store_restarts < restarts and not done.is_set():
        if progress() >= (report.store_restarts + 1) / (restarts + 1):
            await server.restart(down_for=1.0)
            report.store_restarts += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=0.05)


def _held_count(open_store: Callable[[], HoldBackend]) -> int:
    store = open_store()
    try:
        return store.count()
    finally:
        store.close()


async def run(
    workdir: Path,
    *,
    messages: int,
    clients: int,
    kills: int,
    seed: int = 7,
    release: bool = False,
    release_kills: int = 1,
    chaos_seconds: float = 6.0,
    large: int = 0,
    large_size: int = 8 << 20,
    memory_limit_mib: int = 256,
    postgres: bool = False,
    store_restarts: int = 0,
) -> Report:
    """With ``postgres`` the held mail lives in a throwaway PostgreSQL server (the test
    kit's), restarted ``store_restarts`` times while messages are sent and once more while
    they are released; the SQLite store faults (lock, full disk) are then not made."""
    if postgres:
        async with temporary_postgres() as server:
            return await _run_on(
                workdir, server, messages=messages, clients=clients, kills=kills, seed=seed,
                release=release, release_kills=release_kills, chaos_seconds=chaos_seconds,
                large=large, large_size=large_size, memory_limit_mib=memory_limit_mib,
                store_restarts=store_restarts,
            )  # fmt: skip
    return await _run_on(
        workdir, None, messages=messages, clients=clients, kills=kills, seed=seed,
        release=release, release_kills=release_kills, chaos_seconds=chaos_seconds,
        large=large, large_size=large_size, memory_limit_mib=memory_limit_mib,
        store_restarts=0,
    )  # fmt: skip


async def _run_on(
    workdir: Path,
    server: TemporaryPostgres | None,
    *,
    messages: int,
    clients: int,
    kills: int,
    seed: int,
    release: bool,
    release_kills: int,
    chaos_seconds: float,
    large: int,
    large_size: int,
    memory_limit_mib: int,
    store_restarts: int,
) -> Report:
    rng = random.Random(seed)
    issuer = TestIssuer.generate("k1")
    report = Report(messages=messages + large)
    store_dir = workdir / "store"
    disk_mib = 64 + 3 * (large * large_size >> 20)
    cage = MemoryCage(memory_limit_mib) if large else None
    disk_context = (
        small_disk(store_dir, disk_mib, allow_tmpfs=not large)
        if release and server is None
        else contextlib.nullcontext("off")
    )
    with disk_context as disk:
        report.disk_full = disk
        database = store_dir / "hold.db"
        store_dir.mkdir(parents=True, exist_ok=True)
        ballast = store_dir / "ballast" if disk.startswith("on") else None
        store_faults = StoreFaults(database if server is None else None, ballast)
        try:
            async with FakeUpstream.running() as upstream:
                await _run(
                    workdir, issuer, upstream, database, store_faults, cage, rng, report,
                    messages=messages, clients=clients, kills=kills, seed=seed,
                    release=release, release_kills=release_kills,
                    chaos_seconds=chaos_seconds, large=large, large_size=large_size,
                    server=server, store_restarts=store_restarts,
                )  # fmt: skip
        finally:
            store_faults.clear()
            if cage is not None:
                report.memory = cage.mode
                report.cgroup_peak_mib = round(cage.peak_mib(), 1)
                cage.close()
    return report


async def _run(
    workdir: Path,
    issuer: TestIssuer,
    upstream: FakeUpstream,
    database: Path,
    store_faults: StoreFaults,
    cage: MemoryCage | None,
    rng: random.Random,
    report: Report,
    *,
    messages: int,
    clients: int,
    kills: int,
    seed: int,
    release: bool,
    release_kills: int,
    chaos_seconds: float,
    large: int,
    large_size: int,
    server: TemporaryPostgres | None = None,
    store_restarts: int = 0,
    release_timeout: float = 120.0,
) -> None:
    proxy = FaultProxy("127.0.0.1", upstream.port)
    await proxy.start()
    # The floor is the gateway's own guard against a full disk; the harness fills the disk
    # for real, so the floor is small.
    hold: dict[str, object] = {"database": str(database), "min_free_bytes": 1 << 20}
    if release:
        hold.update(
            busy_timeout_seconds=0.5,
            release_interval_seconds=0.5,
            retry_min_seconds=0.5,
            retry_max_seconds=2,
        )
    gateway = Gateway.configured(
        workdir, issuer, proxy.port, {"ban.toml": BAN}, upstream_timeout=3, hold=hold,
        store_url=server.url if server is not None else None,
    )  # fmt: skip
    settings = load_settings(gateway.config)

    def open_store() -> HoldBackend:
        return open_backend(settings)

    peak_rss = [0.0]

    def started(pid: int) -> None:
        if cage is not None:
            cage.join(pid)

    gateway.on_start = started
    port = gateway.port
    await gateway.start()
    devices = [
        FakeDevice(
            issuer,
            user=f"user{i}@example.test",
            device_id=f"phone-{i}",
            apps={TIKTOK} if i % 5 == 0 else set(),
        )
        for i in range(10)
    ]
    queue: asyncio.Queue[Message] = asyncio.Queue()
    all_messages = []
    for n in range(messages + large):
        device = devices[n % len(devices)] if n < messages else devices[0]
        ident = f"nl-{seed}-{n:06d}"
        body = f"id {ident}\r\n"
        if n >= messages:  # a large message from a banned device: held
            body += ("L" * 998 + "\r\n") * (large_size // 1000)
        content = make_message(
            subject=f"nothing lost {ident}", sender=device.user, body=body
        ).replace(b"Subject:", f"X-Test-Id: {ident}\r\nSubject:".encode(), 1)
        recipients: tuple[str, ...] = ("bob@example.test",)
        if release and TIKTOK in device.apps and n % 2 == 0:
            recipients = ("bob@example.test", f"leaver-{n}@example.test")
        message = Message(ident, device, content, recipients)
        all_messages.append(message)
        queue.put_nowait(message)

    async def worker() -> None:
        while not queue.empty():
            await send_until_final(queue.get_nowait(), port, rng)
            peak_rss[0] = max(peak_rss[0], gateway.peak_rss_mib())

    done = asyncio.Event()

    def progress() -> float:
        return sum(1 for m in all_messages if m.final is not None) / len(all_messages)

    chaos_task = asyncio.create_task(chaos(proxy, gateway, kills, progress, done, rng))
    restarts = (
        asyncio.create_task(restart_store(server, store_restarts, progress, done, report))
        if server is not None
        else None
    )
    await asyncio.gather(*(worker() for _ in range(clients)))
    done.set()
    report.kills = await chaos_task
    if restarts is not None:
        await restarts
    await asyncio.sleep(0.5)  # let a release or retry in flight finish
    if release:
        cuts_before = proxy.cuts + proxy.refused
        for message in all_messages:
            if message.leaver:
                upstream.faults.rcpt_replies[message.leaver] = REFUSED_AT_RELEASE
        (workdir / "policies" / "ban.toml").write_text(RETRACTED)
        began = time.monotonic()
        if server is not None:  # the database goes away once while the mail is released
            releasing = asyncio.create_task(server.restart(down_for=1.0))
        await release_chaos(proxy, gateway, store_faults, release_kills, chaos_seconds, rng, report)
        if server is not None:
            await releasing
            report.store_restarts += 1
        deadline = time.monotonic() + release_timeout
        while (left := _held_count(open_store)) and time.monotonic() < deadline:
            if gateway.died:
                report.unexpected_exits += 1
                report.violations.append("gateway exited by itself during release")
                await gateway.start()
            peak_rss[0] = max(peak_rss[0], gateway.peak_rss_mib())
            await asyncio.sleep(0.2)
        if left:
            report.violations.append(f"{left} still held {release_timeout:g} s after retraction")
        await asyncio.sleep(1)  # a last bounce in flight
        report.release_seconds = round(time.monotonic() - began, 1)
        report.release_cuts = proxy.cuts + proxy.refused - cuts_before
        report.lock_faults, report.disk_full_faults = store_faults.locks, store_faults.disk_fulls
    peak_rss[0] = max(peak_rss[0], gateway.peak_rss_mib())
    if gateway.died:
        report.unexpected_exits += 1
        report.violations.append("gateway exited by itself")
    await gateway.stop()
    await proxy.stop()
    report.proxy_cuts, report.proxy_refusals = proxy.cuts, proxy.refused
    report.peak_rss_mib = round(max(peak_rss[0], gateway.peak_seen), 1)
    _account(report, all_messages, upstream, open_store, release)


def _ident(content: bytes) -> str | None:
    found = content.split(b"X-Test-Id: ", 1)
    return found[1].split(b"\r\n", 1)[0].decode() if len(found) == 2 else None


def _account(
    report: Report,
    all_messages: list[Message],
    upstream: FakeUpstream,
    open_store: Callable[[], HoldBackend],
    release: bool,
) -> None:
    delivered: Counter[str] = Counter()
    delivered_bytes: dict[str, bytes] = {}
    delivered_to: dict[str, set[str]] = {}
    bounces: Counter[str] = Counter()
    for received in upstream.messages:
        ident = _ident(received.content)
        if ident is None:
            continue
        if received.sender == "":  # a DSN: it quotes the original's headers
            bounces[ident] += 1
            continue
        delivered[ident] += 1
        delivered_bytes[ident] = body_after_trace(received.content)
        delivered_to.setdefault(ident, set()).update(received.recipients)
    store = open_store()
    held: dict[str, bytes] = {}
    for row in store.select(limit=1_000_000):
        content = store.content(row.hold_id)
        assert content is not None
        ident = _ident(content)
        assert ident is not None
        held[ident] = body_after_trace(content)
    store.close()

    for message in all_messages:
        report.attempts += len(message.attempts)
        final = message.final
        expected = body_after_trace(message.content)
        copies = delivered[message.ident]
        was_held = TIKTOK in message.device.apps
        report.duplicates += max(0, copies - 1)
        if final and final[0] == 250:
            report.accepted += 1
            if message.ident in held:
                report.held += 1
                if held[message.ident] != expected:
                    report.violations.append(f"{message.ident}: held bytes differ")
                if release:
                    report.violations.append(f"{message.ident}: still held after release")
            elif copies:
                if delivered_bytes[message.ident] != expected:
                    report.violations.append(f"{message.ident}: delivered bytes differ")
                if release and was_held:
                    report.held += 1
                    report.released += 1
                    report.release_duplicates += copies - 1
            else:
                report.violations.append(f"{message.ident}: got 250 but is nowhere: LOST")
            if message.leaver and release:
                if message.leaver in delivered_to.get(message.ident, set()):
                    report.violations.append(f"{message.ident}: delivered to a refused recipient")
                if bounces[message.ident]:
                    report.bounced += 1
                else:
                    report.violations.append(f"{message.ident}: refused recipient not bounced")
            continue
        if final and final[0] >= 500:
            report.refused += 1
        else:
            report.gave_up += 1
        if copies or message.ident in held:
            ambiguous = [a for a in message.attempts if a[1] == LOST or a[0] == 0]
            if (final and final[0] >= 500) or not ambiguous:
                report.violations.append(
                    f"{message.ident}: delivered although refused: {message.attempts}"
                )
            else:
                report.delivered_without_250 += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--release", action="store_true", help="then release under faults")
    parser.add_argument("--release-kills", type=int, default=2)
    parser.add_argument("--chaos-seconds", type=float, default=10.0)
    parser.add_argument("--large", type=int, default=0, help="large held messages")
    parser.add_argument("--large-size", type=int, default=8 << 20, help="bytes each")
    parser.add_argument("--memory-limit", type=int, default=256, help="MiB, with --large")
    parser.add_argument("--postgres", action="store_true", help="held mail in PostgreSQL")
    parser.add_argument("--store-restarts", type=int, default=2, help="with --postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nothing-lost-") as tmp:
        log = Path(tmp) / "gateway.log"
        report = asyncio.run(
            run(
                Path(tmp),
                messages=args.messages,
                clients=args.clients,
                kills=args.kills,
                seed=args.seed,
                release=args.release,
                release_kills=args.release_kills,
                chaos_seconds=args.chaos_seconds,
                large=args.large,
                large_size=args.large_size,
                memory_limit_mib=args.memory_limit,
                postgres=args.postgres,
                store_restarts=args.store_restarts,
            )
        )
        if report.violations and log.exists():
            print("gateway log, last lines:")
            print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    print(report.summary())
    for violation in report.violations[:20]:
        print("VIOLATION", violation)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
