"""Prometheus metrics, one registry per server (so tests can run several side by side)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.domain import Decision


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        self.relay = Counter("gateway_relay", "Relay attempts by result", ["result"], registry=r)
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
        self.held = Gauge("gateway_held_messages", "Messages in the hold store", registry=r)
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

    def decided(self, decision: Decision) -> None:
        policy = ",".join(decision.policy_ids) or "none"
        self.decisions.labels(decision.action.label, policy).inc()

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
