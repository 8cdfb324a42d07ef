"""Server lifecycle: start listeners on the running loop, serve, drain on shutdown.

startup   load settings-derived services, load policies (not ready before a good set),
          bind listeners (submission with STARTTLS, optional implicit TLS)
serve     until stop() (SIGTERM/SIGINT) ; SIGHUP reloads policies
shutdown  stop accepting; let sessions in a transaction finish within the grace period;
          then answer 421 4.3.2 to everything still open and close; release upstreams.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from dataclasses import dataclass

import structlog

from gateway import replies
from gateway.mx import MxRouter
from gateway.policy_store import PolicyStore, ReloadResult
from gateway.relay import Relay
from gateway.settings import Endpoint, Settings
from gateway.smtp.session import SubmissionSMTP
from gateway.submission import Clock, Holder, Submission, utc_now
from gateway.tokens.verify import TokenVerifier

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
        self, settings: Settings, *, clock: Clock = utc_now, holder: Holder | None = None
    ) -> None:
        self.settings = settings
        self.policies = PolicyStore(settings.policy_dir, settings.groups)
        mx_router = (
            MxRouter(port=settings.upstream.mx_port) if settings.upstream.mode == "mx" else None
        )
        self.relay = Relay(settings.upstream, settings.smtp.hostname, mx_router)
        self.submission = Submission(
            settings,
            TokenVerifier(settings.tokens),
            self.policies,
            self.relay,
            clock=clock,
            holder=holder,
        )
        self.sessions: set[SubmissionSMTP] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._stopped = asyncio.Event()
        self.draining = False
        self.addresses: BoundAddresses | None = None

    @property
    def ready(self) -> bool:
        return self.policies.ready and bool(self._servers) and not self.draining

    def _factory(self, tls_context: ssl.SSLContext | None, implicit_tls: bool) -> SubmissionSMTP:
        return SubmissionSMTP(
            self.submission,
            self.settings.smtp,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            on_open=self.sessions.add,
            on_close=self.sessions.discard,
        )

    async def start(self) -> BoundAddresses:
        result = self.policies.reload(trigger="startup")  # raises when no good set exists
        log.info(
            "policies_loaded",
            version=result.version,
            policies=len(self.policies.current.source.policies),
        )
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
        log.info(
            "listening",
            submission=str(self.addresses.submission),
            implicit_tls=str(implicit) if implicit else None,
        )
        return self.addresses

    def reload(self, trigger: str) -> ReloadResult:
        result = self.policies.reload(trigger)
        if result.ok:
            log.info(
                "policy_reload",
                trigger=trigger,
                version=result.version,
                added=list(result.diff.added),
                changed=list(result.diff.changed),
                retracted=list(result.diff.retracted),
                removed=list(result.diff.removed),
                seconds=round(result.duration_seconds, 4),
            )
        else:
            log.error(
                "policy_reload_failed",
                trigger=trigger,
                kept_version=result.version,
                problems=[str(p) for p in result.problems],
            )
        return result

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload("sighup"))

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

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
        await self.relay.close()
        log.info("stopped")


def _bound(server: asyncio.base_events.Server) -> Endpoint:
    host, port = server.sockets[0].getsockname()[:2]
    return Endpoint(host, port)
