"""Relay to the upstream, in lock-step with the client (aiosmtplib).

The client's transaction is mirrored upstream as it happens: MAIL when the client says
MAIL (smarthost mode) or at the first recipient of a domain (MX mode), each RCPT when the
client says RCPT (so per-recipient refusals reach the client truthfully), and DATA after
the whole message has arrived. The client hears 250 only after every upstream said 250.
Mail that is already whole (released held mail, notices, bounces) goes in one call,
:meth:`Relay.deliver`.

Upstream trouble becomes a 4xx for the client (its message stays in the outbox); an
upstream 5xx is passed through. Connections are pooled per target and reused.

Every step's outcome (connect, MAIL, RCPT, DATA) is reported to the relay's observer, so
an upstream that refuses connections shows in the metrics as plainly as one that refuses
DATA (a full outage never reaches DATA: clients get 451 at MAIL FROM).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import aiosmtplib
import aiosmtplib.protocol
import structlog

from gateway import replies
from gateway.config.settings import Smarthost, UpstreamSettings
from gateway.replies import Reply

log = structlog.get_logger("gateway.relay")

_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
IDLE_CONNECTION_MAX_AGE = 30.0  # seconds an idle pooled connection is trusted
DATA_CHUNK = 256 * 1024  # bytes written to an upstream before waiting for it to drain
_LINE_ENDINGS_RE = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Target:
    """One upstream server to try."""

    host: str
    port: int
    tls: str = "none"  # none | starttls | tls | opportunistic (STARTTLS when offered)
    verify: bool = True
    ca_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_smarthost(cls, host: Smarthost) -> Target:
        return cls(
            host.host,
            host.port,
            host.tls,
            host.verify,
            str(host.ca_file) if host.ca_file else None,
            host.username,
            host.password,
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


_CONTROLS_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _bounded(text: str) -> str:
    """One line of an upstream's reply: controls as spaces, at most MAX_REPLY_TEXT long."""
    text = " ".join(_CONTROLS_RE.sub(" ", text).split())
    if len(text) > replies.MAX_REPLY_TEXT:
        text = text[: replies.MAX_REPLY_TEXT - 3] + "..."
    return text


def _without_enhanced(line: str, enhanced: str) -> str:
    found = _ENHANCED_RE.match(line)
    return line[found.end() :] if found and found.group(1) == enhanced else line


def upstream_reply(code: int, message: str) -> Reply:
    """An upstream's reply, re-stated for the client with an enhanced code.

    A multi-line reply (aiosmtplib joins its lines with newlines) stays multi-line, bounded
    to MAX_REPLY_LINES lines of MAX_REPLY_TEXT characters (RFC 5321 s 4.2.1, s 4.5.3.1.5):
    a site's 20 KB explanation must not become one 20 KB line for the client."""
    stripped = (_CONTROLS_RE.sub(" ", raw).strip() for raw in message.split("\n"))
    lines = [line for line in stripped if line] or [""]
    found = _ENHANCED_RE.match(lines[0])
    if found:
        enhanced = found.group(1)
        lines = [_without_enhanced(line, enhanced) for line in lines]
    else:
        enhanced = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
    if code == 421:
        # The upstream is closing *its* connection; ours with the client is fine, and a
        # 421 would close it (RFC 5321 s 3.8). Same meaning for the client: try later.
        code = 451
    if len(lines) > replies.MAX_REPLY_LINES:
        hidden = len(lines) - (replies.MAX_REPLY_LINES - 1)
        lines = [*lines[: replies.MAX_REPLY_LINES - 1], f"({hidden} more lines not shown)"]
    lines[0] = f"upstream: {lines[0]}" if lines[0] else "upstream refused"
    return Reply(code, enhanced, "\n".join(_bounded(line) for line in lines))


def _translate(exc: BaseException) -> Reply:
    """Map an aiosmtplib failure to what the client is told (never the exception text)."""
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return replies.UPSTREAM_LOST
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if 400 <= exc.code < 600:
            return upstream_reply(exc.code, exc.message)
        return replies.UPSTREAM_LOST
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPConnectTimeoutError | OSError):
        return replies.UPSTREAM_UNAVAILABLE
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return replies.UPSTREAM_TIMEOUT
    return replies.UPSTREAM_LOST


STAGES = ("connect", "mail", "rcpt", "data")
RESULTS = ("accepted", "4xx", "5xx", "failed")


def step_result(outcome: BaseException | Reply) -> str:
    """An upstream step's outcome as a metric label: ``accepted``, ``4xx`` or ``5xx`` (the
    upstream answered so), or ``failed`` (no answer: refused connection, timeout, lost
    connection, TLS failure)."""
    if isinstance(outcome, Reply):
        return "accepted" if outcome.is_success else f"{outcome.code // 100}xx"
    if isinstance(outcome, aiosmtplib.SMTPResponseException) and 400 <= outcome.code < 600:
        return f"{outcome.code // 100}xx"
    return "failed"


class RelayObserver(Protocol):
    """Hears each upstream step's outcome (the wiring counts them in metrics)."""

    def relay_step(self, stage: str, result: str, target: str | None) -> None:
        """``stage`` in STAGES, ``result`` in RESULTS; ``target`` is "host:port" of a
        configured smarthost, None for an MX host (unbounded: not reported per target)."""


class _NoObserver:
    def relay_step(self, stage: str, result: str, target: str | None) -> None:
        pass


Note = Callable[[str, Target, BaseException | Reply], None]


@dataclass
class _Pooled:
    client: aiosmtplib.SMTP
    idle_since: float


class UpstreamPool:
    """Idle upstream connections per target, reused across messages."""

    def __init__(self, settings: UpstreamSettings, local_hostname: str) -> None:
        self._settings = settings
        self._local_hostname = local_hostname
        self._idle: defaultdict[Target, list[_Pooled]] = defaultdict(list)
        self._closing: set[asyncio.Task[object]] = set()

    def _tls_context(self, target: Target) -> ssl.SSLContext | None:
        if target.tls == "none":
            return None
        context = ssl.create_default_context(cafile=target.ca_file)
        if not target.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def acquire(self, target: Target) -> tuple[aiosmtplib.SMTP, bool]:
        """A connected client for ``target``, and whether it came from the pool."""
        idle = self._idle[target]
        now = time.monotonic()
        while idle:
            pooled = idle.pop()
            if pooled.client.is_connected and now - pooled.idle_since < IDLE_CONNECTION_MAX_AGE:
                return pooled.client, True
            self._discard(pooled.client)
        client = aiosmtplib.SMTP(
            hostname=target.host,
            port=target.port,
            use_tls=target.tls == "tls",
            # True: STARTTLS required; None: aiosmtplib upgrades when the server offers it.
            start_tls=True
            if target.tls == "starttls"
            else None
            if target.tls == "opportunistic"
            else False,
            validate_certs=target.verify,
            tls_context=self._tls_context(target),
            timeout=self._settings.timeout,
            local_hostname=self._settings.helo_name or self._local_hostname,
        )
        await client.connect()
        if target.username:
            await client.login(target.username, target.password or "")
        return client, False

    def release(self, target: Target, client: aiosmtplib.SMTP, reusable: bool) -> None:
        idle = self._idle[target]
        if reusable and client.is_connected and len(idle) < self._settings.pool_size:
            idle.append(_Pooled(client, time.monotonic()))
        else:
            self._discard(client)

    def _discard(self, client: aiosmtplib.SMTP) -> None:
        if not client.is_connected:
            return
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            self._quit(client), name="upstream-quit"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(client: aiosmtplib.SMTP) -> None:
        try:
            await asyncio.wait_for(client.quit(), timeout=5)
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            client.close()

    async def close(self) -> None:
        for idle in self._idle.values():
            for pooled in idle:
                self._discard(pooled.client)
            idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


@dataclass
class Leg:
    """One upstream transaction: a connection on which MAIL FROM was accepted."""

    target: Target
    client: aiosmtplib.SMTP
    recipients: list[str] = field(default_factory=list)


Router = Callable[[str], Awaitable[Sequence[Target] | Reply]]
_NO_TARGET = Target("", 0)  # a step that failed before any target was chosen


class RelayTransaction:
    """Mirrors one client transaction upstream. Always end it with send() or abort()."""

    def __init__(
        self,
        pool: UpstreamPool,
        route: Router,
        sender: str,
        options: Sequence[str],
        note: Note | None = None,
    ) -> None:
        self._pool = pool
        self._route = route
        self._note: Note = note or (lambda stage, target, outcome: None)
        self._sender = sender
        self._options = list(options)
        self._legs: dict[tuple[Target, ...], Leg] = {}
        self.upstreams: list[str] = []

    async def open(self, recipient_domain: str = "") -> Reply:
        """Open (or find) the leg for a domain; for smarthosts, call once at MAIL."""
        targets = await self._route(recipient_domain)
        if isinstance(targets, Reply):  # no route (MX lookup failed): nothing to connect to
            self._note("connect", _NO_TARGET, targets)
            return targets
        key = tuple(targets)
        if key in self._legs:
            return replies.OK
        last: Reply = replies.UPSTREAM_UNAVAILABLE
        for target in targets:
            reply, leg = await self._open_leg(target)
            if leg is not None:
                self._legs[key] = leg
                self.upstreams.append(str(target))
                return reply
            last = reply
            if reply.code >= 500:  # a permanent refusal is the upstream's answer: no failover
                break
            log.warning("upstream_failover", upstream=str(target), reply=reply.line())
        return last

    async def _open_leg(self, target: Target) -> tuple[Reply, Leg | None]:
        for attempt in range(2):
            try:
                client, pooled = await self._pool.acquire(target)
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                self._note("connect", target, exc)
                return _translate(exc), None
            if not pooled:
                self._note("connect", target, replies.OK)
            try:
                response = await client.mail(self._sender, options=self._options)
            except aiosmtplib.SMTPServerDisconnected as exc:
                self._pool.release(target, client, reusable=False)
                if pooled and attempt == 0:
                    continue  # a stale pooled connection: try once with a fresh one
                self._note("mail", target, exc)
                return replies.UPSTREAM_LOST, None
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                self._note("mail", target, exc)
                self._pool.release(target, client, reusable=await _rset(client))
                return _translate(exc), None
            reply = upstream_reply(response.code, response.message)
            self._note("mail", target, reply)
            return reply, Leg(target, client)
        return replies.UPSTREAM_LOST, None

    async def add_recipient(self, recipient: str, domain_routing: bool) -> Reply:
        domain = recipient.rpartition("@")[2].lower()
        if domain_routing or not self._legs:
            opened = await self.open(domain)
            if not opened.is_success:
                return opened
        targets = await self._route(domain)
        if isinstance(targets, Reply):
            return targets
        leg = self._legs[tuple(targets)]
        try:
            response = await leg.client.rcpt(recipient)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            self._note("rcpt", leg.target, exc)
            return _translate(exc)
        leg.recipients.append(recipient)
        reply = upstream_reply(response.code, response.message)
        self._note("rcpt", leg.target, reply)
        return reply

    async def send(self, *parts: bytes | bytearray) -> Reply:
        """DATA on every leg with recipients; 250 only if every upstream said 250.

        The message is ``parts`` joined (the trace headers, then the client's buffer),
        with CRLF line endings only; it is streamed, never copied (:func:`send_data`)."""
        return _aggregate([reply for _, reply in await self.send_each(*parts)])

    async def send_each(self, *parts: bytes | bytearray) -> list[tuple[tuple[str, ...], Reply]]:
        """DATA on every leg with recipients: each leg's recipients with its reply (in MX
        mode one domain may accept what another refuses)."""
        outcomes: list[tuple[tuple[str, ...], Reply]] = []
        for leg in self._legs.values():
            if not leg.recipients:
                continue
            try:
                response = await send_data(leg.client, parts)
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                self._note("data", leg.target, exc)
                reply = _translate(exc)
                self._pool.release(leg.target, leg.client, reusable=False)
            else:
                reply = upstream_reply(response.code, response.message)
                self._note("data", leg.target, reply)
                self._pool.release(leg.target, leg.client, reusable=True)
            outcomes.append((tuple(leg.recipients), reply))
        self._legs.clear()
        return outcomes

    async def abort(self) -> None:
        """The client gave up (RSET, QUIT, disconnect, or a local decision): release cleanly."""
        for leg in self._legs.values():
            self._pool.release(leg.target, leg.client, reusable=await _rset(leg.client))
        self._legs.clear()


def _aggregate(leg_replies: Sequence[Reply]) -> Reply:
    """One reply for several legs: the first failure that ranks worst (a 4xx outranks a
    5xx: retry beats bounce), else the first success."""
    worst: Reply | None = None
    for reply in leg_replies:
        if not reply.is_success and (worst is None or reply.code < worst.code):
            worst = reply
    if worst is not None:
        return worst
    return next(iter(leg_replies), replies.UPSTREAM_LOST)


def dot_stuffed(parts: Sequence[bytes | bytearray]) -> Iterator[bytes | memoryview]:
    """The DATA stream of a message given in parts: dot-stuffed (RFC 5321 s 4.5.2), ended
    by CRLF and the lone dot; slices of the parts (at most DATA_CHUNK each), never a copy.
    The parts must use CRLF line endings only."""
    line_start = True
    for part in parts:
        if not part:
            continue
        view = memoryview(part)
        position = 0
        if line_start and part[0] == 0x2E:  # "."
            yield b"."
        while (found := part.find(b"\n.", position)) != -1:
            yield from _slices(view, position, found + 1)
            yield b"."
            position = found + 1
        yield from _slices(view, position, len(part))
        line_start = part[-1] == 0x0A  # "\n"
    if not line_start:
        yield b"\r\n"
    yield b".\r\n"


def _slices(view: memoryview, start: int, end: int) -> Iterator[memoryview]:
    for at in range(start, end, DATA_CHUNK):
        yield view[at : min(end, at + DATA_CHUNK)]


async def send_data(
    client: aiosmtplib.SMTP, parts: Sequence[bytes | bytearray]
) -> aiosmtplib.SMTPResponse:
    """DATA with the message streamed from the caller's buffers.

    aiosmtplib's ``data()`` takes one whole message and makes three more of it (line
    endings normalised, dots stuffed, the final dot appended) before the transport
    buffers a fourth: with big messages in flight that is what gets a gateway
    OOM-killed. Here slices of the parts are written and the transport is let drain
    whenever it is full. aiosmtplib has no public API for that, so this uses its
    protocol's own write, drain and read_response; tests/smtp/test_limits.py and every
    relay test run it against a real SMTP server."""
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    timeout = client.timeout
    # Keep a reply the upstream sends before the final dot (it may refuse mid-stream).
    protocol._response_pending = True
    if sum(len(part) for part in parts) <= DATA_CHUNK:
        _write(protocol, b"".join(dot_stuffed(parts)))  # small: one write is cheaper
    else:
        for piece in dot_stuffed(parts):
            _write(protocol, piece)
            async with asyncio.timeout(timeout):  # no progress for `timeout`: give up
                await protocol._drain_helper()
    response = await protocol.read_response(timeout=timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _write(protocol: aiosmtplib.protocol.SMTPProtocol, data: bytes | memoryview) -> None:
    transport = protocol.transport
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    cast(asyncio.WriteTransport, transport).write(data)


def crlf_only(content: bytes) -> bytes:
    """``content`` with bare CR and LF turned into CRLF (a copy only when there are any).
    Three counts (memchr speed) tell whether there are any: ten times faster than the
    regex on a 4 KiB message, which nearly always has none (DATA normalised it)."""
    pairs = content.count(b"\r\n")
    if content.count(b"\r") == pairs and content.count(b"\n") == pairs:
        return content
    return _LINE_ENDINGS_RE.sub(b"\r\n", content)


async def _rset(client: aiosmtplib.SMTP) -> bool:
    """RSET a connection so it can be pooled; False if it is not worth keeping."""
    try:
        await asyncio.wait_for(client.rset(), timeout=5)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        return False
    return True


@dataclass(frozen=True)
class Delivery:
    """What the upstream said to one whole message sent with :meth:`Relay.deliver`.

    ``mail`` is the reply to MAIL FROM (OK in MX mode, where MAIL goes per recipient
    domain and its refusal is that domain's recipients' refusal). ``accepted`` are the
    recipients the upstream accepted at RCPT; ``refused`` the others, each with the reply
    that refused it. ``data`` is the reply to DATA, None when DATA was not sent (MAIL
    refused, or no recipient accepted). When MAIL was refused no recipient was tried.
    """

    mail: Reply
    accepted: tuple[str, ...] = ()
    refused: tuple[tuple[str, Reply], ...] = ()
    data: Reply | None = None
    sent: tuple[tuple[tuple[str, ...], Reply], ...] = ()  # DATA's reply per upstream leg

    def per_recipient(self, recipients: Sequence[str]) -> dict[str, Reply]:
        """What happened to each recipient: its DATA reply if it was accepted at RCPT, its
        RCPT refusal otherwise, MAIL's refusal if MAIL was refused."""
        outcome = {recipient: self.mail for recipient in recipients}
        outcome.update(self.refused)
        for leg_recipients, reply in self.sent:
            outcome.update(dict.fromkeys(leg_recipients, reply))
        if self.data is not None and not self.sent:
            outcome.update(dict.fromkeys(self.accepted, self.data))
        return outcome

    @property
    def reply(self) -> Reply:
        """The message's outcome in one reply: DATA's when it was sent, else the last
        recipient's refusal, else MAIL's."""
        if self.data is not None:
            return self.data
        if self.refused:
            return self.refused[-1][1]
        return self.mail


class Relay:
    """Opens relay transactions towards the configured smarthosts or MX hosts."""

    def __init__(
        self,
        settings: UpstreamSettings,
        local_hostname: str,
        mx_router: Router | None = None,
        observer: RelayObserver | None = None,
    ) -> None:
        self.settings = settings
        self.pool = UpstreamPool(settings, local_hostname)
        self._smarthosts = tuple(Target.from_smarthost(h) for h in settings.smarthosts)
        self._mx_router = mx_router
        self.observer: RelayObserver = observer or _NoObserver()

    def _note(self, stage: str, target: Target, outcome: BaseException | Reply) -> None:
        """Report one step; MX hosts are not named (their number has no bound)."""
        name = str(target) if target in self._smarthosts else None
        self.observer.relay_step(stage, step_result(outcome), name)

    @property
    def routes_by_domain(self) -> bool:
        return self.settings.mode == "mx"

    async def _route(self, domain: str) -> Sequence[Target] | Reply:
        if self.routes_by_domain:
            assert self._mx_router is not None
            return await self._mx_router(domain)
        return self._smarthosts

    async def begin(self, sender: str, options: Sequence[str]) -> tuple[RelayTransaction, Reply]:
        transaction = RelayTransaction(self.pool, self._route, sender, options, self._note)
        if self.routes_by_domain:
            return transaction, replies.OK  # legs open per recipient domain
        return transaction, await transaction.open()

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        options: Sequence[str] = (),
    ) -> Delivery:
        """Send one whole message: MAIL (with ``options``), RCPT for each recipient (per
        domain in MX mode), DATA if any recipient was accepted. The transaction is always
        ended: sent, or aborted (also when this is cancelled before DATA)."""
        transaction, mail = await self.begin(sender, options)
        sending = False
        try:
            if not mail.is_success:
                return Delivery(mail)
            accepted: list[str] = []
            refused: list[tuple[str, Reply]] = []
            for recipient in recipients:
                reply = await transaction.add_recipient(recipient, self.routes_by_domain)
                if reply.is_success:
                    accepted.append(recipient)
                else:
                    refused.append((recipient, reply))
            if not accepted:
                return Delivery(mail, (), tuple(refused))
            sending = True  # from here send() ends the transaction (it releases every leg)
            sent = await transaction.send_each(crlf_only(content))
            data = _aggregate([reply for _, reply in sent])
            return Delivery(mail, tuple(accepted), tuple(refused), data, tuple(sent))
        finally:
            if not sending:
                await transaction.abort()

    async def close(self) -> None:
        await self.pool.close()
