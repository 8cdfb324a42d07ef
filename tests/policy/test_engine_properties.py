"""Property-based tests of the evaluator against a brute-force reference.

The reference checks every policy in order with no index: if the indexed engine ever
disagrees with it, the index is wrong.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.domain import (
    Access,
    Action,
    Device,
    DeviceClaims,
    DeviceClass,
    Phase,
    Platform,
    PolicyState,
)
from gateway.policy.engine import compile_policy_set, decide
from gateway.policy.model import ALL_ACCESS, Conditions, DeviceFacts, Exemptions, Policy, PolicySet
from gateway.policy.versions import parse_range

APPS = [f"app.{n}" for n in range(6)]
VERSION_RANGES = ["<14", "<=14", "<15.1", "<=15.1", ">=14", "<13", ">=13, <15", "<16"]
VERSIONS = [None, "13", "14", "14.0.1", "15.1", "15.10", "16", "garbage"]
USERS = ["alice@x.test", "bob@x.test", "carol@x.test"]
DEVICES = ["d1", "d2", "d3"]
GROUPS = {"g1": frozenset({"alice@x.test"}), "g2": frozenset({"bob@x.test", "carol@x.test"})}
BASE = datetime(2020, 7, 10, tzinfo=UTC)

ACCESS_SCOPES = [ALL_ACCESS, frozenset({Access.SEND}), frozenset({Access.SYNC})]

maybe = st.none() | st.just(None)


def opt_set(values: list[str]) -> st.SearchStrategy[frozenset[str] | None]:
    return st.none() | st.frozensets(st.sampled_from(values), min_size=1, max_size=3)


@st.composite
def conditions(draw: st.DrawFn) -> Conditions:
    c = Conditions(
        apps_any=draw(opt_set(APPS)),
        apps_all=draw(opt_set(APPS)),
        device_classes=draw(
            st.none() | st.frozensets(st.sampled_from(list(DeviceClass)), min_size=1)
        ),
        platforms=draw(st.none() | st.frozensets(st.sampled_from(list(Platform)), min_size=1)),
        users=draw(opt_set(USERS)),
        groups=draw(opt_set(list(GROUPS))),
        device_ids=draw(opt_set(DEVICES)),
        posture=draw(st.none() | st.just((("jailbroken", True),))),
        os_version=draw(st.none() | st.sampled_from(VERSION_RANGES).map(parse_range)),
    )
    return c if not c.is_empty() else Conditions(all_devices=True)


@st.composite
def policies(draw: st.DrawFn, index: int) -> Policy:
    announce = draw(st.none() | st.integers(-3, 3))
    enforce = (
        draw(st.none() | st.integers(-3, 3))
        if announce is None
        else announce + draw(st.integers(0, 3))
    )
    return Policy(
        id=f"p{index:02d}",
        action=draw(st.sampled_from(list(Action))),
        state=draw(st.sampled_from(list(PolicyState))),
        message=f"message {index}",
        match=draw(conditions()),
        scope=draw(
            st.just(Conditions())
            | st.builds(
                Conditions,
                device_classes=st.frozensets(st.sampled_from(list(DeviceClass)), min_size=1),
            )
        ),
        exempt=Exemptions(
            users=draw(st.frozensets(st.sampled_from(USERS), max_size=1)),
            groups=draw(st.frozensets(st.sampled_from(list(GROUPS)), max_size=1)),
            device_ids=draw(st.frozensets(st.sampled_from(DEVICES), max_size=1)),
        ),
        announce_at=None if announce is None else BASE + timedelta(days=announce),
        enforce_at=None if enforce is None else BASE + timedelta(days=enforce),
        access=draw(st.sampled_from(ACCESS_SCOPES)),
    )


@st.composite
def policy_sets(draw: st.DrawFn) -> PolicySet:
    count = draw(st.integers(0, 8))
    return PolicySet(tuple(draw(policies(i)) for i in range(count)), version="v", groups=GROUPS)


@st.composite
def devices(draw: st.DrawFn) -> DeviceClaims:
    return DeviceClaims(
        issuer="i",
        subject=draw(st.sampled_from(USERS)),
        audience=("a",),
        issued_at=BASE,
        expires_at=BASE + timedelta(days=30),
        device=Device(
            draw(st.sampled_from(DEVICES)),
            draw(st.sampled_from(list(Platform))),
            draw(st.sampled_from(list(DeviceClass))),
            os_version=draw(st.sampled_from(VERSIONS)),
        ),
        apps=draw(st.frozensets(st.sampled_from(APPS), max_size=6)),
        posture=draw(st.sampled_from([{}, {"jailbroken": True}, {"jailbroken": False}])),
    )


moments = st.integers(-4, 7).map(lambda d: BASE + timedelta(days=d, hours=12))


def reference_action(
    policy_set: PolicySet, claims: DeviceClaims, now: datetime, access: Access = Access.SEND
) -> Action:
    """Brute force: every policy, no index, straight from the documented precedence."""
    user_groups = frozenset(g for g, members in policy_set.groups.items() if claims.user in members)
    facts = DeviceFacts(claims, user_groups)
    best = Action.ALLOW
    for policy in policy_set.policies:
        if policy.state is not PolicyState.ENFORCE:
            continue
        phase = policy.phase_at(now)
        if phase is None or not policy.applies_to(facts, access):
            continue
        if policy.exempt.covers(facts):
            continue
        action = policy.action if phase is Phase.ENFORCE else min(policy.action, Action.WARN)
        best = max(best, action)
    return best


@settings(deadline=None, max_examples=200)
@given(policy_sets(), devices(), moments)
def test_most_severe_action_wins_as_in_the_reference(
    policy_set: PolicySet, claims: DeviceClaims, now: datetime
) -> None:
    compiled = compile_policy_set(policy_set)
    for access in Access:
        decision = decide(compiled, claims, now, access)
        assert decision.action is reference_action(policy_set, claims, now, access)
        assert all(m.action <= decision.action for m in decision.matches)


@settings(deadline=None)
@given(policy_sets(), devices(), moments, st.sampled_from(list(Access)), st.data())
def test_policies_narrowed_to_the_other_access_never_change_a_decision(
    policy_set: PolicySet, claims: DeviceClaims, now: datetime, access: Access, data: st.DataObject
) -> None:
    """A send-only policy does not affect sync decisions, and a sync-only one send decisions."""
    other = Access.SYNC if access is Access.SEND else Access.SEND
    count = data.draw(st.integers(1, 4))
    extra = tuple(
        replace(data.draw(policies(60 + i)), access=frozenset({other})) for i in range(count)
    )
    before = decide(compile_policy_set(policy_set), claims, now, access)
    after = decide(
        compile_policy_set(PolicySet(policy_set.policies + extra, "v", GROUPS)), claims, now, access
    )
    assert after == before


@settings(deadline=None)
@given(policy_sets(), devices(), moments)
def test_policies_that_do_not_narrow_access_decide_sending_and_syncing_alike(
    policy_set: PolicySet, claims: DeviceClaims, now: datetime
) -> None:
    both = PolicySet(tuple(replace(p, access=ALL_ACCESS) for p in policy_set.policies), "v", GROUPS)
    compiled = compile_policy_set(both)
    assert not compiled.narrowed
    assert decide(compiled, claims, now, Access.SYNC) == decide(compiled, claims, now, Access.SEND)


@settings(deadline=None)
@given(policy_sets(), devices(), moments, st.data())
def test_an_exemption_beats_the_policy_it_exempts(
    policy_set: PolicySet, claims: DeviceClaims, now: datetime, data: st.DataObject
) -> None:
    if not policy_set.policies:
        return
    target = data.draw(st.sampled_from(policy_set.policies))
    how = data.draw(st.sampled_from(["user", "device"]))
    exempt = (
        replace(target.exempt, users=target.exempt.users | {claims.user})
        if how == "user"
        else replace(target.exempt, device_ids=target.exempt.device_ids | {claims.device.id})
    )
    changed = PolicySet(
        tuple(replace(p, exempt=exempt) if p.id == target.id else p for p in policy_set.policies),
        "v",
        GROUPS,
    )
    decision = decide(compile_policy_set(changed), claims, now)
    assert target.id not in {m.policy_id for m in (*decision.matches, *decision.audit)}


@settings(deadline=None)
@given(policy_sets(), devices(), moments, st.lists(st.integers(0, 100), max_size=4), st.data())
def test_draft_and_retracted_policies_never_change_a_decision(
    policy_set: PolicySet,
    claims: DeviceClaims,
    now: datetime,
    seeds: list[int],
    data: st.DataObject,
) -> None:
    before = decide(compile_policy_set(policy_set), claims, now)
    extra = tuple(
        replace(
            data.draw(policies(50 + i)),
            state=data.draw(st.sampled_from([PolicyState.DRAFT, PolicyState.RETRACTED])),
        )
        for i, _ in enumerate(seeds)
    )
    after = decide(
        compile_policy_set(PolicySet(policy_set.policies + extra, "v", GROUPS)), claims, now
    )
    assert after == before


@settings(deadline=None)
@given(policy_sets(), devices(), moments, st.randoms())
def test_same_input_same_decision_whatever_the_file_order(
    policy_set: PolicySet, claims: DeviceClaims, now: datetime, rng: random.Random
) -> None:
    first = decide(compile_policy_set(policy_set), claims, now)
    assert decide(compile_policy_set(policy_set), claims, now) == first
    shuffled = list(policy_set.policies)
    rng.shuffle(shuffled)
    assert decide(compile_policy_set(PolicySet(tuple(shuffled), "v", GROUPS)), claims, now) == first
