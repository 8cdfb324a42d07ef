"""The evaluator: a pure function of (compiled policy set, verified claims, now) -> Decision.

Precedence (documented in docs/policies.md):
1. Draft and retracted policies are ignored.
2. A policy applies when its scope and match conditions all hold and its phase at ``now``
   is announce (contributes WARN) or enforce (contributes its action).
3. An exemption (user, group or device id) removes that policy, and only that policy.
4. Audit-state policies are evaluated and reported, never acted on.
5. The most severe contribution wins (reject > hold > defer > warn > allow); ties are
   broken by policy id so the same input always gives the same decision and message.

Cost: every policy is filed under one "anchor" that a device must have for the policy to
apply (a device id, a user, a group, or one of its apps). A decision looks up only the
device's own keys, so a 200-app token against 10,000 app bans costs a set intersection
and a handful of full checks, not 2,000,000 comparisons.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gateway.domain import Action, Decision, DeviceClaims, Phase, PolicyMatch, PolicyState
from gateway.policy.model import Conditions, Policy, PolicySet


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
    if not candidates:
        return "any", ()
    _, kind, keys = min(candidates, key=lambda c: (c[0], len(c[2])))
    return kind, tuple(sorted(keys))


@dataclass(frozen=True)
class CompiledPolicySet:
    """A PolicySet with the lookup tables that make a decision cheap. Immutable once built."""

    source: PolicySet
    by_device: dict[str, tuple[int, ...]]
    by_user: dict[str, tuple[int, ...]]
    by_app: dict[str, tuple[int, ...]]
    by_group: dict[str, tuple[int, ...]]
    unanchored: tuple[int, ...]
    app_keys: frozenset[str]
    active: tuple[Policy, ...]
    groups_by_user: dict[str, frozenset[str]]

    @property
    def version(self) -> str:
        return self.source.version

    def candidates(self, claims: DeviceClaims, user_groups: frozenset[str]) -> list[int]:
        found: set[int] = set(self.unanchored)
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
        return sorted(found)


def compile_policy_set(policy_set: PolicySet) -> CompiledPolicySet:
    tables: dict[str, defaultdict[str, list[int]]] = {
        kind: defaultdict(list) for kind in ("device", "user", "app", "group")
    }
    unanchored = []
    active = tuple(p for p in policy_set.policies if p.is_active)
    for position, policy in enumerate(active):
        kind, keys = _anchor(policy)
        if kind == "any":
            unanchored.append(position)
        for key in keys:
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
        unanchored=tuple(unanchored),
        app_keys=frozenset(by_app),
        active=active,
        groups_by_user={u: frozenset(g) for u, g in groups_by_user.items()},
    )


def _contribution(policy: Policy, phase: Phase) -> Action:
    if phase is Phase.ANNOUNCE:
        return Action.WARN if policy.action > Action.ALLOW else Action.ALLOW
    return policy.action


def _strongest(matches: Iterable[PolicyMatch]) -> PolicyMatch | None:
    best: PolicyMatch | None = None
    for match in matches:
        if best is None or match.action > best.action or (
            match.action == best.action and match.policy_id < best.policy_id
        ):
            best = match
    return best


def decide(compiled: CompiledPolicySet, claims: DeviceClaims, now: datetime) -> Decision:
    """The one decision for a message from this device at ``now``."""
    user_groups = compiled.groups_by_user.get(claims.user, frozenset())
    in_force: list[PolicyMatch] = []
    audit: list[PolicyMatch] = []
    exempted: list[str] = []
    for position in compiled.candidates(claims, user_groups):
        policy = compiled.active[position]
        phase = policy.phase_at(now)
        if phase is None or not policy.applies_to(claims, user_groups):
            continue
        if policy.exempt.covers(claims, user_groups):
            exempted.append(policy.id)
            continue
        action = _contribution(policy, phase)
        if action is Action.ALLOW:
            continue
        match = PolicyMatch(policy.id, action, phase, policy.message_for(phase))
        (audit if policy.state is PolicyState.AUDIT else in_force).append(match)
    in_force.sort(key=lambda m: (-m.action, m.policy_id))
    audit.sort(key=lambda m: (-m.action, m.policy_id))
    winner = _strongest(in_force)
    if winner is None:
        return Decision(
            action=Action.ALLOW,
            phase=None,
            message="",
            policy_version=compiled.version,
            audit=tuple(audit),
            exempted=tuple(sorted(exempted)),
        )
    return Decision(
        action=winner.action,
        phase=winner.phase,
        message=winner.message,
        policy_version=compiled.version,
        matches=tuple(in_force),
        audit=tuple(audit),
        exempted=tuple(sorted(exempted)),
    )


__all__ = ["CompiledPolicySet", "Conditions", "compile_policy_set", "decide"]
