"""What happens to a mail-sync login (IMAP, POP3), protocol-free: the sync counterpart of
submission.py. Called by the HTTP adapter that Dovecot and nginx ask (gateway/sync/).

A login presents a device token. It is verified by the same verifier (and cache) as SMTP
AUTH, and decided by the same engine against the same policy set in force, with
``access=sync``. The outcome says what the mail server should do:

* ``allow``       log in to the user's mailbox (decisions allow and warn);
* ``quarantine``  log in to the user's quarantine mailbox (hold, when ``[sync] hold``
                  says so), which holds only the notice;
* ``refuse``      refuse with the policy's message (reject; hold with ``hold = "refuse"``);
* ``defer``       a temporary failure (defer);
* ``invalid``     the token was refused: a failed login, with no decision.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog

from gateway.config.settings import HoldAtLogin, SyncSettings
from gateway.domain import NO_OVERRIDES, Access, Action, Clock, Decision, DeviceClaims, Overrides
from gateway.errors import TokenError
from gateway.hold.first_seen import FirstSeenTimes
from gateway.ops.logs import printable
from gateway.ops.metrics import Metrics
from gateway.policy.engine import CompiledPolicySet, decide
from gateway.policy.impact import assess
from gateway.policy.store import PolicyStore
from gateway.tokens.jwks import JwksRefresher
from gateway.tokens.verify import TokenVerifier

log = structlog.get_logger("gateway.decision")

QUARANTINE_PREFIX = "quarantine+"
#: Protocols named in metrics as they are; anything else a client sends is "other", so a
#: client cannot grow the metric's label set.
KNOWN_PROTOCOLS = frozenset({"imap", "pop3", "submission", "smtp", "lmtp", "sieve", "managesieve"})


class Outcome(enum.Enum):
    ALLOW = "allow"
    QUARANTINE = "quarantine"
    REFUSE = "refuse"
    DEFER = "defer"
    INVALID = "invalid"


class LoginEvents(Protocol):
    """What the rest of the gateway hears from logins (the wiring implements it)."""

    def logged_in(self, claims: DeviceClaims) -> None:
        """A device proved who it is to sync (inventory; its held mail may be releasable
        now)."""

    async def login_notices(self, claims: DeviceClaims, decision: Decision, mailbox: str) -> None:
        """A login that opens ``mailbox`` under a warn or hold decision: its notice belongs
        there before the mail app looks (once per device, policy and phase)."""


class SessionEnder(Protocol):
    """Ends the open IMAP/POP3 sessions of users (Dovecot's doveadm kick): Dovecot decides
    at login only, so a changed decision reaches an open session only this way."""

    async def end_sessions(self, users: Iterable[str]) -> None:
        """End every session of each user, and of the user's quarantine mailbox."""


def protocol_label(protocol: str | None) -> str:
    """The protocol as a metric label: one of a fixed set."""
    name = (protocol or "").strip().lower()
    return name if name in KNOWN_PROTOCOLS else ("unknown" if not name else "other")


def quarantine_mailbox(user: str) -> str:
    """``quarantine+<local>@<domain>``: where a held device logs in (Dovecot must allow
    the separator in ``auth_username_chars``)."""
    local, _, domain = user.rpartition("@")
    return f"{QUARANTINE_PREFIX}{local}@{domain}"


def sync_outcome(action: Action, hold: HoldAtLogin) -> Outcome:
    """What a decision does to a login (docs/sync.md has the table)."""
    if action in (Action.ALLOW, Action.WARN):
        return Outcome.ALLOW
    if action is Action.DEFER:
        return Outcome.DEFER
    if action is Action.HOLD and hold == "quarantine":
        return Outcome.QUARANTINE
    return Outcome.REFUSE


@dataclass(frozen=True)
class SyncChange:
    """A device whose login would now open another mailbox, or none (after a reload)."""

    user: str
    device_id: str
    before: Outcome
    after: Outcome
    policy_ids: tuple[str, ...]

    @property
    def withdrawn(self) -> bool:
        """A ban lifted for this device: it was kept from its inbox and is not any more."""
        return self.before is not Outcome.ALLOW and self.after is Outcome.ALLOW


def sync_changes(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    devices: Iterable[DeviceClaims],
    now: datetime,
    accesses_of: Callable[[DeviceClaims], Iterable[Access]],
    hold: HoldAtLogin,
    overrides: tuple[Overrides, Overrides] = (NO_OVERRIDES, NO_OVERRIDES),
) -> list[SyncChange]:
    """The devices that sync (per ``accesses_of``) whose login outcome differs between the
    two sets (each with its operator ``overrides``): allow to warn changes nothing for a
    session, allow to hold does."""
    syncing = [d for d in devices if Access.SYNC in set(accesses_of(d))]
    report = assess(
        live, candidate, syncing, now, accesses_of=lambda _d: (Access.SYNC,), overrides=overrides
    )
    changes = []
    for change in report.changes:
        before, after = sync_outcome(change.before, hold), sync_outcome(change.after, hold)
        if before is not after:
            changes.append(
                SyncChange(change.user, change.device_id, before, after, change.policy_ids)
            )
    return changes


@dataclass(frozen=True)
class LoginFacts:
    """What the mail server told us about one login (all of it client-influenced)."""

    via: str  # "dovecot" or "nginx": who asked
    protocol: str | None  # imap, pop3, ... as the mail server named it
    client: str | None = None  # the device's address, as the mail server saw it
    user: str | None = None  # the login name, when the mail server sends it (nginx)


@dataclass(frozen=True)
class LoginResult:
    outcome: Outcome
    claims: DeviceClaims | None = None
    decision: Decision | None = None
    token_failure: str | None = None  # the TokenError reason code ("expired", ...)
    started: float = 0.0

    @property
    def user(self) -> str | None:
        return self.claims.subject if self.claims else None

    @property
    def mailbox_user(self) -> str | None:
        """The mailbox this login opens: the user's, or the quarantine mailbox."""
        if self.claims is None:
            return None
        if self.outcome is Outcome.QUARANTINE:
            return quarantine_mailbox(self.claims.subject)
        return self.claims.subject

    @property
    def message(self) -> str:
        """For people: the policy's message, or why the login failed."""
        decision = self.decision
        if self.outcome is Outcome.INVALID:
            return f"Device token refused ({self.token_failure})"
        assert decision is not None
        if decision.message:
            return decision.message
        return {
            Action.DEFER: "Deferred by policy",
            Action.HOLD: "Held by policy",
            Action.REJECT: "Refused by policy",
        }.get(decision.action, "")


class Logins:
    """The gateway's behaviour for sync logins; shared by every request."""

    def __init__(
        self,
        settings: SyncSettings,
        verifier: TokenVerifier,
        policies: PolicyStore,
        *,
        clock: Clock,
        metrics: Metrics,
        events: LoginEvents,
        jwks: JwksRefresher | None = None,
        first_seen: FirstSeenTimes | None = None,
    ) -> None:
        self.settings = settings
        self.first_seen = first_seen  # grace_hours: per-device first-seen times
        self.verifier = verifier
        self.policies = policies
        self.clock = clock
        self.metrics = metrics
        self.events = events
        self.jwks = jwks

    async def evaluate(self, token: str, facts: LoginFacts) -> LoginResult:
        """Verify the token and decide the login; nothing is logged or counted yet (the
        adapter records the login once it knows which answer is the login's)."""
        started = time.monotonic()
        if self.jwks is not None and (unknown := self.verifier.unknown_key(token)) is not None:
            await self.jwks.unknown_kid(unknown[0])
        try:
            claims = self.verifier.verify(token, self.clock())
        except TokenError as exc:
            return LoginResult(Outcome.INVALID, token_failure=exc.reason, started=started)
        if facts.user is not None and facts.user.casefold() != claims.user:
            return LoginResult(
                Outcome.INVALID,
                claims=claims,
                token_failure="user_mismatch",  # noqa: S106  # a reason code
                started=started,
            )
        self.events.logged_in(claims)
        if self.first_seen is not None:
            decision = await self.first_seen.decide(
                self.policies.current, claims, self.clock(), Access.SYNC, self.policies.overrides
            )
        else:
            decision = decide(
                self.policies.current,
                claims,
                self.clock(),
                access=Access.SYNC,
                overrides=self.policies.overrides,
            )
        return LoginResult(self._outcome(decision), claims, decision, started=started)

    def _outcome(self, decision: Decision) -> Outcome:
        return sync_outcome(decision.action, self.settings.hold)

    async def notices(self, result: LoginResult) -> None:
        """A login that opens a mailbox under a warn or hold decision: its notice is put
        there before the login is answered, so the mail app's first sync finds it."""
        decision, claims, mailbox = result.decision, result.claims, result.mailbox_user
        if decision is None or claims is None or mailbox is None:
            return
        if result.outcome in (Outcome.ALLOW, Outcome.QUARANTINE) and decision.action in (
            Action.WARN,
            Action.HOLD,
        ):
            await self.events.login_notices(claims, decision, mailbox)

    def record(self, facts: LoginFacts, result: LoginResult, endpoint: str) -> None:
        """The login's decision event (access "sync") and its metrics: once per login."""
        protocol = protocol_label(facts.protocol)
        elapsed_ms = round((time.monotonic() - result.started) * 1000, 2)
        if result.outcome is Outcome.INVALID:
            self.metrics.token_failures.labels(result.token_failure or "invalid").inc()
            self.metrics.sync_decisions.labels(Access.SYNC.value, protocol, "invalid_token").inc()
            log.info(
                "login_refused",
                v=1,
                access=Access.SYNC.value,
                protocol=printable(facts.protocol, 32),
                via=facts.via,
                endpoint=endpoint,
                client=printable(facts.client, 64),
                login_user=printable(facts.user),
                user=result.user,
                reason=result.token_failure,
                elapsed_ms=elapsed_ms,
            )
            return
        decision = result.decision
        claims = result.claims
        assert decision is not None
        assert claims is not None
        self.metrics.sync_decisions.labels(Access.SYNC.value, protocol, decision.action.label).inc()
        log.info(
            "decision",
            v=1,
            access=Access.SYNC.value,
            protocol=printable(facts.protocol, 32),
            via=facts.via,
            endpoint=endpoint,
            client=printable(facts.client, 64),
            user=claims.subject,
            device_id=claims.device.id,
            action=decision.action.label,
            phase=decision.phase.value if decision.phase else None,
            policy_ids=list(decision.policy_ids),
            audit=[f"{m.policy_id}:{m.action.label}" for m in decision.audit],
            exempted=list(decision.exempted),
            overridden=list(decision.overridden),
            outside_rollout=list(decision.outside_rollout),
            deadlines=decision.deadlines,
            policy_version=decision.policy_version,
            result=result.outcome.value,
            mailbox_user=result.mailbox_user,
            elapsed_ms=elapsed_ms,
        )
