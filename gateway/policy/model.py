"""Policies as immutable values, and the conditions they test against verified claims."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from gateway.domain import Action, DeviceClaims, DeviceClass, Phase, Platform, PolicyState
from gateway.policy.versions import VersionRange, parse_version


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

    def holds(self, claims: DeviceClaims, user_groups: frozenset[str]) -> bool:
        device = claims.device
        if self.device_ids is not None and device.id not in self.device_ids:
            return False
        if self.users is not None and claims.user not in self.users:
            return False
        if self.groups is not None and self.groups.isdisjoint(user_groups):
            return False
        if self.platforms is not None and device.platform not in self.platforms:
            return False
        if self.device_classes is not None and device.device_class not in self.device_classes:
            return False
        if self.apps_any is not None and self.apps_any.isdisjoint(claims.apps):
            return False
        if self.apps_all is not None and not self.apps_all <= claims.apps:
            return False
        if self.managed is not None and device.managed is not self.managed:
            return False
        if self.posture is not None:
            for flag, wanted in self.posture:
                # A flag the MDM did not report never matches: unknown is not a violation.
                if claims.posture.get(flag) is not wanted:
                    return False
        if self.models is not None:
            if device.model is None or not any(p.matches(device.model) for p in self.models):
                return False
        if self.os_version is not None:
            version = parse_version(device.os_version) if device.os_version else None
            # An unparsable or missing version never satisfies a version condition.
            if version is None or not self.os_version.contains(version):
                return False
        return True


@dataclass(frozen=True)
class Exemptions:
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    device_ids: frozenset[str] = frozenset()

    def covers(self, claims: DeviceClaims, user_groups: frozenset[str]) -> bool:
        return (
            claims.user in self.users
            or claims.device.id in self.device_ids
            or not self.groups.isdisjoint(user_groups)
        )


@dataclass(frozen=True)
class SourceRef:
    file: str
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


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
    title: str | None = None
    announce_at: datetime | None = None
    enforce_at: datetime | None = None
    retracted_reason: str | None = None
    confirm_impact: int | None = None
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

    def applies_to(self, claims: DeviceClaims, user_groups: frozenset[str]) -> bool:
        return self.scope.holds(claims, user_groups) and self.match.holds(claims, user_groups)

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
