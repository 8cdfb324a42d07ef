"""Impact of a policy change over the devices seen recently. Pure: no I/O, time passed in.

For each device in the inventory, decide under the live set and under the candidate
set, and classify the change: newly warned, deferred, held or rejected, or released
(blocked before, not any more). This is the check that would have caught "sent in error":
run it before a ban is enforced, and let the reload guard refuse a change that would
newly block more devices than configured, unless the change says it knows
(``confirm_impact = N``).

Access: a policy narrowed by ``scope.access`` changes only the decisions of devices that
do that (a send-only ban counts devices that send), so each device is decided for each
access it uses (``accesses_of``: the inventory's record of its last send and last sync),
and a change row says for which access(es) it holds. Without ``accesses_of`` every
device counts as doing both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from gateway.domain import NO_OVERRIDES, Access, Action, DeviceClaims, Overrides
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet, decide
from gateway.policy.model import DeviceFacts

BLOCKING = (Action.DEFER, Action.HOLD, Action.REJECT)


@dataclass(frozen=True)
class DeviceChange:
    device_id: str
    user: str
    before: Action
    after: Action
    policy_ids: tuple[str, ...]
    # The accesses (send, sync) whose decision went from ``before`` to ``after``.
    access: tuple[Access, ...] = tuple(Access)


@dataclass(frozen=True)
class ImpactReport:
    devices: int
    changes: tuple[DeviceChange, ...] = field(default_factory=tuple)

    def newly(self, action: Action) -> list[DeviceChange]:
        return [c for c in self.changes if c.after is action and c.before < action]

    @property
    def newly_blocked(self) -> list[DeviceChange]:
        """Changes that newly hold or reject a device's sending or syncing."""
        return [
            c
            for c in self.changes
            if c.after in (Action.HOLD, Action.REJECT) and c.before not in BLOCKING
        ]

    @property
    def newly_blocked_devices(self) -> int:
        """Distinct devices newly held or rejected, for sending, syncing or both."""
        return len({c.device_id for c in self.newly_blocked})

    @property
    def released(self) -> list[DeviceChange]:
        return [c for c in self.changes if c.before in BLOCKING and c.after not in BLOCKING]

    def as_dict(self) -> dict[str, object]:
        def rows(changes: list[DeviceChange]) -> list[dict[str, object]]:
            return [
                {"device_id": c.device_id, "user": c.user, "before": c.before.label, "after": c.after.label,
                 "policy_ids": list(c.policy_ids), "access": [a.value for a in c.access]}
                for c in changes
            ]  # fmt: skip

        return {
            "devices_considered": self.devices,
            "newly_warned": rows(self.newly(Action.WARN)),
            "newly_deferred": rows(self.newly(Action.DEFER)),
            "newly_held": rows(self.newly(Action.HOLD)),
            "newly_rejected": rows(self.newly(Action.REJECT)),
            "released": rows(self.released),
            "newly_blocked_devices": self.newly_blocked_devices,
        }


def every_access(claims: DeviceClaims) -> frozenset[Access]:
    """What the inventory can say today: nothing, so a device counts as sending and syncing."""
    return frozenset(Access)


def assess(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    devices: Iterable[DeviceClaims],
    now: datetime,
    accesses_of: Callable[[DeviceClaims], Iterable[Access]] = every_access,
    overrides: tuple[Overrides, Overrides] = (NO_OVERRIDES, NO_OVERRIDES),
) -> ImpactReport:
    """Decide every device under both sets, for each access it uses (``accesses_of``);
    ``overrides``: the operator overrides with each set (before, after)."""
    over_live, over_candidate = overrides
    # Without a narrowed policy on either side, send and sync decide alike: decide once.
    alike = not (live.narrowed or candidate.narrowed)
    changes = []
    count = 0
    for claims in devices:
        count += 1
        uses = set(accesses_of(claims))
        accesses = tuple(a for a in Access if a in uses)
        if not accesses:
            continue
        if alike:
            before = decide(live, claims, now, overrides=over_live)
            after = decide(candidate, claims, now, overrides=over_candidate)
            if before.action is not after.action:
                ids = after.policy_ids or before.policy_ids
                changes.append(
                    DeviceChange(
                        claims.device.id, claims.subject, before.action, after.action, ids, accesses
                    )
                )
            continue
        changes.extend(_changes_by_access(live, candidate, claims, now, accesses, overrides))
    return ImpactReport(count, tuple(changes))


def _changes_by_access(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    claims: DeviceClaims,
    now: datetime,
    accesses: tuple[Access, ...],
    overrides: tuple[Overrides, Overrides] = (NO_OVERRIDES, NO_OVERRIDES),
) -> list[DeviceChange]:
    """One row per distinct (before, after) of this device, naming the accesses it holds for."""
    rows: dict[tuple[Action, Action], tuple[list[Access], set[str]]] = {}
    for access in accesses:
        before = decide(live, claims, now, access, overrides=overrides[0])
        after = decide(candidate, claims, now, access, overrides=overrides[1])
        if before.action is after.action:
            continue
        found, ids = rows.setdefault((before.action, after.action), ([], set()))
        found.append(access)
        ids.update(after.policy_ids or before.policy_ids)
    return [
        DeviceChange(
            claims.device.id, claims.subject, before, after, tuple(sorted(ids)), tuple(found)
        )
        for (before, after), (found, ids) in rows.items()
    ]


@dataclass(frozen=True)
class StageReport:
    """One stage of a policy's staged rollout over the inventory: of the ``matching``
    devices (the policy applies, no exemption), how many it enforces on from ``at`` (the
    stages reached by then, cumulative). ``current``: the stage in force at the preview's
    time."""

    policy_id: str
    stage: str
    at: datetime | None
    enforced: int
    matching: int
    current: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "policy_id": self.policy_id,
            "stage": self.stage,
            "at": self.at.isoformat() if self.at else None,
            "enforced": self.enforced,
            "matching": self.matching,
            "current": self.current,
        }


def rollout_stages(
    compiled: CompiledPolicySet, devices: Iterable[DeviceClaims], now: datetime
) -> list[StageReport]:
    """Each stage of each active policy with a rollout: whom it enforces on, in the inventory."""
    staged = [p for p in compiled.source.policies if p.is_active and p.rollout is not None]
    if not staged:
        return []
    matching: dict[str, list[DeviceFacts]] = {p.id: [] for p in staged}
    for claims in devices:
        facts = DeviceFacts(claims, compiled.groups_by_user.get(claims.user, frozenset()))
        for policy in staged:
            if not policy.exempt.covers(facts) and any(
                policy.applies_to(facts, access) for access in policy.access
            ):
                matching[policy.id].append(facts)
    reports = []
    for policy in staged:
        assert policy.rollout is not None
        current = policy.rollout.current(now)
        for stage in policy.rollout.stages:
            at = stage.at or now
            enforced = sum(
                policy.rollout.includes(f.claims.device.id, policy.id, f.groups, at)
                for f in matching[policy.id]
            )
            reports.append(
                StageReport(
                    policy.id, str(stage), stage.at, enforced, len(matching[policy.id]),
                    stage is current,
                )
            )  # fmt: skip
    return reports


def confirmed_impact(candidate: CompiledPolicySet, diff: PolicyDiff) -> int:
    """The largest confirm_impact among the policies this change adds or changes."""
    touched = set(diff.added) | set(diff.changed)
    return max(
        (p.confirm_impact or 0 for p in candidate.source.policies if p.id in touched), default=0
    )


def blast_radius_refusal(
    report: ImpactReport, candidate: CompiledPolicySet, diff: PolicyDiff, limit: int | None
) -> str | None:
    """The blast-radius rule, the one place it is stated: a change that would newly hold or
    reject more than ``limit`` devices (per ``report``, from :func:`assess`) is refused
    unless a policy it adds or changes (``diff``) says ``confirm_impact`` of at least that
    many. None: the change may go ahead. Used by the reload guard and `gateway impact`."""
    if limit is None:
        return None
    blocked = report.newly_blocked_devices
    if blocked <= limit or confirmed_impact(candidate, diff) >= blocked:
        return None
    return (
        f"this change would newly hold or reject {blocked} devices (limit {limit}); "
        f"check with `gateway impact`, then set confirm_impact = {blocked} on the changed policy"
    )
