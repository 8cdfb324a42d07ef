"""Server lifecycle: start listeners on the running loop, serve, drain on shutdown.

startup   load settings-derived services, load policies (not ready before a good set),
          open the hold store, bind listeners (submission with STARTTLS, optional
          implicit TLS), start background tasks (policy watcher, periodic check,
          release/expiry ticker)
serve     until stop() (SIGTERM/SIGINT) ; SIGHUP reloads policies
shutdown  stop accepting; let sessions in a transaction finish within the grace period;
          then answer 421 4.3.2 to everything still open and close; release upstreams.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from gateway import replies
from gateway.config.settings import Endpoint, Settings
from gateway.devices.notices import Notifier
from gateway.domain import Action, Clock, Decision, DeviceClaims, utc_now
from gateway.errors import HoldStoreError
from gateway.hold.release import Releaser
from gateway.hold.store import AsyncHoldStore, HeldMessage
from gateway.limits import ConnectionLimits
from gateway.ops.admin_http import AdminServer
from gateway.ops.metrics import Metrics
from gateway.policy.diff import PolicyDiff
from gateway.policy.engine import CompiledPolicySet
from gateway.policy.impact import assess, confirmed_impact
from gateway.policy.reload import Reloader
from gateway.policy.store import PolicyStore, ReloadResult
from gateway.replies import Reply
from gateway.smtp.session import SubmissionSMTP
from gateway.submission import Submission
from gateway.tokens.verify import TokenVerifier
from gateway.upstream.mx import MxRouter, configured_resolver
from gateway.upstream.relay import Relay

RELEASE_TICK = 5.0  # seconds between retry/expiry passes

log = structlog.get_logger("gateway.server")


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    smtp = settings.smtp
    if smtp.tls_cert is None or smtp.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(smtp.tls_cert), str(smtp.tls_key))
    return context


@dataclass(frozen=True)
class BoundAddresses:
    submission: Endpoint
    implicit_tls: Endpoint | None


class GatewayServer:
    """Everything `gateway serve` runs, startable and stoppable from tests."""

    def __init__(
        self, settings: Settings, *, clock: Clock = utc_now, release_tick: float = RELEASE_TICK
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.release_tick = release_tick
        self.policies = PolicyStore(settings.policy_dir, settings.groups)
        mx_router = (
            MxRouter(
                port=settings.upstream.mx_port,
                resolver=configured_resolver(
                    settings.upstream.nameservers, settings.upstream.timeout
                ),
            )
            if settings.upstream.mode == "mx"
            else None
        )
        self.relay = Relay(settings.upstream, settings.smtp.hostname, mx_router)
        self.hold_store = AsyncHoldStore(settings.hold.database)
        self.releaser = Releaser(
            self.hold_store,
            self.relay,
            self.policies,
            clock,
            settings.smtp.hostname,
            settings.hold.expire_after,
            parallel=settings.hold.release_concurrency,
        )
        self.metrics = Metrics()
        self.admin = AdminServer(
            {"/livez": self._livez, "/readyz": self._readyz, "/metrics": self._metrics}
        )
        self.admin_port: int | None = None
        sender = settings.notice_sender or f"compliance-gateway@{settings.smtp.hostname}"
        self.notifier = (
            Notifier(self.hold_store, self.relay, sender, settings.smtp.hostname)
            if settings.notices
            else None
        )
        self.releaser.on_released = self._notify_released
        self.reloader = Reloader(self.policies, self._after_reload, guard=self._blast_radius_guard)
        self.inventory: dict[str, DeviceClaims] = {}  # last claims per device, recently seen
        # Last claims per device since the last flush: a device that authenticates 100
        # times in 5 s is written once.
        self._inventory_pending: dict[str, tuple[DeviceClaims, float]] = {}
        self.submission = Submission(
            settings,
            TokenVerifier(settings.tokens),
            self.policies,
            self.relay,
            clock=clock,
            holder=self.hold_store,
            on_authenticated=self._device_authenticated,
            on_held=self.releaser.note_held,
            before_mail=self._released_first,
            on_decision=self._notify_decision,
            metrics=self.metrics,
        )
        self._device_releases: dict[str, asyncio.Task[Any]] = {}
        self.sessions: set[SubmissionSMTP] = set()
        self.connection_limits = ConnectionLimits(
            settings.limits.max_connections, settings.limits.max_connections_per_ip
        )
        self._servers: list[asyncio.base_events.Server] = []
        self._stopped = asyncio.Event()
        self._background_stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.addresses: BoundAddresses | None = None

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A named background task, kept referenced until it ends; failures are logged."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and (error := finished.exception()) is not None:
                log.error(
                    "background_task_failed", task=name, error=type(error).__name__, exc_info=error
                )

        task.add_done_callback(done)
        return task

    async def _after_reload(self, result: ReloadResult) -> None:
        self._last_good_reload = time.time()
        if result.ok and not result.diff.is_empty:
            self.spawn(self.releaser.run(), "release-after-reload")

    def _device_authenticated(self, claims: DeviceClaims) -> None:
        device_id = claims.device.id
        self.inventory[device_id] = claims
        self._inventory_pending[device_id] = (claims, self.clock().timestamp())
        if device_id in self.releaser.devices_with_mail:
            task = self.spawn(
                self.releaser.run(device_id=device_id, newer_claims=claims), "release-device"
            )
            self._device_releases[device_id] = task
            task.add_done_callback(lambda _: self._device_releases.pop(device_id, None))

    def _notify_decision(self, claims: DeviceClaims, decision: Decision) -> None:
        if self.notifier is None or decision.action not in (Action.WARN, Action.HOLD):
            return
        phase = decision.action.label
        for match in decision.matches:
            if match.action is decision.action:
                coroutine = self.notifier.notify(
                    claims.subject,
                    claims.device.id,
                    match.policy_id,
                    phase,
                    match.message,
                    self.clock(),
                )
                self.spawn(coroutine, "notice")

    def _notify_released(self, held: HeldMessage) -> None:
        if self.notifier is None:
            return
        text = (
            f"Mail held from your device {held.device_id} by policy {', '.join(held.policy_ids)} "
            "has now been sent: the device complies, or the policy was lifted."
        )
        for policy_id in held.policy_ids:
            self.spawn(
                self.notifier.notify(
                    held.user, held.device_id, policy_id, "released", text, self.clock()
                ),
                "notice",
            )

    async def _released_first(self, claims: DeviceClaims) -> None:
        """New mail waits (briefly) for the device's held mail being released: order kept."""
        task = self._device_releases.get(claims.device.id)
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=self.settings.upstream.timeout)
            except Exception:  # the release goes on in the background; the new mail proceeds
                log.warning("release_wait_abandoned", device_id=claims.device.id)

    async def _release_ticker(self) -> None:
        while not self._background_stop.is_set():
            try:
                await asyncio.wait_for(self._background_stop.wait(), timeout=self.release_tick)
            except TimeoutError:
                try:
                    await self.releaser.run()
                    await self.releaser.expire()
                    await self._flush_inventory()
                    self.metrics.held.set(await self.hold_store.count())
                except HoldStoreError as exc:
                    # A full or failing disk must not end the ticker: try again next tick.
                    log.error("release_tick_failed", error=str(exc))

    async def _flush_inventory(self) -> None:
        pending, self._inventory_pending = list(self._inventory_pending.values()), {}
        await self.hold_store.record_devices(pending)
        await self.hold_store.prune_devices(self.clock() - self.settings.inventory_retention)

    def _blast_radius_guard(
        self, live: CompiledPolicySet, candidate: CompiledPolicySet
    ) -> str | None:
        """Refuse a change that would newly hold or reject more devices than configured."""
        limit = self.settings.max_newly_blocked_devices
        if limit is None:
            return None
        report = assess(live, candidate, list(self.inventory.values()), self.clock())
        blocked = len(report.newly_blocked)
        if blocked <= limit:
            return None
        confirmed = confirmed_impact(candidate, PolicyDiff.between(live.source, candidate.source))
        if confirmed >= blocked:
            return None
        return (
            f"this change would newly hold or reject {blocked} devices (limit {limit}); "
            f"check with `gateway impact`, then set confirm_impact = {blocked} on the changed policy"
        )

    async def reload(self, trigger: str) -> ReloadResult:
        return await self.reloader.reload(trigger)

    @property
    def ready(self) -> bool:
        return self.policies.ready and bool(self._servers) and not self.draining

    def _factory(self, tls_context: ssl.SSLContext | None, implicit_tls: bool) -> SubmissionSMTP:
        return SubmissionSMTP(
            self.submission,
            self.settings.smtp,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            limits=self.settings.limits,
            on_open=self._session_opened,
            on_close=self._session_closed,
        )

    async def start(self) -> BoundAddresses:
        result = self.policies.reload(trigger="startup")  # raises when no good set exists
        log.info(
            "policies_loaded",
            version=result.version,
            policies=len(self.policies.current.source.policies),
        )
        await self.hold_store.open()
        await self.releaser.start()
        for claims in await self.hold_store.devices(
            self.clock() - self.settings.inventory_retention
        ):
            self.inventory[claims.device.id] = claims
        loop = asyncio.get_running_loop()
        tls_context = server_tls_context(self.settings)
        smtp = self.settings.smtp
        if smtp.allow_plaintext_auth:
            log.warning("plaintext_auth_enabled", note="AUTH without TLS is for local testing only")
        submission = await loop.create_server(
            lambda: self._factory(tls_context, implicit_tls=False),
            smtp.listen.host,
            smtp.listen.port,
        )
        self._servers.append(submission)
        implicit: Endpoint | None = None
        if smtp.implicit_tls_listen is not None and tls_context is not None:
            server = await loop.create_server(
                lambda: self._factory(tls_context, implicit_tls=True),
                smtp.implicit_tls_listen.host,
                smtp.implicit_tls_listen.port,
                ssl=tls_context,
            )
            self._servers.append(server)
            implicit = _bound(server)
        self.addresses = BoundAddresses(_bound(submission), implicit)
        if self.settings.admin_listen is not None:
            self.admin_port = await self.admin.start(
                self.settings.admin_listen.host, self.settings.admin_listen.port
            )
            log.info(
                "admin_listening", admin=f"{self.settings.admin_listen.host}:{self.admin_port}"
            )
        self._last_good_reload = time.time()
        stop = self._background_stop
        self.spawn(self.reloader.watch(stop), "policy-watch")
        self.spawn(self.reloader.poll(self.settings.reload_interval, stop), "policy-poll")
        self.spawn(self._release_ticker(), "release-ticker")
        if self.releaser.devices_with_mail:
            self.spawn(self.releaser.run(), "release-at-startup")
        log.info(
            "listening",
            submission=str(self.addresses.submission),
            implicit_tls=str(implicit) if implicit else None,
        )
        return self.addresses

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self.spawn(self.reload("sighup"), "reload-sighup")
        )

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _session_opened(self, session: SubmissionSMTP) -> Reply | None:
        """Count the session in, or return why it is refused (421: too many)."""
        refusal = self.connection_limits.admit(session.gsession().facts.peer_ip)
        if refusal is not None:
            log.info("connection_refused", peer=session.gsession().facts.peer, reply=refusal.line())
            self.metrics.limited.labels("connections").inc()
            return refusal
        self.sessions.add(session)
        self.metrics.sessions.inc()
        self.metrics.sessions_active.set(len(self.sessions))
        return None

    def _session_closed(self, session: SubmissionSMTP) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.connection_limits.release(session.gsession().facts.peer_ip)
        self.metrics.sessions_active.set(len(self.sessions))

    def _livez(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def _readyz(self) -> tuple[int, str, bytes]:
        if self.ready:
            return 200, "text/plain", f"ready {self.policies.current.version}\n".encode()
        reason = "draining" if self.draining else "starting"
        return 503, "text/plain", f"not ready: {reason}\n".encode()

    def _metrics(self) -> tuple[int, str, bytes]:
        last = self.policies.last_result
        if last is not None:
            self.metrics.policy_in_force(
                self.policies.current.version, last.ok, self._last_good_reload
            )
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()

    def _busy(self) -> bool:
        return any(session.in_transaction for session in self.sessions)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let transactions finish within ``grace``, then 421 the rest."""
        self.draining = True
        for server in self._servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + grace
        # A short poll over all sessions: simpler than an Event per session, and it only
        # runs during shutdown.
        while self._busy() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.close_with(replies.SHUTTING_DOWN)
        for server in self._servers:
            await server.wait_closed()
        self._background_stop.set()
        remaining = max(0.5, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self.releaser.idle(), timeout=remaining)
        except TimeoutError:
            log.warning(
                "release_interrupted", note="messages in flight may be sent again after restart"
            )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.admin.stop()
        await self.relay.close()
        try:
            await self._flush_inventory()
        except HoldStoreError as exc:  # the inventory is a cache: losing a flush is harmless
            log.warning("inventory_flush_failed", error=str(exc))
        await self.hold_store.close()
        log.info("stopped")


def _bound(server: asyncio.base_events.Server) -> Endpoint:
    host, port = server.sockets[0].getsockname()[:2]
    return Endpoint(host, port)
