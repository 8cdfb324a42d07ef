"""What happens to a submission, stage by stage. Called by the SMTP adapter; calls the pure
engine. Protocol-free: it takes facts (credentials, addresses, bytes) and returns Replies.

Stages (SPEC s 3):
* AUTH   verify the token; the SASL user must equal its ``sub``.
* MAIL   sender must be the user or an alias; decide once, against one policy set;
         defer (451) and reject (550) answer here; allow/warn open the upstream.
* RCPT   relayed upstream one by one; the upstream's answer is the client's answer.
* DATA   relay (allow, warn + notice header) or hold; 250 only after the upstream's 250
         (or once the message is durably held).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from typing import Any, Protocol

import structlog

from gateway import replies
from gateway.config.settings import Settings
from gateway.domain import (
    Action,
    Clock,
    Credentials,
    Decision,
    DeviceClaims,
    HeldSubmission,
    utc_now,
)
from gateway.errors import HoldStoreError, HoldStoreLowOnSpace, TokenError
from gateway.hold.first_seen import FirstSeenTimes
from gateway.limits import DataBudget, MessageRate, auth_failure_delay
from gateway.ops.logs import message_id
from gateway.ops.metrics import Metrics
from gateway.policy.engine import decide
from gateway.policy.store import PolicyStore
from gateway.replies import Reply
from gateway.tokens.jwks import JwksRefresher
from gateway.tokens.verify import TokenVerifier
from gateway.upstream.relay import Relay, RelayTransaction

log = structlog.get_logger("gateway.decision")


class Holder(Protocol):
    """The durable hold store: returns the hold id once the message is committed."""

    async def hold(self, message: HeldSubmission) -> str: ...


class SubmissionEvents(Protocol):
    """What the rest of the gateway hears from submissions; the wiring implements it
    (inventory, release of held mail, notices), so this module never reaches up."""

    def authenticated(self, claims: DeviceClaims) -> None:
        """A device proved who it is (its held mail may be releasable now)."""

    async def before_mail(self, claims: DeviceClaims) -> None:
        """Called before each decision: lets the device's held mail go out first."""

    def decided(self, claims: DeviceClaims, decision: Decision) -> None:
        """A decision other than allow was made (notices)."""

    def held(self, device_id: str) -> None:
        """A message of this device is now in the hold store."""


class NoEvents:
    """Nobody listening (tests and tools that drive a Submission alone)."""

    def authenticated(self, claims: DeviceClaims) -> None:
        pass

    async def before_mail(self, claims: DeviceClaims) -> None:
        pass

    def decided(self, claims: DeviceClaims, decision: Decision) -> None:
        pass

    def held(self, device_id: str) -> None:
        pass


@dataclass(frozen=True)
class AuthOutcome:
    reply: Reply
    claims: DeviceClaims | None = None
    failure_reason: str | None = None  # the TokenError reason code, for logs and metrics


@dataclass(frozen=True)
class AuthPenalty:
    """What a failed AUTH costs the session: a wait before the reply, and after too many
    failures the 421 that closes it."""

    delay: float
    close: Reply | None = None


@dataclass
class SessionFacts:
    """What the SMTP layer knows about one connection."""

    session_id: str
    peer: str  # "[ip]:port", for logs
    peer_ip: str = ""
    helo: str = ""
    tls: bool = False
    claims: DeviceClaims | None = None
    mechanism: str | None = None
    auth_failures: int = 0


@dataclass
class Transaction:
    """One MAIL..DATA exchange."""

    sender: str
    decision: Decision
    started: float
    relay: RelayTransaction | None = None
    options: tuple[str, ...] = ()  # the MAIL parameters passed upstream (BODY=)
    recipients: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    declared_size: int | None = None  # MAIL FROM's SIZE= (RFC 1870)

    @property
    def copies_in_memory(self) -> int:
        """How many times the message is in memory at its peak: once when relayed (it is
        streamed upstream from the buffer it arrived in), twice when held (the copy
        handed to the hold store)."""
        return 2 if self.decision.action is Action.HOLD else 1


class Submission:
    """The gateway's behaviour for one listener; shared by all sessions."""

    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        policies: PolicyStore,
        relay: Relay,
        holder: Holder,
        events: SubmissionEvents | None = None,
        clock: Clock = utc_now,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        jwks: JwksRefresher | None = None,
        first_seen: FirstSeenTimes | None = None,
    ) -> None:
        self.settings = settings
        self.first_seen = first_seen  # grace_hours: per-device first-seen times
        self.verifier = verifier
        self.jwks = jwks
        self.policies = policies
        self.relay = relay
        self.holder = holder
        self.events: SubmissionEvents = events or NoEvents()
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.monotonic = monotonic  # rate limits: immune to wall-clock jumps
        limits = settings.limits
        self.message_rate = MessageRate(limits.messages_per_user_per_minute)
        self.data_budget = DataBudget(limits.data_bytes_in_flight)

    @property
    def audience(self) -> str:
        """The audience tokens must name (for the OAUTHBEARER error challenge)."""
        return self.settings.tokens.audience

    @property
    def data_reply_within(self) -> float:
        """Seconds the answer to DATA may take once the message is in: the upstream's
        timeout for the connection and for DATA, plus slack."""
        return self.relay.settings.timeout * 2 + 30

    def limit_refused(self, limit: str) -> None:
        """The SMTP layer refused something under a limit it enforces itself."""
        self.metrics.limited.labels(limit).inc()

    def proxy_header_refused(self, reason: str) -> None:
        """A balancer's connection was closed for want of a valid PROXY header."""
        self.metrics.proxy_header_refused.labels(reason).inc()

    # --- AUTH ---------------------------------------------------------------------------

    def auth_failure(self, facts: SessionFacts) -> AuthPenalty:
        """A failed AUTH in this session (a refused token, bad base64, SASL syntax): the
        session waits longer with each one, and after ``auth_failures_per_session`` it is
        closed with 421 4.7.0. Per session, never per address: behind carrier NAT one
        stale phone must not lock out its neighbours, and a signed token cannot be
        guessed, so slowing the failing session down is all a limit needs to do."""
        limits = self.settings.limits
        facts.auth_failures += 1
        delay = auth_failure_delay(
            facts.auth_failures, limits.auth_failure_delay, limits.auth_failure_delay_max
        )
        if facts.auth_failures < limits.auth_failures_per_session:
            return AuthPenalty(delay)
        log.warning(
            "auth_failures_limit",
            session=facts.session_id,
            peer=facts.peer,
            failures=facts.auth_failures,
        )
        self.metrics.limited.labels("auth_failures_per_session").inc()
        return AuthPenalty(delay, replies.TOO_MANY_AUTH_FAILURES)

    async def learn_key(self, credentials: Credentials) -> None:
        """Before verifying: a token signed with a kid its issuer has not shown us yet
        sends us to the issuer's JWKS once (rate-limited), so a freshly rotated key works
        on its first use instead of after the next scheduled fetch."""
        if self.jwks is None:
            return
        unknown = self.verifier.unknown_key(credentials.token)
        if unknown is not None:
            await self.jwks.unknown_kid(unknown[0])

    def authenticate(self, facts: SessionFacts, credentials: Credentials) -> AuthOutcome:
        try:
            claims = self.verifier.verify(credentials.token, self.clock())
        except TokenError as exc:
            return self._auth_failed(
                facts,
                credentials,
                exc.reason,
                f"Device token refused ({exc.reason})",
                detail=str(exc),
            )
        if credentials.user is not None and credentials.user.casefold() != claims.user:
            return self._auth_failed(
                facts,
                credentials,
                "user_mismatch",
                "SASL user does not match the device token",
                token_sub=claims.subject,
            )
        facts.claims = claims
        facts.mechanism = credentials.mechanism
        log.info(
            "auth_ok",
            session=facts.session_id,
            peer=facts.peer,
            mechanism=credentials.mechanism,
            user=claims.subject,
            device_id=claims.device.id,
        )
        self.metrics.authenticated(True)
        self.events.authenticated(claims)
        return AuthOutcome(replies.AUTH_OK, claims)

    def _auth_failed(
        self, facts: SessionFacts, credentials: Credentials, reason: str, text: str, **details: str
    ) -> AuthOutcome:
        """The client gets a short hint; the full reason goes to the log (never the token)."""
        log.info(
            "auth_failed",
            session=facts.session_id,
            peer=facts.peer,
            mechanism=credentials.mechanism,
            user=credentials.user,
            reason=reason,
            **details,
        )
        self.metrics.authenticated(False, reason)
        return AuthOutcome(replies.AUTH_FAILED.with_text(text), None, reason)

    # --- MAIL ---------------------------------------------------------------------------

    async def mail(
        self, facts: SessionFacts, sender: str, options: Sequence[str]
    ) -> tuple[Reply, Transaction | None]:
        claims = facts.claims
        if claims is None:
            return replies.AUTH_REQUIRED, None
        now = self.clock()
        if now >= claims.expires_at + self.settings.tokens.leeway:
            return Reply(
                421, "4.7.0", "Device token expired; reconnect and authenticate again"
            ), None
        if sender and not self.settings.may_send_as(claims.subject, sender):
            log.info("sender_refused", session=facts.session_id, user=claims.subject, sender=sender)
            return replies.SENDER_NOT_OWNED, None
        if not self.message_rate.allow(claims.user, self.monotonic()):
            log.info("message_rate_limit", session=facts.session_id, user=claims.subject)
            self.metrics.limited.labels("messages_per_user").inc()
            return replies.TOO_MANY_MESSAGES, None
        await self.events.before_mail(claims)
        if self.first_seen is not None:
            decision = await self.first_seen.decide(
                self.policies.current, claims, now, overrides=self.policies.overrides
            )
        else:
            decision = decide(self.policies.current, claims, now, overrides=self.policies.overrides)
        self.metrics.decided(decision)
        if decision.action is not Action.ALLOW:
            self.events.decided(claims, decision)
        transaction = Transaction(
            sender=sender,
            decision=decision,
            started=time.monotonic(),
            options=relayed_options(options),
            declared_size=declared_size(options),
        )
        if decision.action is Action.DEFER:
            self._log_decision(facts, transaction, result="deferred")
            return Reply(451, "4.7.1", decision.message or "Deferred by policy"), None
        if decision.action is Action.REJECT:
            self._log_decision(facts, transaction, result="rejected")
            return Reply(550, "5.7.1", decision.message or "Rejected by policy"), None
        declared = transaction.declared_size
        if declared and declared * transaction.copies_in_memory > self.data_budget.available():
            # RFC 1870 s 6.1: the size the client announced does not fit now; say so before
            # it sends a byte.
            self._log_decision(facts, transaction, result="data_bytes_in_flight")
            self.metrics.limited.labels("data_bytes_in_flight").inc()
            return replies.INSUFFICIENT_STORAGE, None
        if decision.action is Action.HOLD:
            return replies.OK.with_text("Sender OK"), transaction
        relay, reply = await self.relay.begin(sender, transaction.options)
        if not reply.is_success:
            await relay.abort()
            self._log_decision(
                facts, transaction, result="upstream_refused_sender", upstream_reply=reply.line()
            )
            return reply, None
        transaction.relay = relay
        return Reply(250, "2.1.0", "Sender OK"), transaction

    # --- RCPT ---------------------------------------------------------------------------

    async def rcpt(self, transaction: Transaction, recipient: str) -> Reply:
        if len(transaction.recipients) >= self.settings.smtp.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        if transaction.relay is None:  # held: nothing upstream yet
            transaction.recipients.append(recipient)
            return Reply(250, "2.1.5", "Recipient OK")
        reply = await transaction.relay.add_recipient(recipient, self.relay.routes_by_domain)
        if reply.is_success:
            transaction.recipients.append(recipient)
        else:
            transaction.refused.append((recipient, reply.line()))
        return reply

    # --- DATA ---------------------------------------------------------------------------

    def trace_headers(self, facts: SessionFacts, transaction: Transaction, now: datetime) -> bytes:
        """Prepended to the message, which is otherwise relayed byte for byte."""
        claims = facts.claims
        assert claims is not None
        protocol = "ESMTPSA" if facts.tls else "ESMTPA"  # RFC 3848
        helo = (
            "".join(ch for ch in facts.helo if ch.isprintable() and ch not in "()")[:255]
            or "unknown"
        )
        recipient = transaction.recipients[0] if len(transaction.recipients) == 1 else None
        received = (
            f"Received: from {helo} ([{facts.peer_ip}])\r\n"
            f"\tby {self.settings.smtp.hostname} (Compliance Gateway) with {protocol} id {facts.session_id}\r\n"
            + (f"\tfor <{recipient}>" if recipient else "\t")
            + f"; {_header_date(now)}\r\n"
        )
        decision = transaction.decision
        if decision.action is Action.WARN:
            notice = " ".join(decision.message.split()).encode("ascii", "replace").decode()
            received += f"X-Compliance-Notice: {', '.join(decision.policy_ids)}; {notice}\r\n"
        return received.encode()

    async def data(
        self, facts: SessionFacts, transaction: Transaction, content: bytes | bytearray
    ) -> Reply:
        """``content`` is the message as received (the SMTP layer's buffer, not copied):
        relayed, it is streamed upstream behind the trace headers; held, the hold store
        gets one copy with them in front."""
        now = self.clock()
        trace = self.trace_headers(facts, transaction, now)
        decision = transaction.decision
        if decision.action is Action.HOLD:
            return await self._hold(facts, transaction, trace + content, now)
        assert transaction.relay is not None
        relay_started = time.monotonic()
        upstream = await transaction.relay.send(trace, content)
        self.metrics.relay_seconds.observe(time.monotonic() - relay_started)
        transaction.relay = None
        result = "relayed" if upstream.is_success else "upstream_failed"
        self._log_decision(
            facts,
            transaction,
            result=result,
            upstream_reply=upstream.line(),
            size=len(content),
            message_id=message_id(content),
        )
        if not upstream.is_success:
            return upstream
        if decision.action is Action.WARN:
            return Reply(250, "2.0.0", f"Message accepted. NOTICE: {decision.message}")
        return Reply(250, "2.0.0", "Message accepted for delivery")

    async def _hold(
        self, facts: SessionFacts, transaction: Transaction, message: bytes, now: datetime
    ) -> Reply:
        assert facts.claims is not None
        held = HeldSubmission(
            sender=transaction.sender,
            recipients=tuple(transaction.recipients),
            content=message,
            claims=facts.claims,
            decision=transaction.decision,
            received_at=now,
            options=transaction.options,
        )
        try:
            hold_id = await self.holder.hold(held)
        except HoldStoreLowOnSpace as exc:
            log.warning("hold_refused_low_on_space", session=facts.session_id, reason=str(exc))
            self._log_decision(facts, transaction, result="hold_refused_low_on_space")
            return replies.INSUFFICIENT_STORAGE
        except HoldStoreError:
            log.exception("hold_failed", session=facts.session_id)
            self._log_decision(facts, transaction, result="hold_failed")
            return replies.STORE_FAILED
        self.events.held(facts.claims.device.id)
        self._log_decision(
            facts,
            transaction,
            result="held",
            hold_id=hold_id,
            size=len(message),
            message_id=message_id(message),
        )
        return Reply(250, "2.6.0", f"held: {transaction.decision.message}")

    async def abort(self, transaction: Transaction | None) -> None:
        if transaction is not None and transaction.relay is not None:
            relay, transaction.relay = transaction.relay, None
            await relay.abort()

    # --- decision log -------------------------------------------------------------------

    def _log_decision(self, facts: SessionFacts, transaction: Transaction, **fields: Any) -> None:
        decision = transaction.decision
        claims = facts.claims
        log.info(
            "decision",
            v=1,
            access="send",  # the sync endpoint logs its logins as access "sync"
            protocol="smtp",
            session=facts.session_id,
            client=facts.peer_ip,  # the phone's, also behind a balancer's PROXY header
            user=claims.subject if claims else None,
            device_id=claims.device.id if claims else None,
            action=decision.action.label,
            phase=decision.phase.value if decision.phase else None,
            policy_ids=list(decision.policy_ids),
            audit=[f"{m.policy_id}:{m.action.label}" for m in decision.audit],
            exempted=list(decision.exempted),
            overridden=list(decision.overridden),
            outside_rollout=list(decision.outside_rollout),
            deadlines=decision.deadlines,
            policy_version=decision.policy_version,
            sender=transaction.sender,
            recipients=len(transaction.recipients),
            refused=len(transaction.refused),
            elapsed_ms=round((time.monotonic() - transaction.started) * 1000, 2),
            **fields,
        )


def declared_size(options: Sequence[str]) -> int | None:
    """MAIL FROM's SIZE= parameter (RFC 1870 s 6), None when absent or malformed
    (aiosmtpd has already refused a malformed or too large one)."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def relayed_options(options: Sequence[str]) -> tuple[str, ...]:
    """The MAIL FROM parameters that travel with the message upstream, now or when held
    mail is released: BODY= (RFC 6152 8BITMIME). SIZE and AUTH are this hop's own."""
    return tuple(o for o in options if o.upper().startswith("BODY="))


_last_date: tuple[int, str] = (0, "")


def _header_date(now: datetime) -> str:
    """RFC 5322 date, formatted once per second: the email package's formatter is slow."""
    global _last_date
    second = int(now.timestamp())
    if _last_date[0] != second:
        _last_date = (second, format_datetime(now.replace(microsecond=0)))
    return _last_date[1]


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]
