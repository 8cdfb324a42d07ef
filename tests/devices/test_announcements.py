"""Who an announcement warns (pure): matching devices in their announce phase, devices left
out of a rollout stage; never an exempted user, an audit policy or a non-matching device,
nor anybody for a policy an operator suspended."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from gateway.domain import NO_OVERRIDES, Access, DeviceClass, Overrides, Platform, PolicyState
from gateway.policy.engine import compile_policy_set
from gateway.policy.impact import announcements, warning_policies
from gateway.policy.model import Exemptions, PolicySet, Rollout, RolloutStage
from tests.policy.test_engine import ANNOUNCE, BAN, ENFORCE, claims

DEVICES = [
    claims(user="alice@example.test", device_id="alice-phone"),
    claims(user="it@example.test", device_id="it-phone"),
    claims(user="carol@example.test", device_id="carol-laptop", device_class=DeviceClass.DESKTOP,
           platform=Platform.MACOS),
    claims(user="dave@example.test", device_id="dave-phone", apps=frozenset()),
]  # fmt: skip


def told(policy: object, at: object, overrides: Overrides = NO_OVERRIDES) -> list[tuple[str, str]]:
    compiled = compile_policy_set(PolicySet((policy,), "v1", {}))  # type: ignore[arg-type]
    ids = [p.id for p in warning_policies(compiled, at, overrides)]  # type: ignore[arg-type]
    rows = announcements(
        compiled,
        ids,
        DEVICES,
        at,  # type: ignore[arg-type]
        lambda c: {Access.SEND},
        lambda d: {},
        overrides,
    )
    return [(r.user, r.policy_id) for r in rows]


def test_announce_phase_warns_exactly_the_matching_devices() -> None:
    ban = replace(BAN, exempt=Exemptions(users=frozenset({"it@example.test"})))
    at = ANNOUNCE + timedelta(minutes=1)
    assert told(ban, at) == [("alice@example.test", "remove-tiktok")]
    assert told(ban, ANNOUNCE - timedelta(minutes=1)) == []  # not yet
    assert told(replace(ban, state=PolicyState.AUDIT), at) == []  # audit never tells anybody
    assert told(ban, ENFORCE + timedelta(minutes=1)) == []  # enforcing: the hold notice's turn


def test_devices_left_out_of_a_rollout_are_warned() -> None:
    staged = replace(BAN, rollout=Rollout((RolloutStage(ENFORCE + timedelta(days=1), 100.0),)))
    assert told(staged, ENFORCE + timedelta(hours=1)) == [
        ("alice@example.test", "remove-tiktok"),
        ("it@example.test", "remove-tiktok"),
    ]
    assert told(staged, ENFORCE + timedelta(days=2)) == []  # everybody is in: held instead


def test_operator_overrides_hold_for_announcements() -> None:
    """A suspended policy tells nobody; a break-glass exemption (user or device) leaves
    out its one subject."""
    at = ANNOUNCE + timedelta(minutes=1)
    assert told(BAN, at) == [
        ("alice@example.test", "remove-tiktok"),
        ("it@example.test", "remove-tiktok"),
    ]
    assert told(BAN, at, Overrides(suspended=frozenset({"remove-tiktok"}))) == []
    assert told(BAN, at, Overrides(suspended=frozenset({"another-policy"}))) == told(BAN, at)
    by_user = Overrides(exempt=frozenset({("remove-tiktok", "user:it@example.test")}))
    assert told(BAN, at, by_user) == [("alice@example.test", "remove-tiktok")]
    by_device = Overrides(exempt=frozenset({("remove-tiktok", "device:alice-phone")}))
    assert told(BAN, at, by_device) == [("it@example.test", "remove-tiktok")]
