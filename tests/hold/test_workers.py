"""``gateway serve --workers 2`` end to end, over real sockets: both workers take SMTP
connections on one port; mail held through either is released exactly once, in each
device's order, on the one SQLite store; a worker killed while releasing is restarted and
nothing is lost; worker 0's /metrics carries worker 1's counts; SIGTERM stops all, and a
port in use is one line and exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.cli import main
from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.hold.conftest import have_postgres
from tests.hold.test_postgres_replicas import received
from tests.stories import TIKTOK, tiktok_ban

pytestmark = pytest.mark.slow

BAN = tiktok_ban("hold", phones_only=False)
HELD = (250, "2.6.0 held: Remove TikTok.")


@dataclass
class Supervised:
    process: asyncio.subprocess.Process
    port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def pids(self) -> dict[int, int]:
        """The newest pid of each worker (from its "listening" event)."""
        return {e["worker"]: e["pid"] for e in self.events if e.get("event") == "listening"}

    @property
    def admin_port(self) -> int:
        """Worker 0's admin port (a restarted worker 0 binds `127.0.0.1:0` anew)."""
        latest = [e for e in self.named("listening") if e["worker"] == 0][-1]
        return int(latest["admin"].rsplit(":", 1)[1])

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def wait_for(self, event: str, count: int = 1, timeout: float = 30) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while len(self.named(event)) < count:
                self.changed.clear()
                await self.changed.wait()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        return text


@asynccontextmanager
async def supervised(config: Path, workers: int = 2) -> AsyncIterator[Supervised]:
    """``gateway serve --workers N`` until every worker listens; its log is read on
    (parsed into ``events``) until it exits; killed if still running at the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--grace", "2",
        "--workers", str(workers),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stderr is not None
    run = Supervised(process)

    async def read(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "line": line.decode(errors="replace")}
            run.events.append(event)
            run.changed.set()
        run.changed.set()

    reader = asyncio.create_task(read(process.stderr))
    try:
        async with asyncio.timeout(30):
            while not run.named("workers_listening"):
                assert process.returncode is None, f"supervisor exited: {run.events[-5:]}"
                run.changed.clear()
                await run.changed.wait()
        run.port = int(run.named("workers_listening")[0]["submission"].rsplit(":", 1)[1])
        yield run
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await asyncio.wait_for(reader, timeout=10)


def stored_devices(path: Path) -> list[str]:
    """The device ids in the store's inventory (read by another connection)."""
    with HoldStore(path) as store:
        return [c.device.id for c in store.devices(datetime.fromtimestamp(0, UTC))]


def sample(metrics: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def hold_through_both(
    run: Supervised, issuer: TestIssuer, devices: int, per_device: int
) -> list[str]:
    """Each device sends ``per_device`` messages, one connection each, devices at once;
    every one is held. The names of the devices' users."""
    names = [f"user{n}" for n in range(devices)]

    async def device(name: str) -> None:
        phone = FakeDevice(
            issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK}
        )
        for n in range(per_device):
            content = make_message(subject=f"{name} #{n}", sender=f"{name}@example.test")
            assert (await phone.send(run.port, message=content)).data == HELD

    await asyncio.gather(*(device(name) for name in names))
    return names


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_two_workers_release_200_held_messages_exactly_once_in_order(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """On the SQLite file the supervisor locks, or on PostgreSQL (workers then claim as
    gateways sharing it do)."""
    issuer = TestIssuer.generate("k1")
    store: dict[str, dict[str, object]] = {}
    if backend == "postgres":
        if not have_postgres():
            pytest.skip("PostgreSQL not installed")
        store = {"store": {"url": request.getfixturevalue("pg_url")}}
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": BAN},
            hold={"release_interval_seconds": 0.2},
            sections=store,
        )
        async with supervised(config) as run:
            names = await hold_through_both(run, issuer, devices=10, per_device=20)
            metrics = await asyncio.to_thread(run.metrics)
            # The kernel gave both workers connections; worker 0's /metrics counts both.
            per_worker = [sample(metrics, "gateway_sessions_total", worker=str(k)) for k in (0, 1)]
            assert all(count > 0 for count in per_worker), per_worker
            assert sum(per_worker) == 200
            assert sample(metrics, "gateway_worker_up", worker="1") == 1
            (tmp_path / "policies" / "ban.toml").unlink()  # both workers reload and release
            await upstream.wait_for(200, timeout=60)
            await asyncio.sleep(1.5)  # several more ticks of both: nothing is sent again
            got = received(upstream)
            assert len(got) == 200
            assert Counter(got).most_common(1)[0][1] == 1  # no message twice
            for name in names:  # each device's mail in its arrival order
                assert [n for who, n in got if who == name] == list(range(20))
            metrics = await asyncio.to_thread(run.metrics)
            released = [
                sample(metrics, "gateway_release_events_total", event="released", worker=str(k))
                for k in (0, 1)
            ]
            assert sum(released) == 200
            run.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(run.process.wait(), timeout=20) == 0
        assert len(run.named("stopped")) == 2


async def test_a_worker_killed_while_releasing_is_restarted_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": BAN},
            hold={"release_interval_seconds": 0.2},
        )
        async with supervised(config) as run:
            names = await hold_through_both(run, issuer, devices=4, per_device=10)
            upstream.faults.delay = 0.1  # slow enough to kill a worker mid-release
            (tmp_path / "policies" / "ban.toml").unlink()
            await upstream.wait_for(3, timeout=30)
            await run.wait_for("released")
            releasing = run.named("released")[0]["worker"]
            pid = run.pids()[releasing]
            os.kill(pid, signal.SIGKILL)  # the worker dies; the supervisor stays
            await run.wait_for("worker_exited")
            assert run.named("worker_exited")[0]["worker"] == releasing
            await run.wait_for("listening", count=3)  # the restarted worker
            upstream.faults.delay = 0.0
            async with asyncio.timeout(60):
                while set(received(upstream)) != {(n, k) for n in names for k in range(10)}:
                    upstream.received.clear()
                    await upstream.received.wait()
            await asyncio.sleep(1.0)
            got = received(upstream)
            # At least once: only what the killed worker had in flight (one message in each
            # of its 4 lanes) or delivered without its deletion written yet (a batch is
            # written every quarter second: about 3 per lane at 0.1 s a message) comes twice.
            duplicates = sum(count - 1 for count in Counter(got).values())
            assert duplicates <= 4 * (1 + 3), Counter(got).most_common(5)
            metrics = await asyncio.to_thread(run.metrics)  # the restarted worker counts too
            assert [sample(metrics, "gateway_worker_up", worker=str(k)) for k in (0, 1)] == [1, 1]
            assert run.process.returncode is None
            run.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(run.process.wait(), timeout=20) == 0


async def test_a_port_in_use_is_one_line_and_exit_2_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=1, smtp={"listen": f"127.0.0.1:{port}"}
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2",
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert err.decode().strip() == (
        f"gateway: error: cannot listen on 127.0.0.1:{port} ([smtp] listen): address already in use"
    )


async def test_every_worker_judges_a_policy_change_by_the_devices_all_workers_saw(
    tmp_path: Path,
) -> None:
    """The reload guard (max_newly_blocked_devices) counts the device inventory: one
    phone seen by one worker only must count in both, or one worker would refuse a ban
    that the other puts in force."""
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            hold={"release_interval_seconds": 0.2},
            sections={"gateway": {"max_newly_blocked_devices": 0}},
        )
        async with supervised(config) as run:
            phone = FakeDevice(issuer, apps={TIKTOK})
            assert (await phone.send(run.port)).accepted  # no policy yet: through one worker
            for _ in range(100):  # its worker writes what it saw at its next tick
                if await asyncio.to_thread(stored_devices, tmp_path / "hold.db"):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the device seen never reached the store's inventory")
            (tmp_path / "policies" / "ban.toml").write_text(BAN)
            await run.wait_for("policy_reload_refused", count=2)
            assert [e["worker"] for e in run.named("policy_reload_refused")] in ([0, 1], [1, 0])
            assert [e for e in run.named("policy_reload") if e["trigger"] != "startup"] == []


async def test_sighup_reloads_every_worker_and_a_killed_supervisor_takes_its_workers_along(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    config = write_config(tmp_path, issuer=issuer, upstream_port=1)
    async with supervised(config) as run:
        workers = run.pids()
        run.process.send_signal(signal.SIGHUP)
        await run.wait_for("key_files_reloaded", count=2)
        assert sorted(e["worker"] for e in run.named("key_files_reloaded")) == [0, 1]
        run.process.kill()  # no chance to forward anything
        await run.process.wait()
        # Each sees its end of the socketpair close, drains and stops (their log still
        # reaches the pipe the supervisor gave them).
        await run.wait_for("stopped", count=2, timeout=20)
        assert sorted(e["worker"] for e in run.named("stopped")) == [0, 1]
        assert {e["pid"] for e in run.named("listening")} == set(workers.values())


async def test_the_supervisor_gives_up_when_a_restarted_worker_never_comes_up(
    tmp_path: Path,
) -> None:
    issuer = TestIssuer.generate("k1")
    config = write_config(tmp_path, issuer=issuer, upstream_port=1)
    async with supervised(config) as run:
        config.write_text("this is [not TOML")  # every restart now fails at start (exit 2)
        os.kill(run.pids()[1], signal.SIGKILL)
        # Restarts after 0.5, 1, 2, 4 and 8 s, each failing; the fifth failure ends it.
        assert await asyncio.wait_for(run.process.wait(), timeout=60) == 1
        assert [e["worker"] for e in run.named("worker_keeps_failing")] == [1]
        assert [e["restart_in"] for e in run.named("worker_exited")] == [0.5, 1, 2, 4, 8]
        assert len(run.named("stopped")) == 1  # worker 0 drained and stopped


async def test_both_workers_serve_implicit_tls_on_one_port(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    client = ssl.create_default_context()
    ca.configure_trust(client)
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            smtp={
                "allow_plaintext_auth": False,
                "tls_cert": "server.pem",
                "tls_key": "server.pem",
                "implicit_tls_listen": "127.0.0.1:0",
            },
        )
        async with supervised(config) as run:
            ports = {e["implicit_tls"] for e in run.named("listening")}
            assert len(ports) == 1  # one port, both workers
            (port,) = ports
            for _ in range(20):
                result = await FakeDevice(issuer).send(
                    int(port.rsplit(":", 1)[1]), implicit_tls=True, tls_context=client
                )
                assert result.data is not None
                assert result.data[0] == 250
            metrics = await asyncio.to_thread(run.metrics)
            per_worker = [sample(metrics, "gateway_sessions_total", worker=str(k)) for k in (0, 1)]
            assert all(count > 0 for count in per_worker), per_worker
        assert len(upstream.messages) == 20


def test_workers_must_be_one_or_more(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, issuer=TestIssuer.generate("k1"), upstream_port=1)
    assert main(["serve", "--config", str(config), "--workers", "0"]) == 2
    assert capsys.readouterr().err == "gateway: error: --workers must be 1 or more, not 0\n"
