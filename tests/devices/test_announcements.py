"""Who an announcement warns (pure): matching devices in their announce phase, devices left
out of a rollout stage; never an exempted user, an audit policy or a non-matching device."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from gateway.devices.announce import announcements, warning_policies
from gateway.domain import Access, DeviceClass, Platform, PolicyState
from gateway.policy.engine import compile_policy_set
from gateway.policy.model import Exemptions, PolicySet, Rollout, RolloutStage
from tests.policy.test_engine import ANNOUNCE, BAN, ENFORCE, claims

DEVICES = [
    claims(user="alice@example.test", device_id="alice-phone"),
    claims(user="it@example.test", device_id="it-phone"),
    claims(user="carol@example.test", device_id="carol-laptop", device_class=DeviceClass.DESKTOP,
           platform=Platform.MACOS),
    claims(user="dave@example.test", device_id="dave-phone", apps=frozenset()),
]  # fmt: skip


def told(policy: object, at: object) -> list[tuple[str, str]]:
    compiled = compile_policy_set(PolicySet((policy,), "v1", {}))  # type: ignore[arg-type]
    ids = [p.id for p in warning_policies(compiled, at)]  # type: ignore[arg-type]
    rows = announcements(
        compiled,
        ids,
        DEVICES,
        at,
        lambda c: {Access.SEND},
        lambda d: {},  # type: ignore[arg-type]
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
