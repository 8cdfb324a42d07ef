"""A fleet end to end: three `gateway serve` processes on one PostgreSQL database behind
HAProxy (docs/operations.md#running-on-postgresql).

HAProxy balances round robin and sends PROXY v2 (``send-proxy-v2``); its SMTP health
checks arrive as PROXY ``LOCAL`` (``check-send-proxy``). Fake phones connect from their own
loopback addresses (127.0.0.2, 127.0.0.3, ...); HAProxy reaches the gateways from
127.0.0.1, the one network in their ``proxy_protocol_from``. A test that must choose the
replica connects to it directly (a phone's address is not a balancer's: no header).

One PostgreSQL, one fake upstream, HAProxy and the three processes serve the whole module
(a module-scoped event loop); each test starts with an empty store and upstream and
leaves the ban in force on every replica. Each replica logs in as its own PostgreSQL role
(gw0, gw1, gw2), so a test can tell their server sessions apart in pg_stat_activity.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.hold.postgres import CHANNEL
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.haproxy import (
    HaproxyUnavailable,
    TemporaryHaproxy,
    haproxy_binary,
    temporary_haproxy,
)
from gateway.testing.issuer import TestIssuer
from gateway.testing.postgres import TemporaryPostgres, temporary_postgres
from gateway.testing.raw import RawSmtp
from gateway.testing.upstream import FakeUpstream, Faults
from tests.faults.nothing_lost import Gateway
from tests.hold.conftest import have_postgres
from tests.hold.test_postgres_replicas import HELD, received
from tests.smtp.test_haproxy import authenticated
from tests.stories import TIKTOK, tiktok_ban

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_postgres(), reason="PostgreSQL not installed"),
    pytest.mark.asyncio(loop_scope="module"),
]

REPLICAS = 3
TICK = 2.0  # [hold] release_interval_seconds: the periodic pass
LEASE = 2  # [store] claim_lease_seconds: how long a killed replica's claim blocks a device
PER_ADDRESS = 2  # [limits] max_connections_per_ip, on each replica
TOO_MANY = (421, "4.7.0 Too many connections from your address; please try again later")


@dataclass
class Fleet:
    postgres: TemporaryPostgres
    url: str  # the shared database, as the superuser
    upstream: FakeUpstream
    replicas: list[Gateway]
    haproxy: TemporaryHaproxy
    enforced: str  # the policy version with the ban in force (a content hash)

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cursor = await conn.execute(sql.encode(), params)
            return await cursor.fetchall() if cursor.description else []

    async def held(self) -> int:
        rows = await self.execute("SELECT count(*) FROM held")
        return int(str(rows[0][0]))


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer
) -> AsyncIterator[Fleet]:
    """Started once for the module: the replicas apply the schema together (under the
    migration lock) and are UP in HAProxy (their health checks passed) before any test."""
    try:
        haproxy_binary()
    except HaproxyUnavailable as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("fleet")
    async with AsyncExitStack() as stack:
        postgres = await stack.enter_async_context(temporary_postgres(fsync=False))
        await postgres.psql("CREATE DATABASE fleet")
        for n in range(REPLICAS):
            await postgres.psql(f"CREATE ROLE gw{n} LOGIN SUPERUSER")
        base = f"127.0.0.1:{postgres.port}/fleet"
        upstream = await stack.enter_async_context(FakeUpstream.running())
        replicas = [
            Gateway.configured(
                root / f"gw{n}",
                issuer,
                upstream.port,
                {"ban.toml": tiktok_ban("hold")},
                hold={"release_interval_seconds": TICK},
                store_url=f"postgresql://gw{n}@{base}",
                smtp={"proxy_protocol_from": ["127.0.0.1/32"]},
                limits={"max_connections_per_ip": PER_ADDRESS},
                store={"claim_lease_seconds": LEASE},
                admin=True,
            )
            for n in range(REPLICAS)
        ]
        for replica in replicas:
            stack.push_async_callback(replica.stop)
        await asyncio.gather(*(replica.start() for replica in replicas))
        haproxy = await stack.enter_async_context(
            temporary_haproxy([("127.0.0.1", replica.port) for replica in replicas])
        )
        await haproxy.wait_up(REPLICAS)
        (enforced,) = {await policy_version(replica) for replica in replicas}
        yield Fleet(postgres, f"postgresql://gateway@{base}", upstream, replicas, haproxy, enforced)


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def fresh(fleet: Fleet) -> AsyncIterator[None]:
    """Each test starts with nothing held, nothing received and a well-behaved upstream
    (the tests themselves check they leave nothing held; this keeps one failure from
    failing the tests after it)."""
    await fleet.execute("DELETE FROM held")
    fleet.upstream.messages.clear()
    fleet.upstream.faults = Faults()
    yield
    fleet.upstream.faults = Faults()


# --- helpers -------------------------------------------------------------------------------


async def admin(replica: Gateway, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{replica.admin_port}{path}"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as response,
    ):
        return response.status, await response.text()


async def policy_version(replica: Gateway) -> str:
    status, text = await admin(replica, "/readyz")
    assert status == 200, text
    return text.removeprefix("ready ").strip()


async def counted(replica: Gateway, name: str, **labels: str) -> float:
    """The sum of a metric's samples on one replica whose labels include ``labels``."""
    _, text = await admin(replica, "/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def each_counted(fleet: Fleet, name: str, **labels: str) -> list[float]:
    return [await counted(replica, name, **labels) for replica in fleet.replicas]


async def set_ban(fleet: Fleet, state: str, replicas: Sequence[Gateway] | None = None) -> None:
    """Edit the ban in each replica's own policy directory, as a deploy would; each
    replica reloads by itself (it watches the directory). Waits until they serve it."""
    chosen = fleet.replicas if replicas is None else replicas
    for replica in chosen:
        (replica.config.parent / "policies" / "ban.toml").write_text(
            tiktok_ban("hold", state=state)
        )
    async with asyncio.timeout(10):
        for replica in chosen:
            while True:
                if (await policy_version(replica) == fleet.enforced) == (state == "enforce"):
                    break
                await asyncio.sleep(0.05)


def relayed(answer: tuple[int, str] | None) -> bool:
    return answer is not None and answer[0] == 250 and answer != HELD


def phone(issuer: TestIssuer, name: str, *, banned: bool = True) -> FakeDevice:
    return FakeDevice(
        issuer,
        user=f"{name}@example.test",
        device_id=f"{name}-phone",
        apps={TIKTOK} if banned else set(),
    )


async def send(device: FakeDevice, port: int, address: str, n: int) -> tuple[int, str] | None:
    """Message ``n`` of ``device`` (its subject names both), from the phone's address."""
    name = device.user.partition("@")[0]
    content = make_message(subject=f"{name} #{n}", sender=device.user)
    result = await device.send(port, message=content, source_address=address)
    return result.data


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """A process paused (SIGSTOP) for the block, then continued."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """R, S, T (stopped), ... from /proc (proc(5))."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def listener(fleet: Fleet, n: int) -> int:
    """The PostgreSQL server process serving replica ``n``'s LISTEN connection."""
    rows = await fleet.execute(
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND query = %s",
        (f"gw{n}", f"LISTEN {CHANNEL}"),
    )
    assert len(rows) == 1, rows
    return int(str(rows[0][0]))


# --- the tests -----------------------------------------------------------------------------


async def test_per_address_limits_see_the_phones_addresses_not_haproxys(
    fleet: Fleet, issuer: TestIssuer
) -> None:
    """Two connections per address on each replica: phone A's six authenticated sessions
    through the balancer (round robin: two on each replica) are served and its seventh
    connection is refused (authenticated sessions are never shed for it), while phone B
    is served. Every connection comes from HAProxy's 127.0.0.1: only the
    PROXY header tells the replicas the phones apart."""
    a, b = "127.0.0.2", "127.0.0.3"
    before = sum(await each_counted(fleet, "gateway_limit_refusals_total", limit="connections"))
    async with AsyncExitStack() as stack:
        for _ in range(REPLICAS * PER_ADDRESS):
            await stack.enter_async_context(await authenticated(fleet.haproxy.port, a, issuer))
        sessions = await each_counted(fleet, "gateway_sessions_active")
        assert all(n >= PER_ADDRESS for n in sessions), sessions  # (and a health check)
        async with await RawSmtp.connect(fleet.haproxy.port, source=a) as one_too_many:
            assert await one_too_many.reply() == TOO_MANY
        bob = phone(issuer, "bob", banned=False)
        assert relayed(await send(bob, fleet.haproxy.port, b, 1))
    after = sum(await each_counted(fleet, "gateway_limit_refusals_total", limit="connections"))
    assert after - before == 1
    (message,) = await fleet.upstream.wait_for(1)
    assert message.headers.startswith(f"Received: from device.test ([{b}])")


async def test_every_message_is_relayed_or_held_once_and_a_retraction_releases_all_three_replicas_holds_in_order(
    fleet: Fleet, issuer: TestIssuer
) -> None:
    """Six phones send six messages each through the balancer at once: the two compliant
    phones' mail is relayed, the four banned phones' mail is held, every replica holding
    some. The ban is then retracted in every replica's policy directory: every held
    message goes out once, each phone's in the order it was sent, and nothing is left."""
    banned = [phone(issuer, f"banned{n}") for n in range(4)]
    compliant = [phone(issuer, f"compliant{n}", banned=False) for n in range(2)]
    phones = {f"127.0.0.{10 + n}": device for n, device in enumerate(banned + compliant)}
    holds_before = await each_counted(fleet, "gateway_decisions_total", action="hold")
    released_before = await each_counted(fleet, "gateway_release_events_total", event="released")

    async def send_six(address: str, device: FakeDevice) -> list[tuple[int, str] | None]:
        return [await send(device, fleet.haproxy.port, address, n) for n in range(6)]

    replies = await asyncio.gather(*(send_six(a, d) for a, d in phones.items()))
    for device, answers in zip(phones.values(), replies, strict=True):
        if TIKTOK in device.apps:
            assert answers == [HELD] * 6
        else:
            assert all(relayed(answer) for answer in answers), answers
    await fleet.upstream.wait_for(12)
    await asyncio.sleep(0.5)
    assert sorted(received(fleet.upstream)) == sorted(
        (name, n) for name in ("compliant0", "compliant1") for n in range(6)
    )
    assert await fleet.held() == 24
    holds = [
        now - before
        for now, before in zip(
            await each_counted(fleet, "gateway_decisions_total", action="hold"),
            holds_before,
            strict=True,
        )
    ]
    assert sum(holds) == 24
    assert all(share > 0 for share in holds), holds  # all three replicas held some

    try:
        await set_ban(fleet, "retracted")
        await fleet.upstream.wait_for(36, timeout=20)
        await asyncio.sleep(TICK)  # a tick of each replica more: nothing is sent again
    finally:
        await set_ban(fleet, "enforce")
    got = received(fleet.upstream)
    assert len(got) == 36
    assert Counter(got).most_common(1)[0][1] == 1  # no message twice
    for device in phones.values():  # each phone's mail in the order it was sent
        name = device.user.partition("@")[0]
        assert [n for who, n in got if who == name] == list(range(6))
    assert await fleet.held() == 0
    released = await each_counted(fleet, "gateway_release_events_total", event="released")
    assert sum(released) - sum(released_before) == 24


async def test_a_hold_on_one_replica_is_released_by_another_within_a_second_through_notify(
    fleet: Fleet, issuer: TestIssuer
) -> None:
    """Held on gw0; the phone, compliant now, sends through gw1, which heard of the hold
    (NOTIFY), so it releases the held message first and relays the new one after it,
    within a second. gw0 does not release it: to gw0 the phone is still banned."""
    ann, address = phone(issuer, "ann"), "127.0.0.20"
    gw0, gw1, _ = fleet.replicas
    assert await send(ann, gw0.port, address, 1) == HELD
    released_before = await each_counted(fleet, "gateway_release_events_total", event="released")
    ann.remove(TIKTOK)
    async with asyncio.timeout(1.0):
        assert relayed(await send(ann, gw1.port, address, 2))
        await fleet.upstream.wait_for(2)
    assert received(fleet.upstream) == [("ann", 1), ("ann", 2)]
    released = await each_counted(fleet, "gateway_release_events_total", event="released")
    assert [now - before for now, before in zip(released, released_before, strict=True)] == [
        0,
        1,
        0,
    ]
    assert await fleet.held() == 0


async def test_with_notify_cut_the_other_replica_learns_of_the_hold_within_its_tick(
    fleet: Fleet, issuer: TestIssuer
) -> None:
    """gw1's LISTEN connection is cut: its PostgreSQL server process is stopped (SIGSTOP),
    so gw1 hears no notification while its other connections work. The hold on gw0
    reaches gw1 through its periodic pass instead (it reads which devices have held
    mail): after one tick, the phone sending through gw1 gets its held mail out first."""
    bea, address = phone(issuer, "bea"), "127.0.0.21"
    gw0, gw1, _ = fleet.replicas
    pid = await listener(fleet, 1)
    with stopped(pid):
        async with asyncio.timeout(5):  # stopped: it delivers nothing
            while True:
                if process_state(pid) == "T":
                    break
                await asyncio.sleep(0.01)
        assert await send(bea, gw0.port, address, 1) == HELD
        # gw1's next tick starts within TICK; its pass reads which devices have held mail,
        # then it measures the store (the gauge): under load the pass may take a while.
        await asyncio.sleep(TICK + 0.5)
        async with asyncio.timeout(TICK):
            while True:
                if await counted(gw1, "gateway_held_messages") == 1:
                    break
                await asyncio.sleep(0.05)
        bea.remove(TIKTOK)
        async with asyncio.timeout(1.0):
            assert relayed(await send(bea, gw1.port, address, 2))
            await fleet.upstream.wait_for(2)
        assert received(fleet.upstream) == [("bea", 1), ("bea", 2)]
    assert await fleet.held() == 0
    assert await listener(fleet, 1) == pid  # the same connection, continued


async def test_three_replicas_expiring_the_same_message_send_one_dsn(
    fleet: Fleet, issuer: TestIssuer
) -> None:
    """A held message is made 30 days old while a lock on its row (FOR KEY SHARE, which
    the ageing UPDATE passes) stops the replicas' expiry at the row: all three read it as
    expired and wait to settle it. Let go, the first writes the bounce and the other two
    find the message gone: one DSN reaches the sender, and one expiry is counted."""
    cat, address = phone(issuer, "cat"), "127.0.0.22"
    assert await send(cat, fleet.haproxy.port, address, 1) == HELD
    expired_before = await each_counted(fleet, "gateway_release_events_total", event="expired")
    async with await psycopg.AsyncConnection.connect(fleet.url) as lock:
        await lock.execute("SELECT 1 FROM held FOR KEY SHARE")  # held until the commit
        await fleet.execute("UPDATE held SET received_at = received_at - interval '30 days'")
        async with asyncio.timeout(3 * TICK):  # every replica's next tick gets there
            while True:
                rows = await fleet.execute(
                    "SELECT DISTINCT usename FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND usename = ANY(%s)",
                    ([f"gw{n}" for n in range(REPLICAS)],),
                )
                if len(rows) == REPLICAS:
                    break
                await asyncio.sleep(0.05)
        await lock.commit()
    (dsn,) = await fleet.upstream.wait_for(1, timeout=3 * TICK)
    await asyncio.sleep(TICK + 0.5)  # another tick of each: no second DSN
    assert len(fleet.upstream.messages) == 1
    assert (dsn.sender, dsn.recipients) == ("", ("cat@example.test",))
    assert b"multipart/report; report-type=delivery-status" in dsn.content
    assert await fleet.held() == 0
    expired = await each_counted(fleet, "gateway_release_events_total", event="expired")
    assert sum(expired) - sum(expired_before) == 1


async def test_sigkill_of_a_replica_mid_release_loses_nothing(
    fleet: Fleet, issuer: TestIssuer
) -> None:
    """Eight held messages of one phone; the ban is retracted on gw2 alone, so gw2 relays
    them (slowly: the upstream takes 0.3 s a message) and is SIGKILLed after three. Then
    retracted on gw0 and gw1: they leave the phone alone until gw2's claim runs out
    (the lease), then send the rest. Nothing is lost; duplicates stay within the bound
    of docs/operations.md (the killed replica's message in flight for the device, and
    its last unflushed batch of deletions); the order is kept, a resent message right
    after itself."""
    dan, address = phone(issuer, "dan"), "127.0.0.23"
    gw0, gw1, gw2 = fleet.replicas
    for n in range(8):
        assert await send(dan, fleet.haproxy.port, address, n) == HELD
    fleet.upstream.faults.delay = 0.3
    try:
        await set_ban(fleet, "retracted", [gw2])
        await fleet.upstream.wait_for(3, timeout=10)
        await gw2.kill()
        sent_before = len(fleet.upstream.messages)
        await set_ban(fleet, "retracted", [gw0, gw1])
        async with asyncio.timeout(LEASE + 2 * TICK + 8 * 0.3 + 5):
            while True:
                if {n for _, n in received(fleet.upstream)} == set(range(8)):
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(TICK)  # a tick of each survivor more: nothing is sent again
    finally:
        fleet.upstream.faults = Faults()
        if gw2.process is None or gw2.process.returncode is not None:
            await gw2.start()
        await set_ban(fleet, "enforce")
        await fleet.haproxy.wait_up(REPLICAS)
    assert sent_before < 8
    numbers = [n for _, n in received(fleet.upstream)]
    assert set(numbers) == set(range(8))  # nothing lost
    # The bound: one message in flight (one device), and the deletions not yet written,
    # which here are at most that one: at 0.3 s a message each deletion is written before
    # the next message goes (a batch is written once its first deletion is 0.25 s old).
    assert len(numbers) - 8 <= 2
    assert numbers == sorted(numbers)
    assert await fleet.held() == 0
