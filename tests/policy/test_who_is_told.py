"""Who a policy change would tell (pure, docs/policies.md "Who is told"): the announcement
to the devices it newly warns that were not told before, the "disregard" notice to every
device told about a policy it retracts or deletes; operator overrides count."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from gateway.domain import NO_OVERRIDES, Access, DeviceClass, Overrides, Platform, PolicyState
from gateway.policy.engine import CompiledPolicySet, compile_policy_set
from gateway.policy.impact import Told, WhoIsTold, rollout_stages, who_is_told
from gateway.policy.model import Policy, PolicySet, Rollout, RolloutStage
from tests.policy.test_engine import ANNOUNCE, BAN, ENFORCE, claims

P = BAN.id
AT = ANNOUNCE + timedelta(minutes=1)
DEVICES = [
    claims(user="alice@example.test", device_id="alice-phone"),
    claims(user="bob@example.test", device_id="bob-phone"),
    claims(user="carol@example.test", device_id="carol-laptop", device_class=DeviceClass.DESKTOP,
           platform=Platform.MACOS),
    claims(user="dave@example.test", device_id="dave-phone", apps=frozenset()),
]  # fmt: skip


def policies(*found: Policy) -> CompiledPolicySet:
    return compile_policy_set(PolicySet(found, "v", {}))


def told(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    sent: set[tuple[str, str, str]] = set(),  # noqa: B006  # never changed
    overrides: Overrides = NO_OVERRIDES,
    at: datetime = AT,
) -> WhoIsTold:
    return who_is_told(
        live, candidate, DEVICES, at, lambda c: {Access.SEND}, lambda d: {}, sent, overrides
    )


def test_the_announcement_tells_the_newly_warned_phones_not_told_before() -> None:
    draft, ban = policies(replace(BAN, state=PolicyState.DRAFT)), policies(BAN)
    assert told(draft, ban).announced == (
        Told("alice@example.test", "alice-phone", P),
        Told("bob@example.test", "bob-phone", P),
    )  # not the laptop, not the phone without the app
    assert told(draft, ban).withdrawn == ()
    # Bob had his warning (the notices table): not told again.
    assert told(draft, ban, {("bob-phone", P, "warn")}).announced == (
        Told("alice@example.test", "alice-phone", P),
    )
    # A mailbox notice is another channel: it does not count as the mail being sent.
    assert len(told(draft, ban, {("bob-phone", P, "warn:sync")}).announced) == 2
    assert told(ban, ban).announced == ()  # already warning before the change: not new
    assert told(draft, ban, at=ANNOUNCE - timedelta(minutes=1)).announced == ()  # not yet


def test_overrides_count_for_the_announcement() -> None:
    draft, ban = policies(replace(BAN, state=PolicyState.DRAFT)), policies(BAN)
    suspended = Overrides(suspended=frozenset({P}))
    assert told(draft, ban, overrides=suspended).announced == ()
    exempt = Overrides(exempt=frozenset({(P, "user:alice@example.test")}))
    assert told(draft, ban, overrides=exempt).announced == (
        Told("bob@example.test", "bob-phone", P),
    )


def test_a_withdrawal_tells_exactly_the_devices_told_before() -> None:
    ban = policies(BAN)
    retracted = policies(replace(BAN, state=PolicyState.RETRACTED))
    sent = {
        ("alice-phone", P, "warn"),
        ("alice-phone", P, "hold"),  # two notices: one withdrawal
        ("bob-phone", P, "released"),
        ("carol-laptop", P, "hold:sync"),  # a mailbox notice has its own withdrawal
        ("dave-phone", "another-policy", "warn"),
        ("erin-phone", P, "warn"),  # not in the inventory: nobody to address
    }
    expected = (
        Told("alice@example.test", "alice-phone", P),
        Told("bob@example.test", "bob-phone", P),
    )
    assert told(ban, retracted, sent).withdrawn == expected
    assert told(ban, policies(), sent).withdrawn == expected  # deleted
    assert told(ban, retracted, sent).announced == ()
    # Told already (a retraction read again after a restart): not a second time.
    assert told(ban, retracted, sent | {("bob-phone", P, "withdrawn")}).withdrawn == expected[:1]
    # Deleting a draft withdraws nothing: it never told anybody.
    assert told(policies(replace(BAN, state=PolicyState.DRAFT)), policies(), sent).withdrawn == ()
    assert told(ban, ban, sent).withdrawn == ()  # no change


def test_lists_are_bounded_and_counts_whole() -> None:
    rows = (
        *(Told(f"u{n}@example.test", f"d{n}", P) for n in range(5)),
        Told("u0@example.test", "d0b", P),
    )
    answer = WhoIsTold(announced=rows).as_dict(limit=2)
    assert answer["announced"] == {
        "notices": 6,
        "users": 5,
        "devices": 6,
        "rows": [
            {"user": "u0@example.test", "device_id": "d0", "policy_id": P},
            {"user": "u1@example.test", "device_id": "d1", "policy_id": P},
        ],
    }
    assert answer["withdrawn"] == {"notices": 0, "users": 0, "devices": 0, "rows": []}


def test_rollout_stages_count_overrides() -> None:
    staged = policies(replace(BAN, rollout=Rollout((RolloutStage(ENFORCE, 100.0),))))
    at = ENFORCE + timedelta(hours=1)
    (stage,) = rollout_stages(staged, DEVICES, at)
    assert (stage.enforced, stage.matching, stage.suspended) == (2, 2, False)
    exempt = Overrides(exempt=frozenset({(P, "device:alice-phone")}))
    (stage,) = rollout_stages(staged, DEVICES, at, exempt)
    assert (stage.enforced, stage.matching) == (1, 1)
    (stage,) = rollout_stages(staged, DEVICES, at, Overrides(suspended=frozenset({P})))
    assert stage.suspended is True
    assert stage.as_dict()["suspended"] is True
