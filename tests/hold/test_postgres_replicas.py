"""Two gateways on one PostgreSQL store, end to end over real sockets: mail held by
either is released exactly once, in each device's order, by whichever gateway claims the
device; they wake each other (LISTEN/NOTIFY) after a hold and an admin release; and a
PostgreSQL restart costs 451s while it is down, never mail.

In-process gateways (``running_gateway``), one FakeUpstream, the test kit's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import RunningGateway, running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.devices.test_announce import ANNOUNCE, DISREGARD, RETRACTED, WARN, notices, settle
from tests.devices.test_announce import BAN as ANNOUNCED
from tests.hold.conftest import PostgresServer, have_postgres
from tests.hold.test_durability import serve
from tests.stories import TIKTOK, tiktok_ban

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_postgres(), reason="PostgreSQL not installed"),
]

BAN = tiktok_ban("hold")
HELD = (250, "2.6.0 held: Remove TikTok.")
SUBJECT = re.compile(rb"Subject: (\S+) #(\d+)")


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@asynccontextmanager
async def replicas(
    tmp_path: Path,
    issuer: TestIssuer,
    upstream: FakeUpstream,
    url: str,
    count: int,
    release_tick: float = 0.2,
    store: str = "",
) -> AsyncIterator[list[RunningGateway]]:
    async with AsyncExitStack() as stack:
        gateways = []
        for n in range(count):
            config = write_config(
                tmp_path / f"gw{n}",
                issuer=issuer,
                upstream_port=upstream.port,
                policies={"ban.toml": BAN},
            )
            with config.open("a") as out:
                out.write(f'\n[store]\nurl = "{url}"\nconnect_timeout_seconds = 1\n{store}\n')
            gateways.append(
                await stack.enter_async_context(running_gateway(config, release_tick=release_tick))
            )
        yield gateways


async def retract(gateways: list[RunningGateway]) -> None:
    """The ban withdrawn on every gateway at once (each reloads and starts a release)."""
    for gateway in gateways:
        (gateway.policy_dir / "ban.toml").unlink()
    await asyncio.gather(*(g.server.reload("test") for g in gateways))


def received(upstream: FakeUpstream) -> list[tuple[str, int]]:
    found = []
    for message in upstream.messages:
        match = SUBJECT.search(message.content)
        assert match is not None
        found.append((match.group(1).decode(), int(match.group(2))))
    return found


async def test_forty_messages_held_by_two_gateways_are_each_released_exactly_once_in_order(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    url = postgres.database()
    async with (
        FakeUpstream.running() as upstream,
        replicas(tmp_path, issuer, upstream, url, 2) as gateways,
    ):
        names = [f"user{n}" for n in range(8)]
        devices = {
            name: FakeDevice(
                issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK}
            )
            for name in names
        }
        for n in range(40):  # alternately through either gateway
            name = names[n % len(names)]
            content = make_message(subject=f"{name} #{n}", sender=f"{name}@example.test")
            result = await devices[name].send(gateways[n % 2].port, message=content)
            assert result.data == HELD
        await retract(gateways)
        # Both also run their own passes at the same time, as their ticks do.
        await asyncio.gather(*(g.server.services.releaser.run() for g in gateways for _ in "ab"))
        await upstream.wait_for(40, timeout=20)
        await asyncio.sleep(1.0)  # several more ticks of both: nothing is sent again
        got = received(upstream)
        assert len(got) == 40
        assert Counter(got).most_common(1)[0][1] == 1  # no message twice
        for name in names:  # each device's mail in its arrival order
            numbers = [n for who, n in got if who == name]
            assert numbers == sorted(numbers)
        assert await gateways[0].server.services.hold_store.count() == 0
        released = [
            g.server.services.metrics.release_events.labels("released")._value.get()
            for g in gateways
        ]
        assert sum(released) == 40


async def test_a_postgresql_restart_gets_451_while_down_and_loses_nothing(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    url = postgres.database()
    async with (
        FakeUpstream.running() as upstream,
        replicas(tmp_path, issuer, upstream, url, 1) as (gateway,),
    ):
        device = FakeDevice(issuer, user="ann@example.test", device_id="ann-phone", apps={TIKTOK})
        accepted: list[int] = []

        async def send(n: int) -> tuple[int, str] | None:
            content = make_message(subject=f"ann #{n}", sender="ann@example.test")
            result = await device.send(gateway.port, message=content)
            if result.accepted:
                accepted.append(n)
            return result.data

        for n in range(5):
            assert await send(n) == HELD
        await postgres.run(postgres.server.stop(immediate=True))
        try:
            down = await send(5)
            assert down is not None
            assert down[0] == 451
        finally:
            await postgres.run(postgres.server.start())
        n = 6
        async with asyncio.timeout(20):  # the pool reconnects: holds succeed again
            while await send(n) != HELD:
                n += 1
                await asyncio.sleep(0.2)
        for m in range(n + 1, n + 5):
            assert await send(m) == HELD
        await retract([gateway])
        await upstream.wait_for(len(accepted), timeout=20)
        await asyncio.sleep(0.5)
        got = [number for _, number in received(upstream)]
        assert got == accepted  # every accepted message once, in order; none refused
        assert 5 not in got


async def test_a_device_complying_on_the_other_gateway_gets_its_held_mail_out_first(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    """Held through one gateway, then sending compliant through the other: the other
    heard of the hold (NOTIFY), so it releases the held message before relaying the new
    one, within a second, with no periodic pass to help (ticks a minute apart)."""
    url = postgres.database()
    async with (
        FakeUpstream.running() as upstream,
        replicas(tmp_path, issuer, upstream, url, 2, release_tick=60) as (one, two),
    ):
        await asyncio.sleep(0.3)  # both listening
        banned = FakeDevice(issuer, user="ann@example.test", device_id="ann-phone", apps={TIKTOK})
        first = make_message(subject="ann #1", sender="ann@example.test")
        assert (await banned.send(one.port, message=first)).data == HELD
        await asyncio.sleep(0.3)  # the notification crosses
        complying = FakeDevice(issuer, user="ann@example.test", device_id="ann-phone")
        second = make_message(subject="ann #2", sender="ann@example.test")
        async with asyncio.timeout(1.0):
            assert (await complying.send(two.port, message=second)).accepted
            await upstream.wait_for(2, timeout=1.0)
        assert received(upstream) == [("ann", 1), ("ann", 2)]


async def test_an_admin_release_wakes_the_gateways_at_once(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    url = postgres.database()
    async with (
        FakeUpstream.running() as upstream,
        replicas(tmp_path, issuer, upstream, url, 2, release_tick=60) as gateways,
    ):
        await asyncio.sleep(0.3)
        device = FakeDevice(issuer, user="ann@example.test", device_id="ann-phone", apps={TIKTOK})
        for n in range(4):
            content = make_message(subject=f"ann #{n}", sender="ann@example.test")
            assert (await device.send(gateways[n % 2].port, message=content)).data == HELD
        config = str(gateways[1].config_path)
        assert await asyncio.to_thread(main, ["hold", "release", "--all", "--config", config]) == 0
        await upstream.wait_for(4, timeout=1.0)
        await asyncio.sleep(0.3)
        assert received(upstream) == [("ann", n) for n in range(4)]


async def test_a_slow_release_renews_its_claim_so_the_other_gateway_never_sends_twice(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    """A one-second lease, and an upstream taking half a second per message: a lane of
    six outlives its lease three times over, and renews it every third of it."""
    url = postgres.database()
    async with (
        FakeUpstream.running() as upstream,
        replicas(tmp_path, issuer, upstream, url, 2, store="claim_lease_seconds = 1") as gateways,
    ):
        assert gateways[0].server.services.releaser.claim_renewal == pytest.approx(1 / 3)
        device = FakeDevice(issuer, user="ann@example.test", device_id="ann-phone", apps={TIKTOK})
        for n in range(6):
            content = make_message(subject=f"ann #{n}", sender="ann@example.test")
            assert (await device.send(gateways[0].port, message=content)).data == HELD
        upstream.faults.delay = 0.5
        await retract(gateways)
        await upstream.wait_for(6, timeout=20)
        await asyncio.sleep(1.5)
        assert received(upstream) == [("ann", n) for n in range(6)]


async def test_sigkill_of_a_gateway_mid_release_loses_nothing_and_its_lease_expires(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    """A `gateway serve` process killed while it relays a device's held mail: its claim
    blocks the device until the lease (2 s) ends, then the other gateway sends the rest.
    Duplicates stay within the bound: the message in flight and the last unflushed
    deletion."""
    url = postgres.database()
    store = f'\n[store]\nurl = "{url}"\nclaim_lease_seconds = 2\n'
    async with FakeUpstream.running() as upstream:
        first = write_config(
            tmp_path / "a", issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        with first.open("a") as out:
            out.write(store)
        device = FakeDevice(issuer, user="ann@example.test", device_id="ann-phone", apps={TIKTOK})
        async with serve(first) as (process, port):
            for n in range(10):
                content = make_message(subject=f"ann #{n}", sender="ann@example.test")
                assert (await device.send(port, message=content)).data == HELD
            upstream.faults.delay = 0.3
            (first.parent / "policies" / "ban.toml").unlink()  # the gateway reloads, releases
            await upstream.wait_for(3, timeout=15)
            process.send_signal(signal.SIGKILL)
            await process.wait()
        sent_before = len(upstream.messages)
        assert sent_before < 10
        second = write_config(tmp_path / "b", issuer=issuer, upstream_port=upstream.port)
        with second.open("a") as out:
            out.write(store)
        async with running_gateway(second, release_tick=0.2) as gateway:
            await upstream.wait_for(10, timeout=15)
            await asyncio.sleep(0.5)
            assert await gateway.server.services.hold_store.count() == 0
        numbers = [n for _, n in received(upstream)]
        assert set(numbers) == set(range(10))  # nothing lost
        assert len(numbers) - 10 <= 2  # duplicates within the bound
        assert numbers == sorted(numbers)  # and in order, a resent one right after itself


async def test_two_gateways_on_one_store_announce_and_withdraw_once_per_device(
    tmp_path: Path, issuer: TestIssuer, pg_url: str
) -> None:
    """Issue 17's "two replicas send no second copy": both gateways know both phones (each
    phone sent through each), both sweep the announcement and the retraction, and the
    shared notices table lets exactly one of them send each notice."""

    wall = [ANNOUNCE - timedelta(hours=2)]
    phones = [
        FakeDevice(issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK})
        for name in ("alice", "bob")
    ]
    async with FakeUpstream.running() as upstream, AsyncExitStack() as stack:
        gateways = []
        for n in range(2):
            config = write_config(
                tmp_path / f"gw{n}", issuer=issuer, upstream_port=upstream.port,
                policies={"ban.toml": ANNOUNCED}, notices=True,
            )  # fmt: skip
            with config.open("a") as out:
                out.write(f'\n[store]\nurl = "{pg_url}"\nconnect_timeout_seconds = 1\n')
            gateways.append(
                await stack.enter_async_context(
                    running_gateway(config, clock=lambda: wall[0], release_tick=0.2)
                )
            )
        for gateway in gateways:
            for phone in phones:
                assert (await phone.send(gateway.port, at=wall[0])).accepted
        wall[0] = ANNOUNCE + timedelta(minutes=1)
        await settle(upstream, 2)
        for gateway in gateways:
            (gateway.policy_dir / "ban.toml").write_text(RETRACTED)
        await asyncio.gather(*(g.server.reload("test") for g in gateways))
        await settle(upstream, 4)
    assert notices(upstream) == {
        "alice": [WARN.format("alice-phone"), DISREGARD.format("alice-phone")],
        "bob": [WARN.format("bob-phone"), DISREGARD.format("bob-phone")],
    }


async def test_replicas_loading_the_same_policy_set_store_it_once(
    tmp_path: Path, issuer: TestIssuer, postgres: PostgresServer
) -> None:
    """Policy history on a fleet (docs/admin.md): two gateways starting with the same set
    store one version; both reloading to the next set at the same moment store that once
    (the version is unique, the insert is ON CONFLICT DO NOTHING)."""
    url = postgres.database()
    async with (
        FakeUpstream.running() as upstream,
        replicas(tmp_path, issuer, upstream, url, 2) as gateways,
    ):
        (started,) = await gateways[0].server.services.hold_store.policy_versions()
        assert started.version == gateways[1].server.services.policies.current.version
        await retract(gateways)
        versions = await gateways[1].server.services.hold_store.policy_versions()
        now_in_force = gateways[0].server.services.policies.current.version
        assert [(v.version, v.trigger) for v in versions] == [
            (now_in_force, "test"),
            (started.version, "startup"),
        ]
