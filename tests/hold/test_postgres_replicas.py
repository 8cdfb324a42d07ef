"""Two gateways on one PostgreSQL store, end to end over real sockets: mail held by
either is released exactly once, in each device's order, by whichever gateway claims the
device; they wake each other (LISTEN/NOTIFY) after a hold and an admin release; and a
PostgreSQL restart costs 451s while it is down, never mail.

In-process gateways (``running_gateway``), one FakeUpstream, the test kit's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.dovecot import (
    MASTER_USER,
    DovecotPorts,
    DovecotUnavailable,
    TemporaryDovecot,
    dovecot_binary,
    temporary_dovecot,
)
from gateway.testing.harness import RunningGateway, running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.devices.test_announce import ANNOUNCE, DISREGARD, RETRACTED, WARN, notices, settle
from tests.devices.test_announce import BAN as ANNOUNCED
from tests.hold.conftest import PostgresServer, have_postgres
from tests.hold.test_durability import serve
from tests.stories import TIKTOK, tiktok_ban
from tests.sync.test_dovecot import BACKEND_PASSWORD, CLIENT_SECRET, write_secrets
from tests.sync.test_real_dovecot import deliver, imap_login, thread
from tests.sync.test_sessions import KICK_WITHIN, IdleSession, ended_within, start_idle

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
    ban: str = BAN,
) -> AsyncIterator[list[RunningGateway]]:
    async with AsyncExitStack() as stack:
        gateways = []
        for n in range(count):
            config = write_config(
                tmp_path / f"gw{n}",
                issuer=issuer,
                upstream_port=upstream.port,
                policies={"ban.toml": ban},
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
    shared notices table lets exactly one of them send each notice; the laptop-only user
    is told nothing by either."""

    wall = [ANNOUNCE - timedelta(hours=2)]
    phones = [
        FakeDevice(issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK})
        for name in ("alice", "bob")
    ]
    laptop = FakeDevice(  # the laptop-only user: the app, but the ban is for phones
        issuer, user="carol@example.test", device_id="carol-laptop", device_class="desktop",
        platform="macos", apps={TIKTOK},
    )  # fmt: skip
    phones.append(laptop)
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


@dataclass
class Replica:
    """One gateway on the shared store, with a Dovecot of its own whose logins it decides
    and whose sessions it ends (doveadm HTTP API)."""

    gateway: RunningGateway
    dovecot: TemporaryDovecot


@asynccontextmanager
async def replicas_with_dovecot(
    tmp_path: Path, issuer: TestIssuer, upstream: FakeUpstream, url: str, count: int
) -> AsyncIterator[list[Replica]]:
    try:
        dovecot_binary()
    except DovecotUnavailable as exc:
        pytest.skip(str(exc))
    async with AsyncExitStack() as stack:
        found = []
        for n in range(count):
            directory = tmp_path / f"gw{n}"
            ports = DovecotPorts.free()
            api_key = secrets.token_urlsafe(16)
            directory.mkdir()
            (directory / "doveadm-api-key").write_text(api_key + "\n")
            keys = write_secrets(directory) | {
                "imap_backend": f"127.0.0.1:{ports.imap}",
                "backend_master_user": MASTER_USER,
                "doveadm_url": f"http://127.0.0.1:{ports.doveadm_http}/doveadm/v1",
                "doveadm_api_key_file": "doveadm-api-key",
            }
            config = write_config(
                directory, issuer=issuer, upstream_port=upstream.port,
                policies={"ban.toml": BAN}, sync=keys,
            )  # fmt: skip
            with config.open("a") as out:
                out.write(f'\n[store]\nurl = "{url}"\nconnect_timeout_seconds = 1\n')
            # A long release tick: only the overrides' own release pass can be in time.
            gateway = await stack.enter_async_context(running_gateway(config, release_tick=60))
            dovecot = await stack.enter_async_context(
                temporary_dovecot(
                    gateway_url=f"http://127.0.0.1:{gateway.sync_port}/",
                    client_secret=CLIENT_SECRET,
                    master_password=BACKEND_PASSWORD,
                    ports=ports,
                    doveadm_api_key=api_key,
                )
            )
            found.append(Replica(gateway, dovecot))
        yield found


async def test_a_suspension_acts_on_every_replica_within_5_seconds_and_its_expiry_enforces_again(
    tmp_path: Path, issuer: TestIssuer, pg_url: str
) -> None:
    """`gateway policy suspend` run next to one gateway: on each of two gateways sharing
    PostgreSQL, the mail it held is released (once) and the quarantined IMAP IDLE session
    of the phone it decided is ended within 5 s, and that phone's next login opens its
    real inbox; when the suspension expires, both hold and quarantine again."""
    users = ("alice@example.test", "bob@example.test")
    phones = [
        FakeDevice(issuer, user=user, device_id=f"phone-{n}", apps={TIKTOK})
        for n, user in enumerate(users)
    ]
    async with (
        FakeUpstream.running() as upstream,
        replicas_with_dovecot(tmp_path, issuer, upstream, pg_url, 2) as found,
    ):
        sessions = []
        for replica, phone, user in zip(found, phones, users, strict=True):
            content = make_message(subject=f"{user} #0", sender=user)
            assert (await phone.send(replica.gateway.port, message=content)).data == HELD
            await thread(deliver, replica.dovecot, user, "Real mail")
            imap = replica.dovecot.ports.imap
            assert "Subject: Real mail" not in await thread(imap_login, imap, user, phone.token())
            idle = IdleSession(imap, user, phone.token())
            sessions.append((idle, await start_idle(idle)))
        assert upstream.messages == []

        suspended_at = time.monotonic()
        argv = ["policy", "suspend", "remove-tiktok", "--for", "1h", "--reason", "INC-9"]
        config = str(found[0].gateway.config_path)
        assert await asyncio.to_thread(main, [*argv, "--config", config]) == 0
        for idle, running in sessions:  # each replica ended the session of its own phone
            assert await ended_within(running, idle, suspended_at) < KICK_WITHIN
        await upstream.wait_for(
            2, timeout=max(0.1, KICK_WITHIN - (time.monotonic() - suspended_at))
        )
        assert time.monotonic() - suspended_at < KICK_WITHIN
        for replica, phone, user in zip(found, phones, users, strict=True):
            imap = replica.dovecot.ports.imap
            assert "Subject: Real mail" in await thread(imap_login, imap, user, phone.token())
        await asyncio.sleep(0.5)
        assert sorted(received(upstream)) == [("alice@example.test", 0), ("bob@example.test", 0)]

        # A short suspension in place of the long one: when it expires, every replica
        # enforces again (mail held, the login quarantined).
        argv = ["policy", "suspend", "remove-tiktok", "--for", "2s", "--reason", "INC-9"]
        assert await asyncio.to_thread(main, [*argv, "--config", config]) == 0
        async with asyncio.timeout(8):
            while any(  # noqa: ASYNC110  # the replicas' own state, polled
                r.gateway.server.services.policies.overrides.suspended for r in found
            ):
                await asyncio.sleep(0.1)
        for replica, phone, user in zip(found, phones, users, strict=True):
            content = make_message(subject=f"{user} #1", sender=user)
            assert (await phone.send(replica.gateway.port, message=content)).data == HELD
            imap = replica.dovecot.ports.imap
            assert "Subject: Real mail" not in await thread(imap_login, imap, user, phone.token())
        assert len(upstream.messages) == 2


async def test_a_rollout_holds_the_same_devices_on_every_replica_and_after_a_restart(
    tmp_path: Path, issuer: TestIssuer, pg_url: str
) -> None:
    """A 10% rollout: each of two gateways on one store holds exactly the devices whose
    stable bucket is in the stage, and so do both again once restarted."""
    from gateway.policy.model import rollout_bucket

    ban = tiktok_ban("hold", extra="rollout.percent = 10\n")
    devices = [
        FakeDevice(issuer, user=f"p{n}@example.test", device_id=f"phone-{n:02d}", apps={TIKTOK})
        for n in range(40)
    ]
    expected = {d.device_id for d in devices if rollout_bucket(d.device_id, "remove-tiktok") < 1000}
    assert 0 < len(expected) < 10
    async with FakeUpstream.running() as upstream:
        for start in ("first", "restarted"):
            async with replicas(tmp_path / start, issuer, upstream, pg_url, 2, ban=ban) as found:
                for gateway in found:
                    held = set()
                    for device in devices:
                        result = await device.send(gateway.port)
                        assert result.data is not None
                        assert result.data[0] == 250
                        if result.data == HELD:
                            held.add(device.device_id)
                    assert held == expected, start


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
