"""What a worker of ``gateway serve --workers N`` knows of the others: its place among them
(:class:`WorkerRole`), a way to tell them of a hold, a release request or an override
change (:class:`Peers`, unix datagrams: the SQLite store's counterpart of PostgreSQL's
NOTIFY), and the merge of their /metrics into the one the admin port serves.

All of it lives in the run directory the supervisor creates (0700) and removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

SCRAPE_TIMEOUT = 2.0  # seconds worker 0's /metrics waits for each other worker's page
NOTICE_BYTES = 512  # a notice is "held <device id>", "release" or "overrides"


@dataclass(frozen=True)
class WorkerRole:
    """One worker process: its index (0 serves the admin and sync ports), how many there
    are, the supervisor's run directory and the id of this run."""

    index: int
    count: int
    run_dir: Path
    run_id: str

    @property
    def releaser(self) -> str:
        """Names this worker in its release claims; the same after a restart, so a
        restarted worker takes back the claims its crashed predecessor left at once."""
        return f"{self.run_id}-w{self.index}"

    def notice_path(self, index: int) -> Path:
        return self.run_dir / f"w{index}.notice"

    def metrics_path(self, index: int) -> Path:
        return self.run_dir / f"w{index}.metrics"


class Peers:
    """The other workers, told of what changed in the store they share (a device's hold,
    an admin's release request, an override): each worker reads its own datagram socket
    in the run directory. Best effort by design: a worker that is restarting or whose
    queue is full misses a notice and finds the change at its next tick, as a gateway
    would without notices."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        path = role.notice_path(role.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by this worker's crashed predecessor
        self._inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._inbox.setblocking(False)
        self._inbox.bind(str(path))  # before start-up ends, so no notice is missed after
        self._outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.setblocking(False)

    def tell(self, notice: str) -> None:
        data = notice.encode()[:NOTICE_BYTES]
        for index in range(self.role.count):
            if index != self.role.index:
                # Gone, restarting or full: it rereads the store at start and every tick.
                with contextlib.suppress(OSError):
                    self._outbox.sendto(data, str(self.role.notice_path(index)))

    async def listen(self, on_notice: Callable[[str], None]) -> None:
        """Hand each notice to ``on_notice`` until cancelled."""
        loop = asyncio.get_running_loop()
        closed = loop.create_future()

        def readable() -> None:
            while True:
                try:
                    data = self._inbox.recv(NOTICE_BYTES)
                except BlockingIOError:
                    return
                except OSError:
                    if not closed.done():
                        closed.set_result(None)
                    return
                on_notice(data.decode("utf-8", "replace"))

        loop.add_reader(self._inbox.fileno(), readable)
        try:
            await closed
        finally:
            loop.remove_reader(self._inbox.fileno())

    def close(self) -> None:
        self._inbox.close()
        self._outbox.close()
        with contextlib.suppress(FileNotFoundError):
            self.role.notice_path(self.role.index).unlink()


async def scrape_workers(role: WorkerRole) -> list[tuple[int, bytes | None]]:
    """Every other worker's /metrics page, from its unix socket in the run directory;
    None for one that did not answer within SCRAPE_TIMEOUT (restarting, or stuck)."""

    async def scrape(index: int) -> tuple[int, bytes | None]:
        connector = aiohttp.UnixConnector(path=str(role.metrics_path(index)))
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
                ) as session,
                session.get("http://worker/metrics") as response,
            ):
                if response.status != 200:
                    return index, None
                return index, await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return index, None

    others = [k for k in range(role.count) if k != role.index]
    return list(await asyncio.gather(*(scrape(k) for k in others)))


def merge_metrics(pages: Iterable[tuple[int, bytes | None]]) -> bytes:
    """One Prometheus text page from each worker's: every sample gains a ``worker``
    label, and samples of one family stay together under one HELP and TYPE (the format
    requires it). ``sum without (worker) (...)`` gives the gateway's figure;
    ``gateway_worker_up`` says which workers answered (0: its figures are missing)."""
    up = Metric("gateway_worker_up", "1 if this worker's metrics are in this page.", "gauge")
    families: dict[str, Metric] = {up.name: up}
    for index, page in pages:
        up.samples.append(
            Sample(up.name, {"worker": str(index)}, 0.0 if page is None else 1.0, None)
        )
        if page is None:
            continue
        for family in text_string_to_metric_families(page.decode("utf-8", "replace")):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            merged.samples.extend(
                Sample(s.name, {**s.labels, "worker": str(index)}, s.value, s.timestamp)
                for s in family.samples
            )

    class Merged:
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def remove_run_dir(run_dir: Path) -> None:
    """The supervisor's cleanup: the sockets its workers left, then the directory."""
    for entry in run_dir.iterdir():
        with contextlib.suppress(OSError):
            entry.unlink()
    with contextlib.suppress(OSError):
        os.rmdir(run_dir)
