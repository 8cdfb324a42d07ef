"""A fake upstream MTA on a free loopback port: records what it accepts, fails on request."""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class ReceivedMessage:
    sender: str
    recipients: tuple[str, ...]
    content: bytes  # exactly the bytes of the DATA phase, dot-unstuffed
    options: tuple[str, ...] = ()  # the MAIL FROM parameters (BODY=8BITMIME)

    @property
    def headers(self) -> str:
        return self.content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")


@dataclass
class Faults:
    """What the fake upstream should do wrong. Replies are full SMTP reply lines."""

    mail_reply: str | None = None  # e.g. "451 4.3.0 try later"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    data_reply: str | None = None  # e.g. "554 5.6.0 rejected"
    delay: float = 0.0  # seconds before answering DATA
    drop_after_data: bool = False  # close the connection instead of answering DATA
    delay_after_accept: float = 0.0  # record the message, then wait before the 250
    # Called with each message recorded, before the 250 (a test's moment to break something).
    on_accept: Callable[[ReceivedMessage], None] | None = None


class _Recorder:
    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.upstream.faults.mail_reply:
            return self.upstream.faults.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.upstream.faults.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.upstream.faults
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.drop_after_data:
            transport = server.transport
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            return "421 4.4.2 (never sent)"
        if faults.data_reply:
            return faults.data_reply
        sender = envelope.mail_from or ""
        self.upstream.messages.append(
            ReceivedMessage(
                "" if sender == "<>" else sender,
                tuple(envelope.rcpt_tos),
                envelope.original_content or b"",
                tuple(envelope.mail_options),
            )
        )
        self.upstream.received.set()
        if faults.on_accept is not None:
            faults.on_accept(self.upstream.messages[-1])
        if faults.delay_after_accept:
            await asyncio.sleep(faults.delay_after_accept)
        return f"250 2.0.0 queued as {len(self.upstream.messages)}"


class FakeUpstream:
    """Use ``async with FakeUpstream.running() as upstream``; read ``upstream.messages``."""

    def __init__(
        self, tls_context: ssl.SSLContext | None = None, implicit_tls: bool = False
    ) -> None:
        self.tls_context = tls_context  # STARTTLS offered with this context (or implicit TLS)
        self.implicit_tls = implicit_tls
        self.messages: list[ReceivedMessage] = []
        self.faults = Faults()
        self.received = asyncio.Event()
        self.connections = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def _factory(self) -> SMTP:
        self.connections += 1
        session = SMTP(
            _Recorder(self),
            hostname="upstream.test",
            data_size_limit=None,
            tls_context=None if self.implicit_tls else self.tls_context,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        return session

    async def start(self, host: str = "127.0.0.1") -> None:
        ssl_context = self.tls_context if self.implicit_tls else None
        self._server = await asyncio.get_running_loop().create_server(
            self._factory, host, 0, ssl=ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every open connection, as a server going down does.
        (From Python 3.12.1, Server.wait_closed() waits for open connections too: an idle
        pooled connection from the gateway would otherwise keep it waiting for ever.)"""
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
            await self._server.wait_closed()
            self._server = None

    @classmethod
    @asynccontextmanager
    async def running(
        cls, tls_context: ssl.SSLContext | None = None, implicit_tls: bool = False
    ) -> AsyncIterator[FakeUpstream]:
        upstream = cls(tls_context, implicit_tls)
        await upstream.start()
        try:
            yield upstream
        finally:
            await upstream.stop()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:  # noqa: ASYNC109
        """Wait until at least ``count`` messages arrived."""
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.received.clear()
                await self.received.wait()
        return self.messages

    def __repr__(self) -> str:
        return f"<FakeUpstream port={self.port} messages={len(self.messages)}>"
