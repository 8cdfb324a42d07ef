"""The hold store on PostgreSQL: the same behaviour as SQLite (the tests run on both),
exclusive per-device claims between gateways sharing it, leases that expire, migrations,
and errors that say what to do (without the password).

A real PostgreSQL server (the test kit's, initdb into a temporary directory), a fresh
database per test.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import psycopg.errors
import psycopg_pool
import pytest

from gateway.cli import main
from gateway.config.settings import StoreSettings, load_settings
from gateway.domain import Access
from gateway.errors import HoldStoreError, HoldStoreLowOnSpace, SettingsError
from gateway.hold.backend import open_store
from gateway.hold.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresHoldStore, _failure
from gateway.hold.store import (
    HoldBackend,
    HoldFilter,
    HoldStore,
    LaneClaim,
    Settlement,
    overrides_of,
)
from gateway.policy.history import Snapshot, read_contents, snapshot
from gateway.policy.loader import load_policy_dir
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from tests.hold.conftest import PostgresServer, have_postgres
from tests.hold.test_store_boundary import NOW, claims, held
from tests.stories import tiktok_ban
from tests.test_cli_impact import NOW as IMPACT_AT
from tests.test_cli_impact import REPO, phone

pytestmark = pytest.mark.skipif(not have_postgres(), reason="PostgreSQL not installed")


def pg(url: str, **settings: object) -> PostgresHoldStore:
    return PostgresHoldStore(StoreSettings(url=url, **settings))  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HoldBackend]:
    opened: HoldBackend
    if request.param == "sqlite":
        opened = HoldStore(tmp_path / "hold.db")
    else:
        opened = pg(request.getfixturevalue("pg_url"))
    try:
        yield opened
    finally:
        opened.close()


# --- the same behaviour on both backends -------------------------------------------------


def test_hold_due_content_headers_and_settle(store: HoldBackend) -> None:
    ids = [store.hold(held(n)) for n in range(3)]
    due = store.due(NOW + timedelta(seconds=1))
    assert [h.hold_id for h in due] == ids  # arrival order
    first = due[0]
    assert first.user == "user0@example.test"
    assert first.device_id == "phone-0"
    assert first.recipients == ("bob@example.test",)
    assert first.policy_ids == ("remove-tiktok",)
    assert first.content is None
    assert store.content(ids[0]) == b"Subject: held\r\n\r\nbody\r\n"
    # Several bodies in one query (release reads a lane's next messages so); unknown ids
    # are absent, not errors.
    assert store.contents([ids[2], "no-such-id", ids[0]]) == {
        ids[0]: b"Subject: held\r\n\r\nbody\r\n",
        ids[2]: b"Subject: held\r\n\r\nbody\r\n",
    }
    assert store.contents([]) == {}
    assert store.headers(ids[0]) == b"Subject: held\r\n"
    assert store.get(ids[1]) is not None
    assert store.get(ids[1]).content
    stats = store.stats()
    assert (stats.messages, stats.bytes) == (3, 3 * len(b"Subject: held\r\n\r\nbody\r\n"))
    assert stats.oldest is not None
    assert abs(stats.oldest - NOW) < timedelta(seconds=1)
    # A retry keeps the message with the recipients left and a later attempt.
    assert store.settle(
        Settlement(ids[0], NOW, retry=("bob@example.test",), retry_at=9e12, error="451")
    )
    assert ids[0] not in [h.hold_id for h in store.due(NOW + timedelta(seconds=1))]
    # A refusal's bounce is stored as a new held message to the sender, released at once.
    assert store.settle(Settlement(ids[1], NOW, bounce=b"Subject: bounce\r\n\r\nx\r\n"))
    bounces = [h for h in store.select() if h.is_bounce]
    assert [(b.bounce_of, b.recipients, b.release_requested) for b in bounces] == [
        (ids[1], ("user1@example.test",), True)
    ]
    assert store.content(ids[1]) is None
    assert store.remove([ids[2], bounces[0].hold_id]) == 2
    assert store.count() == 1
    assert store.device_ids() == {"phone-0"}
    # Settling what is gone (dropped meanwhile) writes nothing, not even a bounce, and
    # says so (an expiry another gateway did first is not counted again).
    assert not store.settle(Settlement(ids[2], NOW, bounce=b"Subject: b\r\n\r\n"))
    assert store.count() == 1


def test_filters_release_drop_claims_and_expiry(store: HoldBackend) -> None:
    ids = [store.hold(held(n)) for n in range(4)]
    assert [h.hold_id for h in store.select(HoldFilter(user="USER1@example.test"))] == [ids[1]]
    assert len(store.select(HoldFilter(policy_id="remove-tiktok"))) == 4
    assert store.select(HoldFilter(policy_id="other")) == []
    assert store.request_release(HoldFilter(device_id="phone-2")) == 1
    assert [h.release_requested for h in store.select()] == [False, False, True, False]
    assert store.drop(HoldFilter(), [ids[3]]) == 1
    assert store.claim(ids[:2], "c1", time.time()) == 2
    assert store.claimed() == 2
    assert store.unclaim(ids[:2]) == 2
    assert store.claimed() == 0
    store.postpone(ids[0], 9e12, "later")
    assert [h.hold_id for h in store.due(NOW + timedelta(seconds=1))] == ids[1:3]
    assert [h.hold_id for h in store.expired(NOW + timedelta(seconds=1), limit=2)] == ids[:2]
    assert store.expired(NOW - timedelta(seconds=1)) == []


def test_inventory_and_notices(store: HoldBackend) -> None:
    t = NOW.timestamp()
    store.record_devices([(claims(1), t, Access.SEND), (claims(2), t - 10, Access.SYNC)])
    store.record_devices([(claims(1), t - 100, Access.SYNC)])  # older: last_seen stays
    assert [c.device.id for c in store.devices(NOW - timedelta(seconds=5))] == ["phone-1"]
    accesses = store.device_accesses(NOW - timedelta(minutes=1))
    assert accesses == {"phone-1": frozenset(Access), "phone-2": frozenset({Access.SYNC})}
    assert store.prune_devices(NOW - timedelta(seconds=5)) == 1
    assert store.claim_notice("phone-1", "p", "enforce", NOW) is True
    assert store.claim_notice("phone-1", "p", "enforce", NOW) is False
    store.unclaim_notice("phone-1", "p", "enforce")
    assert store.claim_notice("phone-1", "p", "enforce", NOW) is True
    store.probe_write(time.time())
    assert store.noticed_devices("p") == []  # "enforce" is not a notice mail's phase
    assert store.claim_notice("phone-2", "p", "warn", NOW) is True
    assert store.noticed_devices("p") == ["phone-2"]
    # What the impact preview reads: the notice mails sent for these policies, not the
    # mailbox notices (":sync"), not other policies'.
    assert store.claim_notice("phone-2", "p", "warn:sync", NOW) is True
    assert store.claim_notice("phone-3", "q", "hold", NOW) is True
    assert store.claim_notice("phone-4", "r", "hold", NOW) is True
    assert store.notices_sent(["p", "q"]) == {
        ("phone-1", "p", "enforce"),
        ("phone-2", "p", "warn"),
        ("phone-3", "q", "hold"),
    }
    assert store.notices_sent([]) == set()


def test_first_seen_is_recorded_once_and_the_first_writer_wins(store: HoldBackend) -> None:
    """grace_hours counts from here, so every gateway on a shared store must agree."""
    first = store.first_seen("phone-1", "ban", NOW)
    assert first == NOW
    assert store.first_seen("phone-1", "ban", NOW + timedelta(hours=5)) == NOW
    assert store.first_seen_times("phone-1") == {"ban": NOW}
    assert store.first_seen_times("phone-9") == {}
    store.first_seen("phone-2", "ban", NOW + timedelta(hours=1))
    store.first_seen("phone-2", "other", NOW + timedelta(hours=2))
    # One query for a preview: per device, only the policies asked for.
    assert store.first_seen_of_policies(["ban"]) == {
        "phone-1": {"ban": NOW},
        "phone-2": {"ban": NOW + timedelta(hours=1)},
    }
    assert store.first_seen_of_policies(["other", "none"]) == {
        "phone-2": {"other": NOW + timedelta(hours=2)}
    }
    assert store.first_seen_of_policies([]) == {}


def test_admin_audit_and_paging_by_seq(store: HoldBackend) -> None:
    """The admin API's audit trail and its list cursor, alike on both stores."""
    ids = [store.hold(held(1)) for _ in range(3)]
    (first,) = store.select(limit=1)
    assert first.hold_id == ids[0]
    assert [h.hold_id for h in store.select(after=first.seq)] == ids[1:]
    store.record_admin_action(1.0, "carol", "operator", "hold.release", {"ids": ids[:1]}, 1)
    store.record_admin_action(2.0, "dave", "viewer", "impact", {}, 0)
    newest, older = store.admin_actions()
    assert (newest.actor, older.actor) == ("dave", "carol")
    assert older.target == {"ids": ids[:1]}
    assert [a.actor for a in store.admin_actions(before=newest.seq)] == ["carol"]


def test_policy_overrides_end_by_themselves_and_are_pruned(store: HoldBackend) -> None:
    """Suspensions and break-glass exemptions, alike on both stores (docs/policies.md)."""
    hour = timedelta(hours=1)
    store.suspend_policy("ban", NOW + hour, "incident", "cli:root", NOW)
    store.suspend_policy("ban", NOW + 2 * hour, "longer", "cli:root", NOW)  # replaces
    store.exempt_from_policy("ban", "user:ann@example.test", NOW + hour, "ceo", "admin:ops", NOW)
    store.exempt_from_policy("other", "device:p1", NOW + 3 * hour, "x", "admin:ops", NOW)
    rows = store.policy_overrides(NOW)
    assert [(r.policy_id, r.subject, r.reason) for r in rows] == [
        ("ban", None, "longer"),
        ("other", "device:p1", "x"),
        ("ban", "user:ann@example.test", "ceo"),
    ]
    overrides = overrides_of(rows)
    assert overrides.suspended == {"ban"}
    assert overrides.exempt == {("ban", "user:ann@example.test"), ("other", "device:p1")}
    later = NOW + hour  # the exemption ends exactly then: ignored, then pruned
    assert [r.subject for r in store.policy_overrides(later)] == [None, "device:p1"]
    assert store.prune_overrides(later) == 1
    assert store.resume_policy("ban") == 1
    assert store.resume_policy("ban") == 0
    assert store.remove_exemption("other", "device:p1") == 1
    assert store.policy_overrides(NOW) == []


def _snapshot(tmp_path: Path, files: dict[str, str]) -> Snapshot:
    directory = tmp_path / f"policies-{len(list(tmp_path.glob('policies-*')))}"
    directory.mkdir()
    for name, text in files.items():
        (directory / name).write_text(text)
    policy_set = load_policy_dir(directory)
    return snapshot(policy_set, read_contents(policy_set, directory))


def test_policy_versions_are_stored_once_paged_and_pruned(
    store: HoldBackend, tmp_path: Path
) -> None:
    """Policy history, alike on both stores (docs/admin.md): a version is stored once
    (a second load, a restart or another replica only moves last_loaded_at), listed newest
    first and paged by seq, read back with its files' text and policies, and the least
    recently loaded beyond ``keep`` are pruned."""
    first = _snapshot(tmp_path, {"ban.toml": tiktok_ban("hold")})
    other = tiktok_ban("warn").replace("remove-tiktok", "warn-tiktok")
    second = _snapshot(tmp_path, {"ban.toml": tiktok_ban("reject"), "b.toml": other})
    third = _snapshot(tmp_path, {"ban.toml": tiktok_ban("warn")})
    assert store.record_policy_version(first, 100.0, "startup", "gw1 pid 1", keep=10)
    assert not store.record_policy_version(first, 150.0, "startup", "gw2 pid 2", keep=10)
    assert store.record_policy_version(second, 200.0, "sighup", "gw1 pid 1", keep=10)
    newest, oldest = store.policy_versions()
    assert (newest.version, newest.trigger, newest.file_count) == (second.version, "sighup", 2)
    assert (oldest.version, oldest.loaded_by) == (first.version, "gw1 pid 1")
    assert (oldest.policy_count, newest.policy_count) == (1, 2)
    assert (oldest.loaded_at.timestamp(), oldest.last_loaded_at.timestamp()) == (100.0, 150.0)
    assert oldest.snapshot is None  # the list carries no text
    assert [v.version for v in store.policy_versions(limit=1, before=newest.seq)] == [first.version]

    read = store.policy_version(second.version)
    assert read is not None
    assert read.snapshot == second
    assert read.snapshot.files[1].text == tiktok_ban("reject")
    assert store.policy_version("0123456789ab") is None

    # A revert to the first set moves it, so the second is the least recently loaded.
    assert not store.record_policy_version(first, 300.0, "watch", "gw1 pid 1", keep=2)
    assert store.record_policy_version(third, 400.0, "watch", "gw1 pid 1", keep=2)
    assert [v.version for v in store.policy_versions()] == [third.version, first.version]


# --- several gateways (or the workers of one) on one store ------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[HoldBackend, HoldBackend]]:
    """Two connections to one store with a 60-second claim lease: two gateways on
    PostgreSQL, or two workers of `gateway serve --workers N` on SQLite."""
    stores: tuple[HoldBackend, HoldBackend]
    if request.param == "sqlite":
        path = tmp_path / "hold.db"
        stores = (HoldStore(path, lease=60), HoldStore(path, lease=60))
    else:
        url = request.getfixturevalue("pg_url")
        stores = (pg(url, claim_lease=60), pg(url, claim_lease=60))
    try:
        yield stores
    finally:
        for opened in stores:
            opened.close()


def test_a_gateway_takes_back_its_own_earlier_claims_at_once(
    pair: tuple[HoldBackend, HoldBackend],
) -> None:
    """Claim ids are "<gateway>.<attempt>": after an outage cut a release short, the same
    gateway claims the lane again without waiting out its lease; another gateway waits."""
    one, two = pair
    ids = [one.hold(held(1)) for _ in range(2)]
    now = time.time()
    assert one.claim(ids, "gwA.attempt1", now) == 2
    assert two.claim(ids, "gwB.attempt1", now) == 0  # another gateway's live claim
    assert one.claim(ids, "gwA.attempt2", now + 1) == 2  # its own: taken back
    assert two.claim(ids, "gwB.attempt2", now + 2) == 0


def test_a_device_lane_is_claimed_by_one_gateway_at_a_time_until_its_lease_ends(
    pair: tuple[HoldBackend, HoldBackend],
) -> None:
    one, two = pair
    first = [one.hold(held(1)) for _ in range(2)]
    now = time.time()
    assert one.claim(first, "gw1", now) == 2
    assert two.claim(first, "gw2", now) == 0  # the same messages
    later = two.hold(held(1))  # newer mail of the same device must not overtake
    assert two.claim([later], "gw2", now) == 0
    other = two.hold(held(2))  # another device is free
    assert two.claim([other], "gw2", now) == 1
    # A crashed gateway's claim expires with its lease.
    assert two.claim([*first, later], "gw2", now + 61) == 3
    # A message retried meanwhile (attempts changed) is not claimed from a stale read.
    two.unclaim([*first, later])
    one.postpone(first[0], 0, "451 later")
    assert two.claim([first[0]], "gw2", now, attempts=[0]) == 0
    assert two.claim([first[0]], "gw2", now, attempts=[1]) == 1


def test_a_page_of_lanes_is_claimed_in_one_call_with_a_count_per_lane(
    store: HoldBackend,
) -> None:
    """Release claims a page's lanes together (one commit); each lane's count comes back
    in order, an empty lane claims nothing."""
    first = [store.hold(held(1)) for _ in range(2)]
    second = [store.hold(held(2))]
    lanes = [
        LaneClaim(tuple(first), "gw.1"),
        LaneClaim((), "gw.2"),
        LaneClaim(tuple(second), "gw.3"),
    ]
    assert store.claim_lanes(lanes, time.time()) == [2, 0, 1]
    assert {m.hold_id: m.claim_id for m in store.select()} == {
        first[0]: "gw.1",
        first[1]: "gw.1",
        second[0]: "gw.3",
    }


def test_lanes_claimed_together_are_each_all_or_nothing(
    pair: tuple[HoldBackend, HoldBackend],
) -> None:
    """In one batch, a lane whose device another gateway (or worker) is relaying, or with a
    message retried since it was read, is left alone, including the messages of it that
    could have been claimed; the other lanes are claimed."""
    one, two = pair
    free = [one.hold(held(1)) for _ in range(2)]
    busy = [one.hold(held(2)) for _ in range(2)]
    retried = one.hold(held(3))
    half = [one.hold(held(4)) for _ in range(2)]
    now = time.time()
    assert one.claim(busy[:1], "gwA.x", now) == 1  # gateway A relays device 2's mail
    one.postpone(retried, 0, "451 later")  # attempts 0 -> 1 after gateway B read it
    one.postpone(half[1], 0, "451 later")  # the lane's second message only
    lanes = [
        LaneClaim(tuple(free), "gwB.1", (0, 0)),
        LaneClaim(tuple(busy), "gwB.2", (0, 0)),
        LaneClaim((retried,), "gwB.3", (0,)),
        LaneClaim(tuple(half), "gwB.4", (0, 0)),
    ]
    assert two.claim_lanes(lanes, now) == [2, 0, 0, 0]
    claimed = {m.hold_id: m.claim_id for m in two.select()}
    assert [claimed[h] for h in free] == ["gwB.1", "gwB.1"]
    assert [claimed[h] for h in busy] == ["gwA.x", None]  # nothing of the lane written
    assert claimed[retried] is None
    assert [claimed[h] for h in half] == [None, None]  # its first message rolled back too


def test_after_a_server_restart_one_call_fails_and_the_pool_replaces_the_rest(
    postgres: PostgresServer, pg_url: str
) -> None:
    """Pooled connections are not checked at each checkout (a round trip per call): the
    first call on a connection the restart broke fails (a hold gets 451), and that
    failure has the idle ones checked and replaced, so the calls after it succeed."""
    store = pg(pg_url, pool_size=4)
    try:
        store._pool.resize(4, 4)  # four idle connections, all broken by the restart
        store._pool.wait(10)
        store.hold(held(1))
        postgres.call(postgres.server.restart())
        outcomes = []
        for _ in range(8):
            try:
                outcomes.append(store.count())
            except HoldStoreError:
                outcomes.append(-1)
        assert outcomes.count(-1) <= 1
        assert outcomes[1:] == [1] * 7
    finally:
        store.close()


def test_concurrent_claims_from_many_threads_have_exactly_one_winner(pg_url: str) -> None:
    stores = [pg(pg_url, pool_size=4) for _ in range(3)]
    try:
        lanes = [[stores[0].hold(held(n)) for _ in range(3)] for n in range(10)]
        wins: list[tuple[int, str]] = []
        start = threading.Barrier(12)

        def contender(k: int) -> None:
            store = stores[k % 3]
            start.wait(10)
            for n, lane in enumerate(lanes):
                if store.claim(lane, f"claim-{k}", time.time()) == len(lane):
                    wins.append((n, f"claim-{k}"))

        threads = [threading.Thread(target=contender, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(n for n, _ in wins) == list(range(10))  # each lane won exactly once
    finally:
        for s in stores:
            s.close()


def test_two_gateways_expiring_the_same_message_write_one_bounce(pg_url: str) -> None:
    one, two = pg(pg_url), pg(pg_url)
    try:
        hold_id = one.hold(held(1))
        bounce = b"Subject: expired\r\n\r\n"
        barrier = threading.Barrier(2)
        settled: list[bool] = []

        def expire(store: PostgresHoldStore) -> None:
            barrier.wait(10)
            settled.append(store.settle(Settlement(hold_id, NOW, bounce=bounce)))

        threads = [threading.Thread(target=expire, args=(s,)) for s in (one, two)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [h.bounce_of for h in one.select()] == [hold_id]
        assert sorted(settled) == [False, True]  # the second learns it settled nothing
    finally:
        one.close()
        two.close()


def test_an_expiry_leaves_alone_mail_another_gateway_has_claimed_since_it_looked(
    pair: tuple[HoldBackend, HoldBackend],
) -> None:
    """Gateway (or worker) two lists a message as expired; before it settles it, one claims
    it to relay it (its device came back compliant). The expiry must not delete it and
    bounce it: the mail may be at the upstream already, and the sender would be told it
    was not delivered. Once the claim is let go (or its lease ends), it expires."""
    one, two = pair
    hold_id = one.hold(held(1))
    (listed,) = two.expired(NOW + timedelta(days=1))  # not claimed when read
    assert one.claim([hold_id], "gwA.1", time.time()) == 1
    expiry = Settlement(
        listed.hold_id, NOW, bounce=b"Subject: expired\r\n\r\n", unless_claimed=True
    )
    assert not two.settle(expiry)
    assert [(h.hold_id, h.is_bounce) for h in one.select()] == [(hold_id, False)]
    assert one.unclaim([hold_id]) == 1  # the relay failed: the next expiry pass settles it
    assert two.settle(expiry)
    assert [h.bounce_of for h in one.select()] == [hold_id]


# --- schema and migrations ---------------------------------------------------------------


def test_migrations_apply_once_and_a_newer_schema_is_refused(pg_url: str) -> None:
    pg(pg_url).close()
    pg(pg_url).close()  # nothing left to apply
    with psycopg.connect(pg_url, autocommit=True) as conn:
        versions = conn.execute("SELECT version FROM schema_version").fetchall()
        assert versions == [(version,) for version, _ in MIGRATIONS]
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(HoldStoreError, match="newer than this gateway knows"):
        pg(pg_url)


def test_gateway_store_migrate_creates_the_schema_and_reports_nothing_to_do_after(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, issuer=TestIssuer.generate("k1"), upstream_port=1)
    with config.open("a") as out:
        out.write(f'\n[store]\nurl = "{pg_url}"\n')
    assert main(["store", "migrate", "--config", str(config)]) == 0
    assert (
        f"applied migration(s) 1, 2, 3, 4, 5; schema version {SCHEMA_VERSION}"
        in capsys.readouterr().out
    )
    assert main(["store", "migrate", "--config", str(config)]) == 0
    assert "nothing to apply" in capsys.readouterr().out
    # The CLI's hold commands use the shared store by the same setting.
    store = open_store(load_settings(config, {}))
    try:
        store.hold(held(1))
    finally:
        store.close()
    assert main(["hold", "list", "--json", "--config", str(config)]) == 0
    assert '"device_id": "phone-1"' in capsys.readouterr().out


# --- errors ------------------------------------------------------------------------------


def test_errors_name_the_server_say_what_to_do_and_never_the_password(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    secret = "hunter2-never-logged"
    with pytest.raises(HoldStoreError) as caught:
        PostgresHoldStore(
            StoreSettings(
                url="postgresql://gateway@127.0.0.1:1/gateway",
                password=secret,
                connect_timeout=1,
            )
        )
    text = str(caught.value)
    assert "cannot reach PostgreSQL" in text
    assert "host and port in [store] url" in text
    assert "postgresql://gateway@127.0.0.1:1/gateway" in text
    assert secret not in text
    url = postgres.server.url.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(HoldStoreError, match="create the database"):
        pg(url)


def test_the_url_must_be_postgresql_and_carry_no_password(tmp_path: Path) -> None:
    config = write_config(tmp_path, issuer=TestIssuer.generate("k1"), upstream_port=1)
    text = config.read_text()
    for url, problem in (
        ("mysql://db/gateway", "not a postgresql:// URL"),
        ("postgresql://gw:s3cret@db/gateway", "the URL holds a password"),
    ):
        config.write_text(text + f'\n[store]\nurl = "{url}"\n')
        with pytest.raises(SettingsError) as caught:
            load_settings(config, {})
        problems = " ".join(str(p) for p in caught.value.problems)
        assert problem in problems
        assert "s3cret" not in problems
    config.write_text(text)
    assert load_settings(config, {}).store.url is None  # the default: SQLite


def test_a_hold_fails_with_holdstoreerror_while_the_server_is_down_and_works_after(
    postgres: PostgresServer,
) -> None:
    server = postgres
    url = server.database()
    store = pg(url, connect_timeout=1)
    try:
        store.hold(held(1))
        server.call(server.server.stop(immediate=True))
        try:
            with pytest.raises(HoldStoreError, match=r"cannot reach PostgreSQL|no connection"):
                store.hold(held(2))
        finally:
            server.call(server.server.start())
        deadline = time.monotonic() + 15
        while True:
            try:
                store.hold(held(3))
                break
            except HoldStoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert store.count() == 2
    finally:
        store.close()


@pytest.mark.parametrize(
    ("error", "kind", "advice"),
    [
        (
            psycopg.errors.InvalidPassword('password authentication failed for user "gateway"'),
            HoldStoreError,
            "password in [store] password_file (or PGPASSWORD)",
        ),
        (
            psycopg.OperationalError("connection failed: FATAL: no pg_hba.conf entry for host"),
            HoldStoreError,
            "pg_hba.conf",
        ),
        (
            psycopg.errors.DiskFull("could not extend file: No space left on device"),
            HoldStoreLowOnSpace,
            "free space on the database server's data disk",
        ),
        (psycopg.errors.TooManyConnections("too many clients"), HoldStoreError, "pool_size"),
        (
            psycopg.errors.ReadOnlySqlTransaction("read-only transaction"),
            HoldStoreError,
            "point [store] url at the primary",
        ),
        (psycopg_pool.PoolTimeout("timeout"), HoldStoreError, "no connection within 2 s"),
    ],
)
def test_each_failure_is_translated_once_into_what_to_do(
    error: Exception, kind: type[HoldStoreError], advice: str
) -> None:
    """Failures the test server cannot produce on demand (it trusts every login, its disk
    is not full): the translation alone."""
    translated = _failure("postgresql://gateway@db:5432/gateway", "write", error, 2)
    assert type(translated) is kind
    assert advice in str(translated)
    assert str(translated).startswith("hold store postgresql://gateway@db:5432/gateway")


def test_gateway_impact_counts_the_devices_every_gateway_recorded_in_the_shared_store(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "config", tmp_path / "config")
    config = tmp_path / "config" / "gateway.toml"
    with config.open("a") as out:
        out.write(f'\n[store]\nurl = "{pg_url}"\n')
    for name in ("p1", "p2"):  # as two gateways would, each its own device
        store = pg(pg_url)
        try:
            store.record_devices([(phone(name), IMPACT_AT.timestamp(), Access.SEND)])
        finally:
            store.close()
    assert main(["impact", "--at", IMPACT_AT.isoformat(), "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inventory"]["source"] == pg_url  # user@host:port/database, no password
    assert report["inventory"]["devices"] == 2
    assert not load_settings(config, {}).hold.database.exists()  # SQLite untouched
