"""The evaluator: a pure function of (compiled policy set, verified claims, now) -> Decision.

Precedence (documented in docs/policies.md):
1. Draft and retracted policies are ignored, and so are policies whose ``scope.access``
   leaves out the access being decided (sending or syncing).
2. A policy applies when its scope and match conditions all hold and its phase at ``now``
   is announce (contributes WARN) or enforce (contributes its action).
3. An exemption (user, group or device id) removes that policy, and only that policy.
4. Audit-state policies are evaluated and reported, never acted on.
5. Staged rollout and grace (``rollout``, ``grace_hours``): an enforcing policy that leaves
   this device out of its current rollout stage, or whose grace period for this device
   (from ``first_seen``, the time the device was first seen matching it) has not run out,
   contributes as in its announce phase (WARN), and the match says why.
6. The most severe contribution wins (reject > hold > defer > warn > allow); ties are
   broken by policy id so the same input always gives the same decision and message.

Cost: every policy is filed under one "anchor" that a device must have for the policy to
apply (a device id, a user, an app, a group, or a platform). A decision looks up only the
device's own keys, so a 200-app token against 10,000 app bans costs a set intersection
and a handful of full checks, not 2,000,000 comparisons. Policies with no anchor at all
(say, "posture.jailbroken = true" on every platform) are checked for every device:
their cost is linear, which is fine for the dozens an organisation writes.
The index is shared by both accesses: a candidate narrowed to the other access is skipped
with one attribute test before anything else is looked at.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from gateway.domain import (
    NO_OVERRIDES,
    Access,
    Action,
    Decision,
    DeviceClaims,
    Overrides,
    Phase,
    PolicyMatch,
    PolicyState,
)
from gateway.policy.model import Conditions, DeviceFacts, Policy, PolicySet
from gateway.policy.versions import Version

# A policy's anchor as the tables use it: (kind, keys, OS ceiling of a platform policy).
_Anchor = tuple[str, tuple[str, ...], tuple[Version, bool] | None]


def _anchor(policy: Policy) -> tuple[str, tuple[str, ...]]:
    """The most selective key set a device must hit for this policy to apply at all."""
    candidates = []
    for conditions in (policy.match, policy.scope):
        if conditions.device_ids is not None:
            candidates.append((0, "device", conditions.device_ids))
        if conditions.users is not None:
            candidates.append((1, "user", conditions.users))
        if conditions.apps_all is not None:
            candidates.append((2, "app", frozenset([min(conditions.apps_all)])))
        if conditions.apps_any is not None:
            candidates.append((3, "app", conditions.apps_any))
        if conditions.groups is not None:
            candidates.append((4, "group", conditions.groups))
        if conditions.platforms is not None:
            candidates.append((5, "platform", frozenset(p.value for p in conditions.platforms)))
    if not candidates:
        return "any", ()
    _, kind, keys = min(candidates, key=lambda c: (c[0], len(c[2])))
    return kind, tuple(sorted(keys))


def _os_ceiling(policy: Policy) -> tuple[Version, bool] | None:
    """For an "OS below X" policy (one clause, < or <=), the bound and whether it is inclusive."""
    ranges = [c.os_version for c in (policy.match, policy.scope) if c.os_version is not None]
    if len(ranges) != 1 or len(ranges[0].clauses) != 1:
        return None
    operator, bound = ranges[0].clauses[0]
    if operator not in ("<", "<="):
        return None
    return bound, operator == "<="


@dataclass(frozen=True)
class OsCeilings:
    """Per platform, "OS below X" policies sorted by X: a device finds the ones its
    version can still meet with a bisect instead of checking them all."""

    strict_bounds: tuple[Version, ...]  # os_version < bound
    strict_positions: tuple[int, ...]
    inclusive_bounds: tuple[Version, ...]  # os_version <= bound
    inclusive_positions: tuple[int, ...]

    @classmethod
    def build(cls, entries: list[tuple[Version, bool, int]]) -> OsCeilings:
        strict = sorted((b, p) for b, inclusive, p in entries if not inclusive)
        inclusive = sorted((b, p) for b, inclusive, p in entries if inclusive)
        return cls(
            tuple(b for b, _ in strict),
            tuple(p for _, p in strict),
            tuple(b for b, _ in inclusive),
            tuple(p for _, p in inclusive),
        )

    def admitting(self, version: Version) -> tuple[int, ...]:
        return (
            self.strict_positions[bisect_right(self.strict_bounds, version) :]
            + self.inclusive_positions[bisect_left(self.inclusive_bounds, version) :]
        )


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy ready for evaluation: its checks flattened, its messages rendered."""

    policy: Policy
    checks: tuple[Callable[[DeviceFacts], bool], ...]
    announce_message: str
    is_audit: bool
    for_send: bool
    for_sync: bool
    gated: bool  # has a rollout or a grace period: enforcement depends on the device

    @classmethod
    def of(cls, policy: Policy) -> CompiledPolicy:
        return cls(
            policy=policy,
            checks=policy.scope.checks + policy.match.checks,
            announce_message=policy.message_for(Phase.ANNOUNCE),
            is_audit=policy.state is PolicyState.AUDIT,
            for_send=Access.SEND in policy.access,
            for_sync=Access.SYNC in policy.access,
            gated=policy.rollout is not None or policy.grace is not None,
        )


@dataclass(frozen=True)
class CompiledPolicySet:
    """A PolicySet with the lookup tables that make a decision cheap. Immutable once built."""

    source: PolicySet
    by_device: dict[str, tuple[int, ...]]
    by_user: dict[str, tuple[int, ...]]
    by_app: dict[str, tuple[int, ...]]
    by_group: dict[str, tuple[int, ...]]
    by_platform: dict[str, tuple[int, ...]]
    os_ceilings: dict[str, OsCeilings]
    unanchored: tuple[int, ...]
    app_keys: frozenset[str]
    active: tuple[CompiledPolicy, ...]
    groups_by_user: dict[str, frozenset[str]]
    # Some active policy gates only sending or only syncing, so a device's send and sync
    # decisions can differ (an impact preview decides both only then).
    narrowed: bool
    # Parallel to ``active``: each policy's anchor (kind, keys, OS ceiling), kept so that
    # the next compile can reuse it (compile_policy_set's ``previous``).
    anchors: tuple[_Anchor, ...] = ()

    @property
    def version(self) -> str:
        return self.source.version

    def candidates(self, facts: DeviceFacts) -> set[int]:
        """Positions of the policies that can apply; unordered (decide() sorts its result)."""
        claims, user_groups = facts.claims, facts.groups
        found: set[int] = set(self.unanchored)
        platform = claims.device.platform.value
        hit = self.by_platform.get(platform)
        if hit:
            found.update(hit)
        ceilings = self.os_ceilings.get(platform)
        if ceilings is not None and (version := facts.os_version) is not None:
            found.update(ceilings.admitting(version))
        hit = self.by_device.get(claims.device.id)
        if hit:
            found.update(hit)
        hit = self.by_user.get(claims.user)
        if hit:
            found.update(hit)
        for group in user_groups:
            hit = self.by_group.get(group)
            if hit:
                found.update(hit)
        for app in self.app_keys.intersection(claims.apps):
            found.update(self.by_app[app])
        return found


def compile_policy_set(
    policy_set: PolicySet, previous: CompiledPolicySet | None = None
) -> CompiledPolicySet:
    """Build the lookup tables. With ``previous``, a policy that is the very same object
    as one compiled there (a file the parse cache did not parse again) reuses its compiled
    form and anchor; and when only a run of policies changed in place (a one-file edit
    that keeps the number of active policies), the previous tables are patched rather
    than rebuilt: a one-file reload of 100,000 policies then costs about as much as the
    file. The result is the same as compiling from scratch either way."""
    if previous is not None and len(previous.anchors) == len(previous.active):
        patched = _patched(previous, policy_set)
        if patched is not None:
            return patched
    tables: dict[str, defaultdict[str, list[int]]] = {
        kind: defaultdict(list) for kind in ("device", "user", "app", "group", "platform")
    }
    unanchored = []
    ceilings: defaultdict[str, list[tuple[Version, bool, int]]] = defaultdict(list)
    reusable: dict[int, tuple[CompiledPolicy, _Anchor]] = {}
    if previous is not None and len(previous.anchors) == len(previous.active):
        reusable = {
            id(entry.policy): (entry, anchor)
            for entry, anchor in zip(previous.active, previous.anchors, strict=True)
        }
    entries: list[CompiledPolicy] = []
    anchors: list[_Anchor] = []
    for policy in policy_set.policies:
        if not policy.is_active:
            continue
        found = reusable.get(id(policy))
        if found is not None and found[0].policy is policy:
            entry, anchor = found
        else:
            kind, keys = _anchor(policy)
            entry = CompiledPolicy.of(policy)
            anchor = (kind, keys, _os_ceiling(policy) if kind == "platform" else None)
        position = len(entries)
        entries.append(entry)
        anchors.append(anchor)
        kind, keys, ceiling = anchor
        if kind == "any":
            unanchored.append(position)
        for key in keys:
            if ceiling is not None:
                ceilings[key].append((*ceiling, position))
            else:
                tables[kind][key].append(position)
    groups_by_user: defaultdict[str, set[str]] = defaultdict(set)
    for group, members in policy_set.groups.items():
        for member in members:
            groups_by_user[member].add(group)

    def freeze(table: defaultdict[str, list[int]]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in table.items()}

    by_app = freeze(tables["app"])
    return CompiledPolicySet(
        source=policy_set,
        by_device=freeze(tables["device"]),
        by_user=freeze(tables["user"]),
        by_app=by_app,
        by_group=freeze(tables["group"]),
        by_platform=freeze(tables["platform"]),
        os_ceilings={platform: OsCeilings.build(entries) for platform, entries in ceilings.items()},
        unanchored=tuple(unanchored),
        app_keys=frozenset(by_app),
        active=tuple(entries),
        anchors=tuple(anchors),
        groups_by_user={u: frozenset(g) for u, g in groups_by_user.items()},
        narrowed=any(entry.policy.is_narrowed for entry in entries),
    )


_TABLES = {
    "device": "by_device",
    "user": "by_user",
    "app": "by_app",
    "group": "by_group",
}
PATCH_LIMIT = 10_000  # changed policies beyond which a full compile is as quick


def _patched(previous: CompiledPolicySet, policy_set: PolicySet) -> CompiledPolicySet | None:
    """``previous`` with one run of policies replaced in place, or None when the change is
    not of that shape: the number of active policies moved (positions after it would all
    shift), or the run holds platform or unanchored policies (their tables are rebuilt)."""
    old, new = previous.source.policies, policy_set.policies
    shortest = min(len(old), len(new))
    head = 0
    while head < shortest and old[head] is new[head]:
        head += 1
    tail = 0
    while tail < shortest - head and old[-1 - tail] is new[-1 - tail]:
        tail += 1
    old_run = [p for p in old[head : len(old) - tail] if p.is_active]
    new_run = [p for p in new[head : len(new) - tail] if p.is_active]
    if len(old_run) != len(new_run) or len(new_run) > PATCH_LIMIT:
        return None
    if head <= len(old) // 2:
        start = sum(1 for p in old[:head] if p.is_active)
    else:
        start = (
            len(previous.active)
            - len(old_run)
            - sum(1 for p in old[len(old) - tail :] if p.is_active)
        )
    end = start + len(old_run)
    old_anchors = previous.anchors[start:end]
    kept = {
        id(entry.policy): (entry, anchor)
        for entry, anchor in zip(previous.active[start:end], old_anchors, strict=True)
    }
    new_entries: list[CompiledPolicy] = []
    new_anchors: list[_Anchor] = []
    for policy in new_run:
        found = kept.get(id(policy))
        if found is not None and found[0].policy is policy:
            entry, anchor = found
        else:
            kind, keys = _anchor(policy)
            entry, anchor = CompiledPolicy.of(policy), (kind, keys, None)
        new_entries.append(entry)
        new_anchors.append(anchor)
    if any(kind not in _TABLES for kind, _, _ in (*old_anchors, *new_anchors)):
        return None
    tables = {kind: dict(getattr(previous, attr)) for kind, attr in _TABLES.items()}
    for offset, (kind, keys, _) in enumerate(old_anchors):
        table, position = tables[kind], start + offset
        for key in keys:
            rest = tuple(p for p in table[key] if p != position)
            if rest:
                table[key] = rest
            else:
                del table[key]
    for offset, (kind, keys, _) in enumerate(new_anchors):
        table, position = tables[kind], start + offset
        for key in keys:
            table[key] = tuple(sorted((*table.get(key, ()), position)))
    active = previous.active[:start] + tuple(new_entries) + previous.active[end:]
    groups_by_user: defaultdict[str, set[str]] = defaultdict(set)
    for group, members in policy_set.groups.items():
        for member in members:
            groups_by_user[member].add(group)
    return CompiledPolicySet(
        source=policy_set,
        by_device=tables["device"],
        by_user=tables["user"],
        by_app=tables["app"],
        by_group=tables["group"],
        by_platform=previous.by_platform,
        os_ceilings=previous.os_ceilings,
        unanchored=previous.unanchored,
        app_keys=frozenset(tables["app"]),
        active=active,
        anchors=previous.anchors[:start] + tuple(new_anchors) + previous.anchors[end:],
        groups_by_user={u: frozenset(g) for u, g in groups_by_user.items()},
        narrowed=_still_narrowed(previous.narrowed, old_run, new_run, active),
    )


def _still_narrowed(
    before: bool, old_run: list[Policy], new_run: list[Policy], active: tuple[CompiledPolicy, ...]
) -> bool:
    if any(p.is_narrowed for p in new_run):
        return True
    if before and any(p.is_narrowed for p in old_run):  # maybe the only one: look again
        return any(entry.policy.is_narrowed for entry in active)
    return before


def _contribution(policy: Policy, phase: Phase) -> Action:
    if phase is Phase.ANNOUNCE:
        return Action.WARN if policy.action > Action.ALLOW else Action.ALLOW
    return policy.action


def decide(
    compiled: CompiledPolicySet,
    claims: DeviceClaims,
    now: datetime,
    access: Access = Access.SEND,
    first_seen: Mapping[str, datetime] | None = None,
    overrides: Overrides = NO_OVERRIDES,
) -> Decision:
    """The one decision for this device at ``now``: for a message it sends, or for a login
    that syncs its mail (``access``). ``first_seen``: per policy id, when this device was
    first seen matching it (only policies with ``grace_hours`` ask); a policy missing from it
    counts from ``now`` and is listed in the decision's ``first_seen_needed``.
    ``overrides``: suspended policies contribute nothing and break-glass exemptions exempt
    their one user or device; both are named in the decision's ``overridden``."""
    user_groups = compiled.groups_by_user.get(claims.user, frozenset())
    facts = DeviceFacts(claims, user_groups)
    in_force: list[PolicyMatch] = []
    audit: list[PolicyMatch] = []
    exempted: list[str] = []
    needed: list[str] = []
    overridden: list[str] = []
    subjects = (f"user:{claims.user}", f"device:{claims.device.id}")
    sync = access is Access.SYNC
    for position in compiled.candidates(facts):
        entry = compiled.active[position]
        if not (entry.for_sync if sync else entry.for_send):
            continue  # scope.access leaves this access out
        policy = entry.policy
        phase = policy.phase_at(now)
        if phase is None:
            continue
        for check in entry.checks:
            if not check(facts):
                break
        else:
            if overrides:
                reason = _overridden(policy.id, subjects, overrides)
                if reason is not None:
                    overridden.append(f"{policy.id}: {reason}")
                    continue
            if entry.gated and not entry.policy.exempt.covers(facts):
                _record_gated(entry, phase, facts, now, first_seen or {}, needed, in_force, audit)
            else:
                _record(entry, phase, facts, in_force, audit, exempted)
    decision = _conclude(compiled.version, in_force, audit, exempted)
    if overridden:
        decision = replace(decision, overridden=tuple(sorted(overridden)))
    if needed:
        return replace(decision, first_seen_needed=tuple(sorted(needed)))
    return decision


def _overridden(policy_id: str, subjects: tuple[str, str], overrides: Overrides) -> str | None:
    if policy_id in overrides.suspended:
        return "suspended"
    for subject in subjects:
        if (policy_id, subject) in overrides.exempt:
            return f"break-glass exemption for {subject}"
    return None


def _record_gated(
    entry: CompiledPolicy,
    phase: Phase,
    facts: DeviceFacts,
    now: datetime,
    first_seen: Mapping[str, datetime],
    needed: list[str],
    in_force: list[PolicyMatch],
    audit: list[PolicyMatch],
) -> None:
    """A policy with a rollout or a grace period applies (not exempted): enforce it only on
    devices in its current stage and past their own deadline; warn the others."""
    policy = entry.policy
    deadline = None
    if policy.grace is not None:
        seen = first_seen.get(policy.id)
        if seen is None:
            needed.append(policy.id)
            seen = now
        deadline = seen + policy.grace
        if policy.enforce_at is not None and policy.enforce_at > deadline:
            deadline = policy.enforce_at
        if now >= deadline:
            deadline = None  # past it: nothing to show
    outside = (
        phase is Phase.ENFORCE
        and policy.rollout is not None
        and not policy.rollout.includes(facts.claims.device.id, policy.id, facts.groups, now)
    )
    if phase is Phase.ENFORCE and deadline is None and not outside:
        action, message = policy.action, policy.message
    else:
        action = _contribution(policy, Phase.ANNOUNCE)
        if deadline is not None:
            message = f"{policy.message} (enforced on this device from {deadline.isoformat()})"
        elif outside:
            message = f"{policy.message} (not yet enforced on this device: staged rollout)"
        else:
            message = entry.announce_message
        phase = Phase.ANNOUNCE
    if action is Action.ALLOW:
        return
    match = PolicyMatch(policy.id, action, phase, message, outside, deadline)
    (audit if entry.is_audit else in_force).append(match)


def _record(
    entry: CompiledPolicy,
    phase: Phase,
    facts: DeviceFacts,
    in_force: list[PolicyMatch],
    audit: list[PolicyMatch],
    exempted: list[str],
) -> None:
    """A policy applies: note what it contributes (or that it exempts this device)."""
    policy = entry.policy
    if policy.exempt.covers(facts):
        exempted.append(policy.id)
        return
    action = _contribution(policy, phase)
    if action is Action.ALLOW:
        return
    message = entry.announce_message if phase is Phase.ANNOUNCE else policy.message
    match = PolicyMatch(policy.id, action, phase, message)
    (audit if entry.is_audit else in_force).append(match)


def _conclude(
    version: str, in_force: list[PolicyMatch], audit: list[PolicyMatch], exempted: list[str]
) -> Decision:
    # Most severe first; ties by policy id, so the winner and its message are deterministic.
    in_force.sort(key=lambda m: (-m.action, m.policy_id))
    audit.sort(key=lambda m: (-m.action, m.policy_id))
    if not in_force:
        return Decision(
            action=Action.ALLOW,
            phase=None,
            message="",
            policy_version=version,
            audit=tuple(audit),
            exempted=tuple(sorted(exempted)),
        )
    winner = in_force[0]
    return Decision(
        action=winner.action,
        phase=winner.phase,
        message=winner.message,
        policy_version=version,
        matches=tuple(in_force),
        audit=tuple(audit),
        exempted=tuple(sorted(exempted)),
    )


__all__ = ["CompiledPolicySet", "Conditions", "compile_policy_set", "decide"]
