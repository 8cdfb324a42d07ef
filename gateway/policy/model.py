"""Policies as immutable values, and the conditions they test against verified claims."""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

from gateway.domain import Access, Action, DeviceClaims, DeviceClass, Phase, Platform, PolicyState
from gateway.policy.versions import Version, VersionRange, parse_version


class DeviceFacts:
    """What conditions test, derived once per decision: groups resolved, OS version parsed
    only if some condition asks for it."""

    __slots__ = ("_os_version", "claims", "groups")

    def __init__(self, claims: DeviceClaims, groups: frozenset[str]) -> None:
        self.claims = claims
        self.groups = groups
        self._os_version: Version | bool | None = False  # False: not parsed yet

    @property
    def os_version(self) -> Version | None:
        if self._os_version is False:
            text = self.claims.device.os_version
            self._os_version = parse_version(text) if text else None
        return self._os_version  # type: ignore[return-value]


@dataclass(frozen=True)
class ModelPattern:
    """A device-model glob ("iPhone1?,*"), compared case-blind."""

    text: str
    regex: re.Pattern[str] = field(compare=False)

    @classmethod
    def compile(cls, text: str) -> ModelPattern:
        return cls(text, re.compile(fnmatch.translate(text.casefold())))

    def matches(self, model: str) -> bool:
        return self.regex.match(model.casefold()) is not None


@dataclass(frozen=True)
class Conditions:
    """A conjunction: every condition that is set must hold. ``None`` means "not tested"."""

    apps_any: frozenset[str] | None = None
    apps_all: frozenset[str] | None = None
    platforms: frozenset[Platform] | None = None
    device_classes: frozenset[DeviceClass] | None = None
    models: tuple[ModelPattern, ...] | None = None
    os_version: VersionRange | None = None
    posture: tuple[tuple[str, bool], ...] | None = None
    managed: bool | None = None
    users: frozenset[str] | None = None  # casefolded addresses
    groups: frozenset[str] | None = None
    device_ids: frozenset[str] | None = None
    all_devices: bool = False

    def is_empty(self) -> bool:
        return self == Conditions()

    @cached_property
    def checks(self) -> tuple[Callable[[DeviceFacts], bool], ...]:
        """One predicate per condition that is set, cheapest and most selective first.

        Built once per Conditions value, so a decision runs only the tests a policy uses.
        """
        checks: list[Callable[[DeviceFacts], bool]] = []
        if (device_ids := self.device_ids) is not None:
            checks.append(lambda f: f.claims.device.id in device_ids)
        if (users := self.users) is not None:
            checks.append(lambda f: f.claims.user in users)
        if (groups := self.groups) is not None:
            checks.append(lambda f: not groups.isdisjoint(f.groups))
        # Enum sets become tuples: membership by identity, without Enum's Python-level hash.
        if self.platforms is not None:
            platforms = tuple(self.platforms)
            checks.append(lambda f: f.claims.device.platform in platforms)
        if self.device_classes is not None:
            classes = tuple(self.device_classes)
            checks.append(lambda f: f.claims.device.device_class in classes)
        if (apps_any := self.apps_any) is not None:
            checks.append(lambda f: not apps_any.isdisjoint(f.claims.apps))
        if (apps_all := self.apps_all) is not None:
            checks.append(lambda f: apps_all <= f.claims.apps)
        if (managed := self.managed) is not None:
            checks.append(lambda f: f.claims.device.managed is managed)
        if (posture := self.posture) is not None:
            # A flag the MDM did not report never matches: unknown is not a violation.
            checks.append(
                lambda f: all(f.claims.posture.get(flag) is wanted for flag, wanted in posture)
            )
        if (models := self.models) is not None:
            checks.append(
                lambda f: (
                    f.claims.device.model is not None
                    and any(p.matches(f.claims.device.model) for p in models)
                )
            )
        if (versions := self.os_version) is not None:
            # An unparsable or missing version never satisfies a version condition.
            checks.append(lambda f: (v := f.os_version) is not None and versions.contains(v))
        return tuple(checks)

    def holds(self, facts: DeviceFacts) -> bool:
        return all(check(facts) for check in self.checks)


@dataclass(frozen=True)
class Exemptions:
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    device_ids: frozenset[str] = frozenset()

    def covers(self, facts: DeviceFacts) -> bool:
        return (
            facts.claims.user in self.users
            or facts.claims.device.id in self.device_ids
            or not self.groups.isdisjoint(facts.groups)
        )


@dataclass(frozen=True)
class SourceRef:
    file: str
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


ROLLOUT_BUCKETS = 10_000
"""A device's rollout bucket is in [0, ROLLOUT_BUCKETS): percent 10 takes buckets below 1,000."""


def rollout_bucket(device_id: str, policy_id: str) -> int:
    """The stable bucket of (device, policy): the first 8 bytes of
    SHA-256(device id, NUL, policy id), big-endian, modulo 10,000. The same device gets the
    same bucket in every process and replica, and a different one for each policy, so one
    device is not always the first to be enforced."""
    digest = hashlib.sha256(device_id.encode() + b"\0" + policy_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % ROLLOUT_BUCKETS


@dataclass(frozen=True)
class RolloutStage:
    """One step of a staged rollout: from ``at`` (None: from the start), the devices whose
    bucket is below ``percent`` percent, and those of users in ``groups``, are enforced."""

    at: datetime | None
    percent: float | None = None
    groups: frozenset[str] | None = None

    def __str__(self) -> str:
        parts = []
        if self.percent is not None:
            parts.append(f"{self.percent:g}%")
        if self.groups:
            parts.append("groups " + ",".join(sorted(self.groups)))
        when = f"from {self.at.isoformat()}" if self.at is not None else "from the start"
        return f"{' + '.join(parts) or 'nobody'} {when}"


@dataclass(frozen=True)
class Rollout:
    """``[policy.rollout]``: which of the matching devices an enforcing policy enforces on.

    Stages are cumulative: at ``now`` a device is in the rollout when it is in any stage
    already reached (its ``at`` is not after ``now``), so a rollout only ever widens.
    Before the first stage nobody is in it. A device outside is treated as if the policy
    were in its announce phase: it is warned, not held.
    """

    stages: tuple[RolloutStage, ...]  # sorted by ``at``; a plain ``percent`` is one stage

    def reached(self, now: datetime) -> tuple[RolloutStage, ...]:
        return tuple(s for s in self.stages if s.at is None or s.at <= now)

    def current(self, now: datetime) -> RolloutStage | None:
        reached = self.reached(now)
        return reached[-1] if reached else None

    def includes(
        self, device_id: str, policy_id: str, groups: frozenset[str], now: datetime
    ) -> bool:
        bucket: int | None = None
        for stage in self.reached(now):
            if stage.groups is not None and not stage.groups.isdisjoint(groups):
                return True
            if stage.percent is not None:
                if bucket is None:
                    bucket = rollout_bucket(device_id, policy_id)
                if bucket < round(stage.percent * ROLLOUT_BUCKETS / 100):
                    return True
        return False


ALL_ACCESS: frozenset[Access] = frozenset(Access)
"""A policy's access when its scope does not narrow it: sending and syncing."""


@dataclass(frozen=True)
class Policy:
    """One admin-written policy, validated."""

    id: str
    action: Action
    state: PolicyState
    message: str
    match: Conditions
    scope: Conditions = Conditions()
    exempt: Exemptions = Exemptions()
    access: frozenset[Access] = ALL_ACCESS  # scope.access: what the policy gates
    title: str | None = None
    announce_at: datetime | None = None
    enforce_at: datetime | None = None
    retracted_reason: str | None = None
    confirm_impact: int | None = None
    rollout: Rollout | None = None
    grace: timedelta | None = None  # grace_hours: per device, from when it was first seen matching
    source: SourceRef | None = field(default=None, compare=False)

    @property
    def is_active(self) -> bool:
        """Draft and retracted policies never touch a decision."""
        return self.state in (PolicyState.ENFORCE, PolicyState.AUDIT)

    def phase_at(self, now: datetime) -> Phase | None:
        """None before the announcement (or before enforcement when nothing is announced)."""
        if self.enforce_at is None or now >= self.enforce_at:
            return Phase.ENFORCE
        if self.announce_at is not None and now >= self.announce_at:
            return Phase.ANNOUNCE
        return None

    @property
    def is_narrowed(self) -> bool:
        """True when ``scope.access`` leaves out sending or syncing."""
        return self.access != ALL_ACCESS

    def applies_to(self, facts: DeviceFacts, access: Access = Access.SEND) -> bool:
        return access in self.access and self.scope.holds(facts) and self.match.holds(facts)

    def message_for(self, phase: Phase) -> str:
        if phase is Phase.ANNOUNCE and self.enforce_at is not None:
            return f"{self.message} (enforced from {self.enforce_at.isoformat()})"
        return self.message


@dataclass(frozen=True)
class PolicySet:
    """Every policy of one directory at one moment, plus the group table they refer to."""

    policies: tuple[Policy, ...]
    version: str
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict, compare=False)

    def by_id(self) -> dict[str, Policy]:
        return {p.id: p for p in self.policies}
