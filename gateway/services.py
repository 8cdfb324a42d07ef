"""The services one gateway process runs, built from its settings and wired together.

policies (store + reload triggers + blast-radius guard), relay (smarthosts or MX), hold
store, releaser, device inventory, notices, metrics, the Submission stages that the
SMTP adapter drives, and the Logins that the sync adapter asks (one token verifier for
both). This is also where submissions' events land (:class:`Services`
implements :class:`~gateway.submission.SubmissionEvents`). Nothing here listens on a
socket or handles a signal: that is the server's lifecycle (server.py). Background work is
started through the ``spawn`` the server passes in, so every task is named and owned.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import structlog

from gateway.config.settings import Settings, load_settings
from gateway.devices.announce import Announcer
from gateway.devices.inventory import Inventory
from gateway.devices.notices import MailboxNotices, Notifier
from gateway.domain import Access, Action, Clock, Decision, DeviceClaims
from gateway.errors import HoldStoreError, SettingsError
from gateway.hold.backend import async_store
from gateway.hold.first_seen import FirstSeenTimes
from gateway.hold.release import Releaser, Spawn
from gateway.hold.store import HeldMessage, PolicyOverride, overrides_of
from gateway.logins import Logins, SessionEnder, SyncChange, sync_changes
from gateway.ops.metrics import Metrics
from gateway.ops.workers import WorkerRole
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet
from gateway.policy.history import KEEP_VERSIONS, Fingerprints, read_contents, snapshot
from gateway.policy.impact import assess, blast_radius_refusal
from gateway.policy.reload import Reloader
from gateway.policy.store import PolicyStore, ReloadResult
from gateway.submission import Submission
from gateway.tokens.jwks import JwksRefresher
from gateway.tokens.keyring import KeyRing
from gateway.tokens.verify import TokenVerifier
from gateway.upstream.lmtp import LmtpDelivery
from gateway.upstream.mx import MxRouter, configured_resolver
from gateway.upstream.relay import Relay, RelayObserver

log = structlog.get_logger("gateway.server")

# Who loaded a policy version, in the policy history: this host and process.
LOADED_BY = f"{socket.gethostname()[:200]} pid {os.getpid()}"


def build_relay(settings: Settings, observer: RelayObserver | None = None) -> Relay:
    upstream = settings.upstream
    mx_router = (
        MxRouter(
            port=upstream.mx_port,
            resolver=configured_resolver(upstream.nameservers, upstream.timeout),
        )
        if upstream.mode == "mx"
        else None
    )
    return Relay(upstream, settings.smtp.hostname, mx_router, observer)


class Services:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock,
        spawn: Spawn,
        worker: WorkerRole | None = None,  # one of `gateway serve --workers N`
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.clock = clock
        self.spawn = spawn
        self.metrics = Metrics()
        self.policies = PolicyStore(settings.policy_dir, settings.groups)
        self.reloader = Reloader(
            self.policies,
            self._after_reload,
            guard=self._blast_radius,
            before_guard=(
                self._share_inventory
                if worker is not None and settings.max_newly_blocked_devices is not None
                else None
            ),
        )
        self.last_good_reload = time.time()
        self.relay = build_relay(settings, self.metrics)
        # SQLite, or PostgreSQL by [store] url; shared by the workers of one supervisor.
        self.hold_store = async_store(settings, worker)
        # grace_hours: when each device was first seen matching, shared by every decision.
        self.first_seen = FirstSeenTimes(self.hold_store)
        self.inventory = Inventory(self.hold_store, settings.inventory_retention, clock)
        sender = settings.notice_sender or f"compliance-gateway@{settings.smtp.hostname}"
        self.notifier = (
            Notifier(self.hold_store, self.relay, sender, settings.smtp.hostname)
            if settings.notices
            else None
        )
        self.announcer = (
            Announcer(
                self.notifier,
                self.hold_store,
                self.inventory.devices,
                self.inventory.accesses_of,
                self.first_seen.known,
                clock,
                settings.announce_rate,
                overrides=lambda: self.policies.overrides,
            )
            if self.notifier is not None
            else None
        )
        sync = settings.sync
        self.mailbox_notices = (
            MailboxNotices(
                self.hold_store,
                LmtpDelivery(sync.lmtp, settings.smtp.hostname, sync.timeout),
                sender,
                settings.smtp.hostname,
                on_result=lambda phase, result: self.metrics.sync_notices.labels(
                    phase, result
                ).inc(),
            )
            if sync.enabled and sync.lmtp is not None
            else None
        )
        self.releaser = Releaser(
            self.hold_store,
            self.relay,
            self.policies,
            clock,
            settings.smtp.hostname,
            settings.hold.expire_after,
            spawn,
            on_released=self._released,
            parallel=settings.hold.release_concurrency,
            backoff=(settings.hold.retry_min, settings.hold.retry_max),
            claim_renewal=settings.store.claim_lease / 3,
            on_event=lambda event: self.metrics.release_events.labels(event).inc(),
            first_seen=self.first_seen,
        )
        if worker is not None:  # a restarted worker takes back its predecessor's claims
            self.releaser.instance = worker.releaser
        self.store_problem: str | None = None  # why the hold store cannot be written now
        self.keyring = KeyRing(settings.tokens.issuers)
        self.jwks = JwksRefresher(
            self.keyring,
            settings.tokens.issuers,
            on_fetch=lambda f: self.metrics.jwks_fetched(f.issuer, f.ok, f.keys),
        )
        # One verifier (and one cache of verified tokens) for SMTP AUTH and sync logins.
        self.verifier = TokenVerifier(settings.tokens, keyring=self.keyring)
        self.submission = Submission(
            settings,
            self.verifier,
            self.policies,
            self.relay,
            self.hold_store,
            events=self,
            clock=clock,
            metrics=self.metrics,
            jwks=self.jwks,
            first_seen=self.first_seen,
        )
        # Ends open IMAP/POP3 sessions after a reload that changes sync decisions; set by
        # the server when [sync] doveadm_url is (the doveadm HTTP API is an adapter).
        self.session_ender: SessionEnder | None = None
        self._in_force: CompiledPolicySet | None = None  # the set before the next reload
        self._fingerprints = Fingerprints()  # the policy history's, kept between reloads
        self.override_rows: list[PolicyOverride] = []  # the overrides in force, as stored
        self.logins = Logins(
            settings.sync,
            self.verifier,
            self.policies,
            clock=clock,
            metrics=self.metrics,
            events=self,
            jwks=self.jwks,
            first_seen=self.first_seen,
        )

    async def open(self) -> None:
        """Open the hold store (checked, and locked for this process), load the first policy
        set (raises when there is no good one: nothing serves without policies), and
        recall held mail and devices."""
        await self.hold_store.open()
        try:
            result = self.policies.reload(trigger="startup")
        except BaseException:
            await self.hold_store.close()  # release the store's lock for the next attempt
            raise
        log.info(
            "policies_loaded",
            version=result.version,
            policies=len(self.policies.current.source.policies),
        )
        self._in_force = self.policies.current
        await self.record_policy_version("startup")
        await self.releaser.start()
        if self.settings.store.postgres or self.worker is not None:
            # Other gateways' (or workers') holds, admin releases and override changes.
            self.spawn(self.hold_store.listen(self._store_notice), "store-notifications")
        await self.inventory.load()
        await self.refresh_overrides()
        self.spawn(self._watch_overrides(), "overrides")
        await self.measure_held()
        self.last_good_reload = time.time()
        if self.jwks.enabled:
            await self.jwks.start()
            self.spawn(self.jwks.run(), "jwks-refresh")

    async def reload_key_files(self) -> list[str]:
        """SIGHUP: read the issuers' key files again (through gateway.toml, so paths and
        environment overrides apply as at start). A file that fails keeps the keys in
        force; issuers themselves are added or removed by a restart only."""
        try:
            settings = await asyncio.to_thread(load_settings, self.settings.path)
        except SettingsError as exc:
            log.error("key_files_reload_failed", problems=[str(p) for p in exc.problems][:10])
            return []
        changed = self.keyring.replace_files(settings.tokens.issuers)
        log.info("key_files_reloaded", changed=changed)
        return changed

    async def tick(self) -> None:
        """The periodic pass: the store's write probe, expiry (its bounces go out in the
        same tick), retries and admin releases, the inventory flush."""
        await self.check_store()
        await self.refresh_overrides(prune=True)
        await self.releaser.expire()
        await self.releaser.run()
        await self.inventory.flush()
        await self.measure_held()
        if self.announcer is not None:
            self.spawn(self.announcer.sweep(self.policies.current), "announce")

    async def refresh_overrides(self, *, prune: bool = False) -> bool:
        """Read the operator overrides in force; when they changed (a suspension, an
        exemption, a resume, an expiry), act as after a reload: a release pass for held
        mail, and sync sessions ended where the login decision changes. A store that
        cannot be read keeps the overrides in force."""
        now = self.clock()
        try:
            if prune:
                await self.hold_store.prune_overrides(now)
            rows = await self.hold_store.policy_overrides(now)
        except HoldStoreError as exc:
            log.warning("policy_overrides_unavailable", error=str(exc))
            return False
        self.override_rows = rows
        before, after = self.policies.overrides, overrides_of(rows)
        if after == before:
            return False
        self.policies.overrides = after
        log.info(
            "policy_overrides_changed",
            suspended=sorted(after.suspended),
            exemptions=sorted(f"{p} {s}" for p, s in after.exempt),
        )
        if not self.policies.ready:
            return True
        self.spawn(self.releaser.run(), "release-after-override")
        if self.announcer is not None:  # a policy resumed announces to whom it now warns
            self.spawn(self.announcer.sweep(self.policies.current), "announce-after-override")
        if self.settings.sync.enabled:
            in_force = self.policies.current
            changes = sync_changes(
                in_force,
                in_force,
                self.inventory.devices(),
                now,
                self.inventory.accesses_of,
                self.settings.sync.hold,
                overrides=(before, after),
            )
            if changes:
                self._sync_changed(changes)
        return True

    async def _watch_overrides(self) -> None:
        """Pick up overrides written by another process (the CLI, another replica): they
        must act within seconds, so they are read every ``[gateway] overrides_poll_seconds``."""
        while True:
            await asyncio.sleep(self.settings.overrides_poll)
            await self.refresh_overrides()

    async def _share_inventory(self) -> None:
        """Before the reload guard counts devices, a worker writes the devices it saw and
        reads those every worker wrote (each flushes at its ticks), so that every worker
        judges a policy change by the same inventory."""
        try:
            await self.inventory.flush()
            await self.inventory.load()
        except HoldStoreError as exc:
            log.warning("inventory_refresh_failed", error=str(exc))

    async def measure_held(self) -> None:
        """The held-mail gauges, from one aggregate query."""
        stats = await self.hold_store.stats()
        self.metrics.held_now(stats.messages, stats.bytes, stats.oldest, self.clock())

    async def check_store(self) -> None:
        """Probe a write: readiness (/readyz) is off while the hold store cannot be
        written, since a hold would then be refused with 451."""
        try:
            await self.hold_store.probe_write(time.time())
        except HoldStoreError as exc:
            if self.store_problem is None:
                log.error("hold_store_not_writable", error=str(exc))
            self.store_problem = str(exc)
            self.metrics.hold_store_writable.set(0)
            return
        if self.store_problem is not None:
            log.info("hold_store_writable_again")
        self.store_problem = None
        self.metrics.hold_store_writable.set(1)

    @property
    def unready_reason(self) -> str | None:
        """Why the services cannot take mail as promised, or None."""
        if not self.policies.ready:
            return "starting"
        if self.store_problem is not None:
            return f"hold store cannot be written: {self.store_problem}"
        if self.releaser.fault is not None:
            return f"release of held mail stopped: {self.releaser.fault}"
        return None

    async def close(self) -> None:
        self.policies.close()
        await self.relay.close()
        try:
            await self.inventory.flush()
        except HoldStoreError as exc:  # the inventory is a cache: losing a flush is harmless
            log.warning("inventory_flush_failed", error=str(exc))
        await self.hold_store.close()

    def render_metrics(self) -> bytes:
        last = self.policies.last_result
        if last is not None:
            self.metrics.policy_in_force(
                self.policies.current.version, last.ok, self.last_good_reload
            )
        return self.metrics.render()

    # --- reload ---------------------------------------------------------------------------

    async def record_policy_version(self, trigger: str) -> None:
        """Keep the set now in force in the policy history (docs/admin.md, "Policy
        history"): once per version, however often and by however many gateways it is
        loaded. Its files are read again and kept only if they are still what was loaded.
        A store that cannot be written loses this entry, never the reload."""
        policy_set = self.policies.current.source
        directory = self.policies.directory
        try:
            snap = await asyncio.to_thread(
                lambda: snapshot(
                    policy_set, read_contents(policy_set, directory), self._fingerprints
                )
            )
            new = await self.hold_store.record_policy_version(
                snap, time.time(), trigger, LOADED_BY, KEEP_VERSIONS
            )
        except HoldStoreError as exc:
            log.warning("policy_history_not_recorded", version=policy_set.version, error=str(exc))
            return
        if new:
            log.info("policy_history_recorded", version=policy_set.version, trigger=trigger)

    async def _after_reload(self, result: ReloadResult) -> None:
        self.last_good_reload = time.time()
        # The sets on either side of this reload, taken before the first await: another
        # reload may apply while this one is recorded, and its own follow-up must then
        # compare against this one's set, not the one before it (a policy it deletes
        # would otherwise never be withdrawn).
        before = self._in_force
        after = self._in_force = self.policies.current
        # Recorded before the work below is spawned, which then starts once this returns.
        await self.record_policy_version(result.trigger)
        if self.announcer is not None and before is not None:
            active = {p.id for p in before.source.policies if p.is_active}
            self.announcer.deleted(p for p in result.diff.removed if p in active)
            self.spawn(self.announcer.sweep(self.policies.current), "announce")
        if not result.diff.is_empty:
            self.spawn(self.releaser.run(), "release-after-reload")
        if before is not None and self.settings.sync.enabled:
            overrides = self.policies.overrides
            changes = sync_changes(
                before,
                after,
                self.inventory.devices(),
                self.clock(),
                self.inventory.accesses_of,
                self.settings.sync.hold,
                overrides=(overrides, overrides),
            )
            if changes:
                self._sync_changed(changes)

    def _sync_changed(self, changes: list[SyncChange]) -> None:
        """Devices whose login would now open another mailbox (or none): their users'
        open sessions end, so the next login is decided by the set now in force."""
        log.info(
            "sync_decisions_changed",
            devices=len(changes),
            users=len({c.user for c in changes}),
            kick=self.session_ender is not None,
        )
        if self.session_ender is not None:
            users = {c.user for c in changes}
            self.spawn(self.session_ender.end_sessions(users), "sync-kick")
        if self.mailbox_notices is not None:
            withdrawn = [c for c in changes if c.withdrawn]
            if withdrawn:
                self.spawn(self._withdrawn_notices(withdrawn), "sync-notice")

    async def _withdrawn_notices(self, changes: list[SyncChange]) -> None:
        notices = self.mailbox_notices
        assert notices is not None
        reasons = {p.id: p.retracted_reason for p in self.policies.current.source.policies}
        now = self.clock()
        for change in changes:
            for policy_id in change.policy_ids:
                await notices.withdrawn(
                    change.user, change.device_id, policy_id, reasons.get(policy_id), now
                )

    def _blast_radius(
        self, live: CompiledPolicySet, candidate: CompiledPolicySet, diff: PolicyDiff
    ) -> str | None:
        limit = self.settings.max_newly_blocked_devices
        if limit is None:
            return None
        overrides = self.policies.overrides  # a suspended policy blocks nobody, before or after
        report = assess(
            live,
            candidate,
            self.inventory.devices(),
            self.clock(),
            accesses_of=self.inventory.accesses_of,
            overrides=(overrides, overrides),
        )
        return blast_radius_refusal(report, candidate, diff, limit)

    # --- SubmissionEvents -----------------------------------------------------------------

    def authenticated(self, claims: DeviceClaims) -> None:
        self.inventory.seen(claims, Access.SEND)
        self.releaser.device_authenticated(claims)

    # --- LoginEvents ----------------------------------------------------------------------

    def logged_in(self, claims: DeviceClaims) -> None:
        self.inventory.seen(claims, Access.SYNC)
        self.releaser.device_authenticated(claims)

    async def login_notices(self, claims: DeviceClaims, decision: Decision, mailbox: str) -> None:
        if self.mailbox_notices is not None:
            await self.mailbox_notices.at_login(claims, decision, mailbox, self.clock())

    async def before_mail(self, claims: DeviceClaims) -> None:
        await self.releaser.released_first(claims.device.id, self.settings.upstream.timeout)

    def decided(self, claims: DeviceClaims, decision: Decision) -> None:
        if self.notifier is not None and decision.action in (Action.WARN, Action.HOLD):
            self.spawn(self.notifier.decision_notices(claims, decision, self.clock()), "notice")

    def held(self, device_id: str) -> None:
        self.releaser.note_held(device_id)

    def _store_notice(self, payload: str) -> None:
        """Another gateway on the shared store held mail of a device (so this one releases
        it first when the device authenticates here), or an admin requested a release."""
        kind, _, device_id = payload.partition(" ")
        if kind == "held" and device_id:
            self.releaser.note_held(device_id)
        elif kind == "release":
            self.spawn(self.releaser.run(), "release-notified")
        elif kind == "overrides":
            self.spawn(self.refresh_overrides(), "overrides-notified")

    def _released(self, held: HeldMessage) -> None:
        if self.notifier is not None:
            self.spawn(self.notifier.released_notices(held, self.clock()), "notice")
