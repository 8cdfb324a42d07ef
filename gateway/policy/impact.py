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

Who is told: :func:`announcements` is who a warning policy tells at once (the gateway's
announcer sends exactly these), and :func:`who_is_told` is what a change would send:
the announcement to devices it newly warns and that were not told before, the
"disregard" notice to every device told about a policy it retracts or deletes.

Operator overrides (suspensions, break-glass exemptions) count everywhere: a suspended
policy blocks, warns and tells nobody; an exempted user or device is not counted for it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from gateway.domain import (
    NO_OVERRIDES,
    Access,
    Action,
    DeviceClaims,
    Overrides,
    Phase,
    PolicyState,
)
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet, decide
from gateway.policy.model import DeviceFacts, Policy

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
    time. ``suspended``: an operator suspended the policy, so it enforces on nobody now
    (``enforced`` counts as if it were not: what resuming it would do)."""

    policy_id: str
    stage: str
    at: datetime | None
    enforced: int
    matching: int
    current: bool
    suspended: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "policy_id": self.policy_id,
            "stage": self.stage,
            "at": self.at.isoformat() if self.at else None,
            "enforced": self.enforced,
            "matching": self.matching,
            "current": self.current,
            "suspended": self.suspended,
        }


def rollout_stages(
    compiled: CompiledPolicySet,
    devices: Iterable[DeviceClaims],
    now: datetime,
    overrides: Overrides = NO_OVERRIDES,
) -> list[StageReport]:
    """Each stage of each active policy with a rollout: whom it enforces on, in the
    inventory (a device with a break-glass exemption from the policy does not match)."""
    staged = [p for p in compiled.source.policies if p.is_active and p.rollout is not None]
    if not staged:
        return []
    matching: dict[str, list[DeviceFacts]] = {p.id: [] for p in staged}
    for claims in devices:
        facts = DeviceFacts(claims, compiled.groups_by_user.get(claims.user, frozenset()))
        for policy in staged:
            subjects = (f"user:{claims.user}", f"device:{claims.device.id}")
            if any((policy.id, s) in overrides.exempt for s in subjects):
                continue
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
                    stage is current, policy.id in overrides.suspended,
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


@dataclass(frozen=True)
class Announcement:
    """A warning a policy gives a device at once (its announce phase, or left out of a
    rollout stage or in its grace period), with the policy's message."""

    user: str
    device_id: str
    policy_id: str
    message: str


def warning_policies(
    compiled: CompiledPolicySet, now: datetime, overrides: Overrides = NO_OVERRIDES
) -> list[Policy]:
    """Enforce-state policies that can warn a device at ``now``: in their announce phase,
    or enforcing with a rollout or a grace period (devices left out are warned). Not a
    policy an operator suspended."""
    found = []
    for policy in compiled.source.policies:
        if policy.state is not PolicyState.ENFORCE or policy.action <= Action.WARN:
            continue
        if policy.id in overrides.suspended:
            continue
        phase = policy.phase_at(now)
        if phase is Phase.ANNOUNCE or (
            phase is Phase.ENFORCE and (policy.rollout is not None or policy.grace is not None)
        ):
            found.append(policy)
    return found


def announcements(
    compiled: CompiledPolicySet,
    policy_ids: Iterable[str],
    devices: Iterable[DeviceClaims],
    now: datetime,
    accesses_of: Callable[[DeviceClaims], Iterable[Access]],
    first_seen_of: Callable[[str], Mapping[str, datetime]],
    overrides: Overrides = NO_OVERRIDES,
) -> list[Announcement]:
    """Who these policies warn at ``now``, among ``devices``: one row per (device, policy),
    for any access the device uses; ``overrides`` as the engine applies them."""
    wanted = set(policy_ids)
    rows: list[Announcement] = []
    for claims in devices:
        found: dict[str, str] = {}
        for access in sorted(accesses_of(claims), key=lambda a: a.value):
            decision = decide(
                compiled, claims, now, access, first_seen_of(claims.device.id), overrides
            )
            for match in decision.matches:
                if match.policy_id in wanted and match.action is Action.WARN:
                    found.setdefault(match.policy_id, match.message)
        rows += [Announcement(claims.subject, claims.device.id, p, m) for p, m in found.items()]
    return sorted(rows, key=lambda a: (a.policy_id, a.user, a.device_id))


#: The notice phases a withdrawal answers (the announcer's, from the notices table).
NOTICED_PHASES = ("warn", "hold", "released")


@dataclass(frozen=True)
class Told:
    """One notice a change would send: to ``user``, about ``device_id`` and ``policy_id``."""

    user: str
    device_id: str
    policy_id: str


@dataclass(frozen=True)
class WhoIsTold:
    """The notices a change would send: the announcement (the "warn" notice) and the
    "withdrawn" ("disregard the earlier notice") notice, one per device and policy."""

    announced: tuple[Told, ...] = ()
    withdrawn: tuple[Told, ...] = ()

    def as_dict(self, limit: int | None = None) -> dict[str, object]:
        """Each list with its counts; at most ``limit`` rows listed (the counts are whole)."""

        def part(rows: tuple[Told, ...]) -> dict[str, object]:
            return {
                "notices": len(rows),
                "users": len({r.user for r in rows}),
                "devices": len({r.device_id for r in rows}),
                "rows": [
                    {"user": r.user, "device_id": r.device_id, "policy_id": r.policy_id}
                    for r in rows[:limit]
                ],
            }

        return {"announced": part(self.announced), "withdrawn": part(self.withdrawn)}


def withdrawn_policies(live: CompiledPolicySet, candidate: CompiledPolicySet) -> list[str]:
    """Policies the change retracts, or deletes while they were active: their notices
    are withdrawn (as the gateway's announcer does after the reload)."""
    diff = PolicyDiff.between(live.source, candidate.source)
    active = {p.id for p in live.source.policies if p.is_active}
    return sorted(set(diff.retracted) | {p for p in diff.removed if p in active})


def who_is_told(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    devices: Iterable[DeviceClaims],
    now: datetime,
    accesses_of: Callable[[DeviceClaims], Iterable[Access]],
    first_seen_of: Callable[[str], Mapping[str, datetime]],
    sent: Collection[tuple[str, str, str]],
    overrides: Overrides = NO_OVERRIDES,
) -> WhoIsTold:
    """Who the change from ``live`` to ``candidate`` would send a notice to at ``now``.

    Announced: devices the candidate warns for a policy (announce phase, rollout, grace)
    that the live set did not, and that had no "warn" notice for it (``sent``: the
    notices table's (device, policy, phase) rows, mailbox notices left out). Withdrawn:
    for each policy retracted or deleted, the devices ``sent`` a warn, hold or released
    notice for it and no "withdrawn" one yet, if in ``devices`` (the inventory names
    the user). Overrides apply to both sets alike."""
    devices = list(devices)
    warning = [p.id for p in warning_policies(candidate, now, overrides)]
    after = announcements(candidate, warning, devices, now, accesses_of, first_seen_of, overrides)
    before_ids = [p.id for p in warning_policies(live, now, overrides)]
    before = {
        (a.device_id, a.policy_id)
        for a in announcements(
            live, before_ids, devices, now, accesses_of, first_seen_of, overrides
        )
    }
    announced = tuple(
        Told(a.user, a.device_id, a.policy_id)
        for a in after
        if (a.device_id, a.policy_id) not in before
        and (a.device_id, a.policy_id, "warn") not in sent
    )
    users = {c.device.id: c.subject for c in devices}
    withdrawing = set(withdrawn_policies(live, candidate))
    noticed = sorted(
        (policy_id, users[device_id], device_id)
        for device_id, policy_id, phase in set(sent)
        if policy_id in withdrawing
        and phase in NOTICED_PHASES
        and device_id in users
        and (device_id, policy_id, "withdrawn") not in sent
    )
    withdrawn = tuple(dict.fromkeys(Told(u, d, p) for p, u, d in noticed))
    return WhoIsTold(announced, withdrawn)


LISTED_ROWS = 1000  # rows a preview lists per category or notice kind (counts are whole)


@dataclass(frozen=True)
class PreviewInputs:
    """What a preview reads besides the two policy sets: the inventory, what each device
    was seen doing, the operator overrides in force, the notices sent so far (device,
    policy, phase), per device its first-seen times (grace policies), and whether notices
    are sent at all (``[gateway] notices``)."""

    devices: tuple[DeviceClaims, ...]
    accesses: Mapping[str, frozenset[Access]]
    overrides: Overrides = NO_OVERRIDES
    sent: frozenset[tuple[str, str, str]] = frozenset()
    first_seen: Mapping[str, Mapping[str, datetime]] = field(default_factory=dict)
    notices: bool = True

    def accesses_of(self, claims: DeviceClaims) -> frozenset[Access]:
        """What the device was seen doing (every access when the inventory does not say)."""
        return self.accesses.get(claims.device.id, _EVERY_ACCESS)


_EVERY_ACCESS = frozenset(Access)


@dataclass(frozen=True)
class ChangePreview:
    """One change's impact: whom it newly blocks or releases, whom it would tell, what it
    changes, and the blast-radius guard's refusal (None: it would load)."""

    report: ImpactReport
    told: WhoIsTold
    diff: PolicyDiff
    refusal: str | None


def preview_change(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    inputs: PreviewInputs,
    now: datetime,
    limit: int | None,
) -> ChangePreview:
    """The impact of going from ``live`` to ``candidate`` at ``now``, as the gateway would
    decide then (with the overrides in force): for `gateway impact` and the admin API."""
    overrides = inputs.overrides
    report = assess(
        live, candidate, inputs.devices, now, inputs.accesses_of, overrides=(overrides, overrides)
    )
    diff = PolicyDiff.between(live.source, candidate.source)
    told = (
        who_is_told(
            live,
            candidate,
            inputs.devices,
            now,
            inputs.accesses_of,
            lambda device_id: inputs.first_seen.get(device_id, {}),
            inputs.sent,
            overrides,
        )
        if inputs.notices
        else WhoIsTold()
    )
    return ChangePreview(report, told, diff, blast_radius_refusal(report, candidate, diff, limit))
