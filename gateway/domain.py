"""Value types shared by every layer: verified device claims and decisions.

Nothing here does I/O or reads the clock; everything is immutable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple


class Action(enum.IntEnum):
    """What happens to a message; the integer order is severity (most severe wins)."""

    ALLOW = 0
    WARN = 1
    DEFER = 2
    HOLD = 3
    REJECT = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Action:
        return cls[text.upper()]


class Access(enum.Enum):
    """What a device asks for: to send mail (SMTP submission) or to sync it (an IMAP or
    POP3 login). Policies apply to both unless their scope names one."""

    SEND = "send"
    SYNC = "sync"


class Phase(enum.Enum):
    """Where a policy is in its life at a given instant."""

    ANNOUNCE = "announce"  # between announce_at and enforce_at: warn only
    ENFORCE = "enforce"  # from enforce_at: the policy's action


class PolicyState(enum.Enum):
    DRAFT = "draft"  # never evaluated by the gateway (only by `gateway check`)
    AUDIT = "audit"  # evaluated and logged, never changes a decision
    ENFORCE = "enforce"  # in force
    RETRACTED = "retracted"  # ended: never evaluated, held mail is released


class Platform(enum.Enum):
    IOS = "ios"
    ANDROID = "android"
    IPADOS = "ipados"
    WINDOWS = "windows"
    MACOS = "macos"
    LINUX = "linux"
    CHROMEOS = "chromeos"


class DeviceClass(enum.Enum):
    MOBILE = "mobile"
    TABLET = "tablet"
    DESKTOP = "desktop"
    BROWSER = "browser"


def _frozen_mapping(value: Mapping[str, bool]) -> Mapping[str, bool]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class Device:
    """The device part of a token, as reported by the MDM."""

    id: str
    platform: Platform
    device_class: DeviceClass
    model: str | None = None
    os_version: str | None = None
    managed: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "platform": self.platform.value,
            "class": self.device_class.value,
            "model": self.model,
            "os_version": self.os_version,
            "managed": self.managed,
        }


@dataclass(frozen=True, eq=True)
class DeviceClaims:
    """The verified claims of one device-compliance token."""

    issuer: str
    subject: str  # the user's mail address, as signed
    audience: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    device: Device
    apps: frozenset[str] = frozenset()
    posture: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))
    not_before: datetime | None = None
    token_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.posture, MappingProxyType):
            object.__setattr__(self, "posture", _frozen_mapping(self.posture))

    __hash__ = None  # type: ignore[assignment]  # posture is a mapping: claims are not hashable

    @cached_property
    def user(self) -> str:
        """The subject normalised for comparisons (mail addresses compare case-blind here)."""
        return self.subject.casefold()

    def to_json(self) -> dict[str, object]:
        """Everything needed to re-evaluate a held message later (no signature, no token)."""
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "audience": list(self.audience),
            "issued_at": self.issued_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "not_before": self.not_before.isoformat() if self.not_before else None,
            "token_id": self.token_id,
            "device": self.device.to_json(),
            "apps": sorted(self.apps),
            "posture": dict(self.posture),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceClaims:
        device = data["device"]
        return cls(
            issuer=data["issuer"],
            subject=data["subject"],
            audience=tuple(data["audience"]),
            issued_at=datetime.fromisoformat(data["issued_at"]),
            expires_at=datetime.fromisoformat(data["expires_at"]),
            not_before=datetime.fromisoformat(data["not_before"])
            if data.get("not_before")
            else None,
            token_id=data.get("token_id"),
            device=Device(
                id=device["id"],
                platform=Platform(device["platform"]),
                device_class=DeviceClass(device["class"]),
                model=device.get("model"),
                os_version=device.get("os_version"),
                managed=device.get("managed"),
            ),
            apps=frozenset(data["apps"]),
            posture=dict(data["posture"]),
        )

    def summary(self) -> dict[str, object]:
        """For people (`explain`, `hold show`): flat, no signature, no token."""
        device = self.device.to_json()
        return {
            "user": self.subject,
            "device_id": device.pop("id"),
            **device,
            "apps": sorted(self.apps),
            "posture": dict(self.posture),
            "issuer": self.issuer,
            "expires_at": self.expires_at.isoformat(),
        }


class PolicyMatch(NamedTuple):
    """One policy that applied to a device, with what it contributed.

    A NamedTuple rather than a frozen dataclass: equally immutable, and built on the
    engine's hot path, where a frozen dataclass's per-field __setattr__ costs ~1 µs.
    """

    policy_id: str
    action: Action  # what this policy asks for now (WARN during its announce phase)
    phase: Phase
    message: str
    # Enforcing, but not on this device yet: treated as the announce phase (WARN) because
    # the device is outside the rollout's current stage, or within its own grace period
    # (then ``deadline`` is when it is enforced on this device).
    outside_rollout: bool = False
    deadline: datetime | None = None


@dataclass(frozen=True)
class Decision:
    """The one decision for one message, with its reasons."""

    action: Action
    phase: Phase | None
    message: str
    policy_version: str
    matches: tuple[PolicyMatch, ...] = ()  # policies in force that matched
    audit: tuple[PolicyMatch, ...] = ()  # audit-state policies: what would have happened
    exempted: tuple[str, ...] = ()  # policies that matched but exempt this user/device
    # Policies that matched but an operator override set aside: "ID: suspended" or
    # "ID: break-glass exemption" (gateway policy suspend / exempt).
    overridden: tuple[str, ...] = ()
    # Policies with grace_hours that applied without a first-seen time for this device: the
    # engine counted from ``now``; the caller records the time and may decide again.
    first_seen_needed: tuple[str, ...] = ()

    @property
    def outside_rollout(self) -> tuple[str, ...]:
        """Policies that would enforce but left this device out of their rollout stage."""
        return tuple(m.policy_id for m in (*self.matches, *self.audit) if m.outside_rollout)

    @property
    def deadlines(self) -> dict[str, str]:
        """Per policy in its grace period for this device, when it is enforced on it."""
        return {
            m.policy_id: m.deadline.isoformat()
            for m in (*self.matches, *self.audit)
            if m.deadline is not None
        }

    @property
    def policy_ids(self) -> tuple[str, ...]:
        """Ids of the policies whose action is the decision's action."""
        return tuple(m.policy_id for m in self.matches if m.action == self.action)

    def as_dict(self) -> dict[str, object]:
        def match_dict(m: PolicyMatch) -> dict[str, object]:
            found: dict[str, object] = {
                "policy_id": m.policy_id,
                "action": m.action.label,
                "phase": m.phase.value,
                "message": m.message,
            }
            if m.outside_rollout:
                found["outside_rollout"] = True
            if m.deadline is not None:
                found["deadline"] = m.deadline.isoformat()
            return found

        return {
            "action": self.action.label,
            "phase": self.phase.value if self.phase else None,
            "message": self.message,
            "policy_ids": list(self.policy_ids),
            "policy_version": self.policy_version,
            "matches": [match_dict(m) for m in self.matches],
            "audit": [match_dict(m) for m in self.audit],
            "exempted": list(self.exempted),
            "overridden": list(self.overridden),
        }


@dataclass(frozen=True)
class Overrides:
    """Operator overrides in force, read from the hold store by the services: suspended
    policy ids, and (policy id, subject) break-glass exemptions where the subject is
    ``user:NAME`` or ``device:ID``. The engine is given them and stays pure."""

    suspended: frozenset[str] = frozenset()
    exempt: frozenset[tuple[str, str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.suspended or self.exempt)


NO_OVERRIDES = Overrides()


@dataclass(frozen=True)
class HeldSubmission:
    """A message the decision said to hold, as it goes into the hold store."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes
    claims: DeviceClaims
    decision: Decision
    received_at: datetime
    options: tuple[str, ...] = ()  # MAIL FROM parameters to use upstream (BODY=8BITMIME)


@dataclass(frozen=True)
class Credentials:
    """What a SASL exchange yields (PLAIN, RFC 4616; XOAUTH2; OAUTHBEARER, RFC 7628)."""

    mechanism: str
    user: str | None  # None: OAUTHBEARER without an authzid (the token's sub is the user)
    token: str

    def __repr__(self) -> str:  # never print a token
        return f"Credentials(mechanism={self.mechanism!r}, user={self.user!r}, token=<redacted>)"


#: The wall clock, passed in wherever time matters, so that nothing below the wiring
#: reads it itself.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)
