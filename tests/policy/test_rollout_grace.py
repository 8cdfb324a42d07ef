"""Staged rollout and grace per device, in the engine and the loader (pure)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.domain import Action, DeviceClaims, Phase
from gateway.policy.engine import CompiledPolicySet, compile_policy_set, decide
from gateway.policy.loader import load_policy_dir
from gateway.policy.model import PolicySet, Rollout, RolloutStage, rollout_bucket
from tests.policy.test_engine import BAN, ENFORCE, claims

AFTER = ENFORCE + timedelta(hours=1)
GROUPS = {"pilot": frozenset({"pilot@example.test"})}


def compiled(**changes: Any) -> CompiledPolicySet:
    return compile_policy_set(PolicySet((replace(BAN, **changes),), "v1", GROUPS))


def held_ids(policies: CompiledPolicySet, count: int, at: datetime) -> list[str]:
    held = []
    for n in range(count):
        device = f"phone-{n:04d}"
        decision = decide(policies, claims(device_id=device), at)
        if decision.action is Action.HOLD:
            held.append(device)
    return held


def test_ten_percent_rollout_holds_a_stable_tenth_of_1000_devices() -> None:
    policies = compiled(rollout=Rollout((RolloutStage(None, 10.0),)))
    held = held_ids(policies, 1000, AFTER)
    assert len(held) == 98  # deterministic: SHA-256 buckets of phone-0000 .. phone-0999
    assert 70 <= len(held) <= 130
    # The others are warned as in the announce phase, and the decision says why.
    outside = next(f"phone-{n:04d}" for n in range(1000) if f"phone-{n:04d}" not in held)
    warned = decide(policies, claims(device_id=outside), AFTER)
    assert warned.action is Action.WARN
    assert warned.phase is Phase.ANNOUNCE
    assert warned.outside_rollout == ("remove-tiktok",)
    assert "staged rollout" in warned.message


def test_rollout_buckets_are_the_same_in_another_process() -> None:
    ids = [f"phone-{n:04d}" for n in range(200)]
    here = [rollout_bucket(i, "remove-tiktok") for i in ids]
    script = (
        "import sys; from gateway.policy.model import rollout_bucket; "
        "print(' '.join(str(rollout_bucket(f'phone-{n:04d}', 'remove-tiktok')) for n in range(200)))"
    )
    there = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert [int(b) for b in there] == here
    # A different policy orders the devices differently.
    assert [rollout_bucket(i, "other-ban") for i in ids] != here


def test_stages_switch_at_their_dates_and_only_widen() -> None:
    day = timedelta(days=1)
    rollout = Rollout(
        (
            RolloutStage(AFTER, groups=frozenset({"pilot"})),
            RolloutStage(AFTER + day, percent=50.0),
            RolloutStage(AFTER + 2 * day, percent=100.0),
        )
    )
    policies = compiled(rollout=rollout)
    pilot = claims(user="pilot@example.test", device_id="pilot-phone")

    def action(c: DeviceClaims, at: datetime) -> Action:
        return decide(policies, c, at).action

    # Before the first stage: enforcing, but nobody is in the rollout.
    assert action(pilot, AFTER - timedelta(seconds=1)) is Action.WARN
    assert action(pilot, AFTER) is Action.HOLD
    others = [claims(device_id=f"phone-{n:04d}") for n in range(200)]
    assert all(action(c, AFTER) is Action.WARN for c in others)
    half = sum(action(c, AFTER + day) is Action.HOLD for c in others)
    assert 70 <= half <= 130
    assert action(pilot, AFTER + day) is Action.HOLD  # the pilot group stays in
    assert all(action(c, AFTER + 2 * day) is Action.HOLD for c in others)


def test_grace_counts_from_first_seen_per_device() -> None:
    policies = compiled(grace=timedelta(hours=72))
    phone = claims()
    # Seen long before the deadline: enforced at the deadline.
    early = {"remove-tiktok": ENFORCE - timedelta(days=5)}
    assert decide(policies, phone, ENFORCE, first_seen=early).action is Action.HOLD
    # First seen after the deadline: warned for 72 hours from then, then held.
    late_seen = ENFORCE + timedelta(days=2)
    late = {"remove-tiktok": late_seen}
    during = decide(policies, phone, late_seen + timedelta(hours=71), first_seen=late)
    assert during.action is Action.WARN
    assert during.phase is Phase.ANNOUNCE
    assert during.deadlines == {"remove-tiktok": (late_seen + timedelta(hours=72)).isoformat()}
    assert (
        decide(policies, phone, late_seen + timedelta(hours=72), first_seen=late).action
        is Action.HOLD
    )
    # Never seen: counted from now, and the caller is asked to record it.
    unseen = decide(policies, phone, AFTER)
    assert unseen.action is Action.WARN
    assert unseen.first_seen_needed == ("remove-tiktok",)
    assert decide(policies, phone, AFTER, first_seen=late).first_seen_needed == ()


def test_policies_without_rollout_or_grace_are_unchanged() -> None:
    decision = decide(compiled(), claims(), AFTER)
    assert decision.action is Action.HOLD
    assert decision.outside_rollout == ()
    assert decision.first_seen_needed == ()


BAN_TOML = """\
[[policy]]
id = "remove-tiktok"
match.apps_any = ["com.zhiliaoapp.musically"]
enforce_at = 2020-07-11T06:59:00Z
action = "hold"
"""


def write(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "ban.toml").write_text(BAN_TOML + extra)
    return tmp_path


def test_loader_reads_percent_stages_and_grace(tmp_path: Path) -> None:
    policy = load_policy_dir(write(tmp_path, "grace_hours = 72\nrollout.percent = 10\n")).policies[
        0
    ]
    assert policy.grace == timedelta(hours=72)
    assert policy.rollout == Rollout((RolloutStage(None, 10.0),))
    staged = """\
[[policy.rollout.stage]]
at = 2020-07-11T06:59:00Z
groups = ["pilot"]
[[policy.rollout.stage]]
at = 2020-07-12T06:59:00Z
percent = 25
"""
    policy = load_policy_dir(write(tmp_path, staged), GROUPS).policies[0]
    assert policy.rollout is not None
    assert [str(s) for s in policy.rollout.stages] == [
        "groups pilot from 2020-07-11T06:59:00+00:00",
        "25% from 2020-07-12T06:59:00+00:00",
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("rollout.percent = 120\n", "a percentage is at most 100"),
        ("rollout.percent = -1\n", "must be a finite number of at least 0"),
        ("grace_hours = -3\n", "grace_hours: must be a finite number of at least 0"),
        ("rollout.pct = 5\n", "did you mean 'percent'"),
        (
            "[[policy.rollout.stage]]\nat = 2020-07-12T00:00:00Z\npercent = 5\n"
            "[[policy.rollout.stage]]\nat = 2020-07-11T00:00:00Z\npercent = 50\n",
            "stages must be in date order",
        ),
        ("[[policy.rollout.stage]]\nat = 2020-07-12T00:00:00Z\n", "a stage needs percent"),
        ("[[policy.rollout.stage]]\npercent = 5\n", "missing required key 'at'"),
        (
            "[[policy.rollout.stage]]\nat = 2020-07-12T00:00:00Z\ngroups = ['nope']\n",
            "unknown group",
        ),
    ],
)
def test_loader_rejects_bad_rollouts(tmp_path: Path, extra: str, expected: str) -> None:
    from gateway.errors import PolicyLoadError

    with pytest.raises(PolicyLoadError) as caught:
        load_policy_dir(write(tmp_path, extra), GROUPS)
    assert expected in "\n".join(str(p) for p in caught.value.problems)
