"""Server lifecycle: start listeners on the running loop, serve, drain on shutdown.

startup   open the services (not ready before a good policy set; the hold store is
          opened and checked), bind listeners (submission with STARTTLS, optional
          implicit TLS, the admin port, the sync endpoint), start background tasks (policy watcher,
          periodic check, release/expiry ticker)
serve     until stop() (SIGTERM/SIGINT) ; SIGHUP reloads policies and key files
shutdown  stop accepting; let sessions in a transaction finish within the grace period;
          then answer 421 4.3.2 to everything still open and close; release upstreams.

What the gateway does lives in the services (services.py) and below; this module only
starts, serves and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway import __version__, replies
from gateway.admin.api import AdminApi, admin_apps
from gateway.admin.tokens import TokensFile
from gateway.config.settings import Endpoint, Settings
from gateway.domain import Clock, utc_now
from gateway.errors import HoldStoreError, ListenError
from gateway.limits import ConnectionLimits
from gateway.ops.admin_http import AdminServer
from gateway.ops.workers import WorkerRole, merge_metrics, scrape_workers
from gateway.policy.store import ReloadResult
from gateway.replies import Reply
from gateway.services import Services
from gateway.smtp.session import SubmissionSMTP
from gateway.sync.doveadm import DoveadmSessions
from gateway.sync.http import SyncServer

log = structlog.get_logger("gateway.server")


# TLS 1.3 session tickets per handshake (OpenSSL sends 2). Phones do not resume, and a
# ticket only resumes on the process that issued it (its key is per process, never shared
# across workers or replicas); issuing none saves 10-18 % of the server's CPU per handshake
# (bench/tls_tickets.py, docs/performance.md).
SESSION_TICKETS = 0


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    smtp = settings.smtp
    if smtp.tls_cert is None or smtp.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = SESSION_TICKETS
    context.load_cert_chain(str(smtp.tls_cert), str(smtp.tls_key))
    return context


METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Worker:
    """What a worker process of ``gateway serve --workers N`` gets from its supervisor:
    its role, and its own listening sockets (bound with SO_REUSEPORT, so the kernel
    spreads connections over the workers)."""

    role: WorkerRole
    channel: socket.socket  # to the supervisor: "listening", and its end when it exits
    submission: socket.socket
    implicit_tls: socket.socket | None


@dataclass(frozen=True)
class BoundAddresses:
    submission: Endpoint
    implicit_tls: Endpoint | None


class GatewayServer:
    """Everything `gateway serve` runs, startable and stoppable from tests."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = utc_now,
        release_tick: float | None = None,  # tests: instead of [hold] release_interval
        worker: Worker | None = None,  # one of `gateway serve --workers N`
    ) -> None:
        self.settings = settings
        self.release_tick = settings.hold.release_interval if release_tick is None else release_tick
        self._tasks: set[asyncio.Task[Any]] = set()
        self.worker = worker
        role = worker.role if worker is not None else None
        # Worker 0 (or the only process) serves the admin and sync ports and kicks IMAP
        # sessions; the others serve SMTP only, and their /metrics to worker 0.
        self.first = role is None or role.index == 0
        self.services = Services(settings, clock=clock, spawn=self.spawn, worker=role)
        self.worker_metrics = AdminServer({"/metrics": self._own_metrics})
        self.admin = AdminServer(
            {
                "/livez": self._livez,
                "/readyz": self._readyz,
                "/metrics": self._metrics,
                "/status": self._status,
            }
        )
        api, pages = admin_apps(self._admin_api(clock))
        self.admin.mount("/api/v1", api)
        self.admin.mount("/admin", pages)
        self.admin_port: int | None = None
        self.sync = SyncServer(self.services.logins, settings.sync)
        self.doveadm: DoveadmSessions | None = None
        if self.first and settings.sync.enabled and settings.sync.doveadm_url is not None:
            kicks = self.services.metrics.sync_kicks
            self.doveadm = DoveadmSessions(settings.sync, lambda r: kicks.labels(r).inc())
            self.services.session_ender = self.doveadm
        self.sync_port: int | None = None
        self.sessions: set[SubmissionSMTP] = set()
        limits = settings.limits
        self.connection_limits: ConnectionLimits[SubmissionSMTP] = ConnectionLimits(
            limits.max_connections,
            limits.max_connections_per_ip,
            limits.max_unauthenticated_connections,
            limits.pre_auth_timeout_under_load,
        )
        self._servers: list[asyncio.base_events.Server] = []
        self._stopped = asyncio.Event()
        self._background_stop = asyncio.Event()
        self.draining = False
        self.addresses: BoundAddresses | None = None

    def _admin_api(self, clock: Clock) -> AdminApi:
        services = self.services
        return AdminApi(
            hold_store=services.hold_store,
            settings=self.settings,
            inventory=services.inventory,
            policies=services.policies,
            releaser=services.releaser,
            clock=clock,
            hostname=self.settings.smtp.hostname,
            tokens=TokensFile(self.settings.admin_tokens_file),
            status=lambda: json.loads(self._status()[2]),
            spawn=self.spawn,
            blast_radius_limit=self.settings.max_newly_blocked_devices,
            overrides_changed=services.refresh_overrides,
            timeline=services.metrics.timeline,
        )

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

    async def reload(self, trigger: str) -> ReloadResult:
        return await self.services.reloader.reload(trigger)

    @property
    def ready(self) -> bool:
        return self.services.unready_reason is None and bool(self._servers) and not self.draining

    def _factory(self, tls_context: ssl.SSLContext | None, implicit_tls: bool) -> SubmissionSMTP:
        return SubmissionSMTP(
            self.services.submission,
            self.settings.smtp,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            tls_after_proxy=bool(self.settings.smtp.proxy_protocol_from),
            limits=self.settings.limits,
            on_open=self._session_opened,
            on_close=self._session_closed,
            on_activity=self._session_active,
            on_authenticated=self.connection_limits.authenticated,
        )

    async def start(self) -> BoundAddresses:
        await self.services.open()
        tls_context = server_tls_context(self.settings)
        smtp = self.settings.smtp
        if smtp.allow_plaintext_auth:
            log.warning("plaintext_auth_enabled", note="AUTH without TLS is for local testing only")
        worker = self.worker
        async with _binding(smtp.listen, "[smtp] listen"):
            # A worker's socket was bound by its supervisor (SO_REUSEPORT, one per worker).
            submission = await _listen(
                lambda: self._factory(tls_context, implicit_tls=False),
                smtp.listen,
                worker.submission if worker else None,
                None,
            )
        self._servers.append(submission)
        implicit: Endpoint | None = None
        if smtp.implicit_tls_listen is not None and tls_context is not None:
            # Behind a balancer the PROXY header precedes the TLS handshake: then the
            # sessions run the handshake themselves, after reading it.
            endpoint = smtp.implicit_tls_listen
            async with _binding(endpoint, "[smtp] implicit_tls_listen"):
                server = await _listen(
                    lambda: self._factory(tls_context, implicit_tls=True),
                    endpoint,
                    worker.implicit_tls if worker else None,
                    None if smtp.proxy_protocol_from else tls_context,
                )
            self._servers.append(server)
            implicit = _bound(server)
        self.addresses = BoundAddresses(_bound(submission), implicit)
        if worker is not None and not self.first:
            path = worker.role.metrics_path(worker.role.index)
            path.unlink(missing_ok=True)  # left by this worker's crashed predecessor
            await self.worker_metrics.start_unix(str(path))
        if not self.first:
            log.debug("admin_on_worker_0")  # worker 0 serves the admin port for all
        elif self.settings.admin_listen is not None:
            async with _binding(self.settings.admin_listen, "[admin] listen"):
                self.admin_port = await self.admin.start(
                    self.settings.admin_listen.host, self.settings.admin_listen.port
                )
            log.info(
                "admin_listening", admin=f"{self.settings.admin_listen.host}:{self.admin_port}"
            )
        else:
            # Said out loud: without it a container's health check and a pod's probes fail
            # and Prometheus scrapes nothing, with no other sign of why.
            log.warning(
                "admin_disabled",
                note="no [admin] section: no /livez or /readyz probes, no /metrics, no "
                'gateway status; add [admin] listen = "127.0.0.1:9587"',
            )
        sync = self.settings.sync
        if sync.enabled and self.first:
            async with _binding(sync.listen, "[sync] listen"):
                self.sync_port = await self.sync.start(sync.listen.host, sync.listen.port)
            log.info("sync_listening", sync=str(Endpoint(sync.listen.host, self.sync_port)))
        stop = self._background_stop
        reloader = self.services.reloader
        self.spawn(reloader.watch(stop), "policy-watch")
        self.spawn(reloader.poll(self.settings.reload_interval, stop), "policy-poll")
        self.spawn(self._release_ticker(), "release-ticker")
        if self.services.releaser.devices_with_mail:
            self.spawn(self.services.releaser.run(), "release-at-startup")
        log.info(  # the start-up event: what runs, from where, on which addresses
            "listening",
            version=__version__,
            pid=os.getpid(),
            config=str(self.settings.path),
            submission=str(self.addresses.submission),
            implicit_tls=str(implicit) if implicit else None,
            admin=f"{self.settings.admin_listen.host}:{self.admin_port}"
            if self.settings.admin_listen is not None and self.admin_port is not None
            else None,
            sync=str(Endpoint(sync.listen.host, self.sync_port)) if self.sync_port else None,
            policy_version=self.services.policies.current.version,
        )
        return self.addresses

    async def _release_ticker(self) -> None:
        while not self._background_stop.is_set():
            try:
                await asyncio.wait_for(self._background_stop.wait(), timeout=self.release_tick)
            except TimeoutError:
                try:
                    await self.services.tick()
                except HoldStoreError as exc:
                    # A full or failing disk must not end the ticker: try again next tick.
                    log.error("release_tick_failed", error=str(exc))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        """SIGHUP: policies and the issuers' key files are read again."""
        self.spawn(self.reload("sighup"), "reload-sighup")
        self.spawn(self.services.reload_key_files(), "reload-key-files")

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _session_opened(self, session: SubmissionSMTP) -> Reply | None:
        """Count the session in, or return why it is refused (421: too many). Admitting
        it may shed the longest-idle unauthenticated session (docs/operations.md#limits)."""
        metrics = self.services.metrics
        facts = session.gsession().facts
        admission = self.connection_limits.admit(session, facts.peer_ip, time.monotonic())
        if admission.refusal is not None:
            log.info("connection_refused", peer=facts.peer, reply=admission.refusal.line())
            metrics.limited.labels("connections").inc()
            return admission.refusal
        if admission.shed is not None:
            shed = admission.shed.gsession().facts
            log.info("idle_unauthenticated_shed", session=shed.session_id, peer=shed.peer)
            metrics.limited.labels("unauthenticated_shed").inc()
            admission.shed.close_with(replies.IDLE_UNAUTHENTICATED_SHED)
        self.sessions.add(session)
        metrics.sessions.inc()
        metrics.sessions_active.set(len(self.sessions))
        return None

    def _session_active(self, session: SubmissionSMTP) -> float | None:
        """An unauthenticated session sent a command; returns its idle timeout (shorter
        under load, None for the usual one)."""
        limits = self.connection_limits
        limits.active(session, time.monotonic())
        return limits.pre_auth_timeout()

    def _session_closed(self, session: SubmissionSMTP) -> None:
        self.sessions.discard(session)
        self.connection_limits.release(session)  # ignored for a refused or shed session
        self.services.metrics.sessions_active.set(len(self.sessions))

    def _livez(self) -> tuple[int, str, bytes]:
        return 200, "text/plain", b"ok\n"

    def _readyz(self) -> tuple[int, str, bytes]:
        if self.ready:
            version = self.services.policies.current.version
            return 200, "text/plain", f"ready {version}\n".encode()
        reason = (
            "draining"
            if self.draining
            else self.services.unready_reason or ("starting" if not self._servers else "")
        )
        return 503, "text/plain", f"not ready: {reason}\n".encode()

    def _status(self) -> tuple[int, str, bytes]:
        """What `gateway status` prints: readiness and the figures an admin asks for
        first, as JSON (schema 1, docs/cli.md)."""
        services = self.services
        registry = services.metrics.registry
        last = services.policies.last_result
        held = registry.get_sample_value("gateway_held_messages")
        upstreams = [  # the per-target upstream gauges, whatever /metrics carries
            {"metric": sample.name, "labels": dict(sample.labels), "value": sample.value}
            for family in registry.collect()
            if family.type == "gauge" and family.name.startswith("gateway_upstream")
            for sample in family.samples
        ]
        _, _, readiness = self._readyz()
        body = {
            "schema": 1,
            "version": __version__,
            "ready": self.ready,
            "readiness": readiness.decode().strip(),
            "policy_version": (
                services.policies.current.version if services.policies.ready else None
            ),
            "last_reload": {
                "ok": last.ok if last else None,
                "trigger": last.trigger if last else None,
                "last_success_at": datetime.fromtimestamp(
                    services.last_good_reload, UTC
                ).isoformat(),
            },
            "held_messages": None if held is None else int(held),
            "sessions_active": len(self.sessions),
            "upstreams": upstreams,
        }
        return 200, "application/json", json.dumps(body).encode()

    def _own_metrics(self) -> tuple[int, str, bytes]:
        return 200, METRICS_TYPE, self.services.render_metrics()

    async def _metrics(self) -> tuple[int, str, bytes]:
        """This process's metrics; with several workers, all of theirs, each sample
        labelled with its worker (gateway/ops/workers.py)."""
        if self.worker is None or self.worker.role.count == 1:
            return self._own_metrics()
        role = self.worker.role
        others = await scrape_workers(role)
        pages = [(role.index, self.services.render_metrics()), *others]
        return 200, METRICS_TYPE, merge_metrics(sorted(pages, key=lambda page: page[0]))

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
            await asyncio.wait_for(self.services.releaser.idle(), timeout=remaining)
        except TimeoutError:
            log.warning(
                "release_interrupted", note="messages in flight may be sent again after restart"
            )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sync.stop()
        await self.worker_metrics.stop()
        if self.doveadm is not None:
            await self.doveadm.close()
        await self.admin.stop()
        await self.services.close()
        log.info("stopped")


async def _listen(
    factory: Callable[[], SubmissionSMTP],
    endpoint: Endpoint,
    sock: socket.socket | None,
    tls: ssl.SSLContext | None,
) -> asyncio.base_events.Server:
    """A listener on ``endpoint``, or on the socket a worker's supervisor bound for it."""
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(factory, sock=sock, ssl=tls)
    return await loop.create_server(factory, endpoint.host, endpoint.port, ssl=tls)


def _bound(server: asyncio.base_events.Server) -> Endpoint:
    host, port = server.sockets[0].getsockname()[:2]
    return Endpoint(host, port)


@contextlib.asynccontextmanager
async def _binding(endpoint: Endpoint, setting: str) -> AsyncIterator[None]:
    """A listener that cannot bind becomes a ListenError naming the address and setting."""
    try:
        yield
    except OSError as exc:
        # asyncio's own text repeats the address; the errno's is the short reason.
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {endpoint} ({setting}): {reason}") from exc
