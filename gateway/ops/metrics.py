"""Prometheus metrics, one registry per server (so tests can run several side by side)."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway import __version__
from gateway.domain import Decision
from gateway.ops.timeline import DecisionTimeline


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.timeline = DecisionTimeline()  # the admin overview's chart of decisions
        r = self.registry
        self.sessions = Counter("gateway_sessions", "SMTP sessions accepted", registry=r)
        self.sessions_active = Gauge(
            "gateway_sessions_active", "SMTP sessions open now", registry=r
        )
        self.auth = Counter("gateway_auth", "AUTH attempts by result", ["result"], registry=r)
        self.token_failures = Counter(
            "gateway_token_failures", "Refused tokens by reason", ["reason"], registry=r
        )
        self.decisions = Counter(
            "gateway_decisions",
            "Decisions by action and deciding policy",
            ["action", "policy"],
            registry=r,
        )
        self.sync_decisions = Counter(
            "gateway_sync_decisions",
            "Sync logins (IMAP, POP3) by access, protocol and decision (or invalid_token)",
            ["access", "protocol", "action"],
            registry=r,
        )
        self.relay = Counter(
            "gateway_relay",
            "Upstream steps (stage: connect, mail, rcpt, data) by result (accepted, 4xx, "
            "5xx, failed: no answer)",
            ["stage", "result"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "gateway_upstream_up",
            "1 after a smarthost's last step succeeded or got a reply, 0 after it could not "
            "be connected to or stopped answering",
            ["target"],
            registry=r,
        )
        self.sync_kicks = Counter(
            "gateway_sync_kicks",
            "Users whose open IMAP/POP3 sessions were ended after a reload (doveadm kick): "
            "ok, retried (an attempt failed and is retried), failed (gave up)",
            ["result"],
            registry=r,
        )
        self.sync_notices = Counter(
            "gateway_sync_notices",
            "Notices delivered to mailboxes over LMTP by phase (warn, hold, withdrawn) and "
            "result (sent, failed)",
            ["phase", "result"],
            registry=r,
        )
        self.relay_seconds = Histogram(
            "gateway_relay_seconds",
            "Time from the end of DATA to the upstream's final reply",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.limited = Counter(
            "gateway_limit_refusals",
            "Connections, AUTH attempts, messages or sessions refused by a limit",
            ["limit"],
            registry=r,
        )
        self.proxy_header_refused = Counter(
            "gateway_proxy_header_refusals",
            "Connections from a proxy_protocol_from network closed for want of a valid PROXY "
            "header, by reason (missing, malformed, oversized, unsupported, timeout, closed)",
            ["reason"],
            registry=r,
        )
        self.held = Gauge("gateway_held_messages", "Messages in the hold store", registry=r)
        self.held_bytes = Gauge(
            "gateway_held_bytes", "Bytes of the messages in the hold store", registry=r
        )
        self.held_oldest_age = Gauge(
            "gateway_held_oldest_age_seconds",
            "Age of the oldest message in the hold store (0 when it is empty)",
            registry=r,
        )
        self.build_info = Gauge(
            "gateway_build_info", "The gateway's version (label); always 1", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        self.release_events = Counter(
            "gateway_release_events",
            "Release of held mail: released, retried, bounced, expired, store_fault, "
            "store_recovered",
            ["event"],
            registry=r,
        )
        self.hold_store_writable = Gauge(
            "gateway_hold_store_writable",
            "1 if the last write probe of the hold store succeeded",
            registry=r,
        )
        self.reload_success = Gauge(
            "gateway_policy_reload_last_success",
            "1 if the last policy reload succeeded",
            registry=r,
        )
        self.reload_timestamp = Gauge(
            "gateway_policy_reload_timestamp_seconds",
            "Time of the last successful policy reload",
            registry=r,
        )
        self.policy_version = Gauge(
            "gateway_policy_version_info",
            "The policy-set version in force (label)",
            ["version"],
            registry=r,
        )

        self.jwks_fetches = Counter(
            "gateway_jwks_fetches",
            "Fetches of issuers' JWKS by result",
            ["issuer", "result"],
            registry=r,
        )
        self.jwks_keys = Gauge(
            "gateway_jwks_keys", "Keys in force from each issuer's JWKS", ["issuer"], registry=r
        )
        self.jwks_last_success = Gauge(
            "gateway_jwks_last_success_timestamp_seconds",
            "Time of each issuer's last good JWKS fetch",
            ["issuer"],
            registry=r,
        )

    def jwks_fetched(self, issuer: str, ok: bool, keys: int) -> None:
        self.jwks_fetches.labels(issuer, "ok" if ok else "failed").inc()
        self.jwks_keys.labels(issuer).set(keys)
        if ok:
            self.jwks_last_success.labels(issuer).set_to_current_time()

    def relay_step(self, stage: str, result: str, target: str | None) -> None:
        """One upstream step (gateway.upstream.relay.RelayObserver)."""
        self.relay.labels(stage, result).inc()
        if target is not None:
            down = result == "failed" or (stage == "connect" and result != "accepted")
            self.upstream_up.labels(target).set(0 if down else 1)

    def decided(self, decision: Decision) -> None:
        """One series per policy id (a decision by several policies counts once for each),
        so the label's values are bounded by the number of policies, not combinations."""
        action = decision.action.label
        for policy in dict.fromkeys(decision.policy_ids) or ("none",):
            self.decisions.labels(action, policy).inc()
        self.timeline.count(action)

    def held_now(self, messages: int, size: int, oldest: datetime | None, now: datetime) -> None:
        """The hold store's contents, measured once per release tick."""
        self.held.set(messages)
        self.held_bytes.set(size)
        self.held_oldest_age.set(max(0.0, (now - oldest).total_seconds()) if oldest else 0)

    def authenticated(self, ok: bool, reason: str | None = None) -> None:
        self.auth.labels("ok" if ok else "failed").inc()
        if reason is not None:
            self.token_failures.labels(reason).inc()

    def policy_in_force(self, version: str, ok: bool, timestamp: float | None) -> None:
        self.reload_success.set(1 if ok else 0)
        if ok and timestamp is not None:
            self.reload_timestamp.set(timestamp)
            self.policy_version.clear()
            self.policy_version.labels(version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
