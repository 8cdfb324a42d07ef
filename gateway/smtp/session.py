"""The SMTP session: aiosmtpd's protocol machinery, with our AUTH, EHLO and DATA.

This is the one module that imports aiosmtpd. It turns protocol events into facts, asks
:class:`gateway.submission.Submission` what to do, and writes the Reply it gets back.

What we take over from aiosmtpd, and why:
* EHLO: advertise AUTH only over TLS (or when plaintext AUTH is switched on, for tests),
  plus PIPELINING and ENHANCEDSTATUSCODES.
* AUTH: OAUTHBEARER / XOAUTH2 need their JSON error challenge before 535 (RFC 7628
  s 3.2.2), and real tokens exceed aiosmtpd's 512-byte command limit: AUTH lines get
  their own cap, beyond which the reply is 500 5.5.6 (RFC 4954 s 4).
* DATA: aiosmtpd passes bare CR and LF through; we refuse them (SMTP smuggling) or
  normalise them, keep the 1000-octet line limit (RFC 5321 s 4.5.3.1.6) although the
  reader's limit is raised for AUTH, and keep the idle timer from firing while a
  message is still arriving or being relayed.
* Timeouts answer 421 4.4.2 before closing; bare aiosmtpd replies get enhanced codes.
* STARTTLS: through the event loop's own ``start_tls`` (uvloop's native TLS under
  uvloop), not aiosmtpd's private asyncio SSL layer and its 256 KB zeroed buffer per
  connection; see :meth:`SubmissionSMTP.smtp_STARTTLS`.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import ipaddress
import re
import ssl
import time
from asyncio import sslproto
from base64 import b64decode, b64encode
from collections.abc import Callable, Iterator, Mapping
from typing import Any, AnyStr, NamedTuple, cast

import structlog
from aiosmtpd.smtp import (
    CALL_LIMIT_DEFAULT,
    SMTP,
    Envelope,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)

from gateway import replies
from gateway.config.settings import LimitSettings, SmtpSettings
from gateway.errors import ProxyHeaderError
from gateway.limits import Reservation
from gateway.replies import Reply, add_enhanced_code
from gateway.smtp import proxy_header
from gateway.smtp.proxy_header import ProxyHeader
from gateway.smtp.sasl import MECHANISMS, PARSERS, SaslSyntaxError, error_challenge
from gateway.submission import SessionFacts, Submission, Transaction, new_session_id

log = structlog.get_logger("gateway.smtp")

RFC5321_LINE_LIMIT = 1001  # 998 octets + CRLF, + 1 for a transparent (stuffed) dot
COMMAND_LIMIT = 512  # RFC 5321 s 4.5.3.1.4
TLS_HANDSHAKE_TIMEOUT = 60.0  # as asyncio's own, for the handshakes we start ourselves
_LINE_ENDINGS_RE = re.compile(rb"\r\n|\r|\n")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# <dot-atom@domain>, the shape of nearly every real address (RFC 5321 s 4.1.2).
_PLAIN_PATH_RE = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>(?:[ \t]+(?!\()(.*))?", re.DOTALL
)


def parse_plain_path(arg: str) -> tuple[str, str] | None:
    """(address, parameters) for a <dot-atom@domain> path; None for anything else."""
    found = _PLAIN_PATH_RE.fullmatch(arg.lstrip())
    return None if found is None else (found.group(1), found.group(2) or "")


class GatewaySession(Session):
    """aiosmtpd's Session plus our facts and the transaction in progress."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.facts = SessionFacts(session_id=new_session_id(), peer="")
        self.transaction: Transaction | None = None


class _Hooks:
    """aiosmtpd calls handler hooks; these hand the event to the session that owns it.
    Stateless: one instance (``_HOOKS``) serves every session."""

    async def handle_MAIL(
        self,
        server: SubmissionSMTP,
        session: GatewaySession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        return await server.on_mail(session, envelope, address, options)

    async def handle_RCPT(
        self,
        server: SubmissionSMTP,
        session: GatewaySession,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        return await server.on_rcpt(session, envelope, address)

    async def handle_RSET(
        self, server: SubmissionSMTP, session: GatewaySession, envelope: Envelope
    ) -> str:
        await server.end_transaction(session)
        return replies.OK.line()

    async def handle_exception(self, error: Exception) -> str:
        # Never show exception text to a client.
        log.error("session_error", error=type(error).__name__, exc_info=error)
        return replies.INTERNAL_ERROR.line()


_HOOKS = _Hooks()


class SubmissionSMTP(SMTP):
    """One client connection."""

    def __init__(
        self,
        submission: Submission,
        settings: SmtpSettings,
        *,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool = False,
        tls_after_proxy: bool = False,
        limits: LimitSettings | None = None,
        on_open: Callable[[SubmissionSMTP], Reply | None] | None = None,
        on_close: Callable[[SubmissionSMTP], None] | None = None,
        on_activity: Callable[[SubmissionSMTP], float | None] | None = None,
        on_authenticated: Callable[[SubmissionSMTP], None] | None = None,
    ) -> None:
        # The stream reader's limit must admit an AUTH line up to twice the cap, so that
        # we can read it whole and answer 500 5.5.6 rather than a generic error.
        self.line_length_limit = 2 * settings.max_auth_bytes + 64
        self._relaying = False  # set before aiosmtpd's __init__ evaluates our properties
        self.proxy: ProxyHeader | None = None  # is_tls reads it
        self._on_activity = on_activity  # used by _reset_timeout, which connection_made calls
        limits = limits or LimitSettings()
        self._init_protocol(
            settings, None if implicit_tls else tls_context, limits.command_call_limit
        )
        # aiosmtpd keeps these limits in a class-level dict that every instance mutates.
        self.command_size_limits = collections.defaultdict(
            lambda: COMMAND_LIMIT, {"AUTH": self.line_length_limit, "MAIL": COMMAND_LIMIT + 26}
        )
        self.submission = submission
        self.settings = settings
        self._implicit_tls = implicit_tls
        # Implicit TLS on a listener that reads PROXY headers: the handshake is ours to run,
        # after the header (docs/operations.md#behind-a-load-balancer).
        self._handshake_context = tls_context if implicit_tls and tls_after_proxy else None
        self._on_open = on_open
        self._on_close = on_close
        self._on_authenticated = on_authenticated
        self._last_timer_reset = 0.0
        self._idle_deadline = 0.0  # loop time: when the session times out (_reset_timeout)
        self._max_errors = limits.max_errors
        self._errors = 0
        self._refusal: Reply | None = None  # set by on_open: a limit refuses the connection
        self._awaiting_proxy = False  # from a balancer: admitted once its PROXY header is read
        self._lost = False

    def _init_protocol(
        self,
        settings: SmtpSettings,
        tls_context: ssl.SSLContext | None,
        command_call_limit: int | dict[str, int],
    ) -> None:
        """What aiosmtpd's ``SMTP.__init__`` (1.4) sets up, for the one configuration used
        here, without its per-connection introspection: it runs ``inspect.getmembers`` and
        ``dir()`` over the session and its handler on every connection to find its
        ``smtp_*``, ``auth_*`` and ``handle_*`` methods, which are the same for every
        instance of the class (4 % of a phone's one-message connection). The names are
        found once per class and bound here. ``tests/smtp/test_session_init.py`` checks
        that the result is what aiosmtpd's own ``__init__`` makes of the same arguments."""
        loop = asyncio.get_running_loop()
        self.__ident__ = "Compliance Gateway ESMTP"
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = _HOOKS
        self.data_size_limit = settings.max_message_size
        self.enable_SMTPUTF8 = False
        self._decode_data = False
        self.hostname = settings.hostname
        self.tls_context = tls_context
        self.require_starttls = None if tls_context is None else False
        self._timeout_duration = settings.idle_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True  # unused: smtp_AUTH and smtp_EHLO below decide
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = True
        names = _method_names(type(self))
        # aiosmtpd declares dicts; it only reads them (get, in, [], keys, items).
        self._auth_methods = _BoundOnLookup(  # type: ignore[assignment]
            self, names.auth, lambda method: _AuthMechAttr(method, True)
        )
        self._handle_hooks = names.hooks  # bound to the one shared handler already
        self._ehlo_hook_ver = None
        self._smtp_methods = _BoundOnLookup(self, names.smtp)  # type: ignore[assignment]
        # 421 4.7.0 and close past the limit: one for every command, or a table.
        self._enforce_call_limit = True
        if isinstance(command_call_limit, int):
            self._call_limit_base = {}
            self._call_limit_default = command_call_limit
        else:
            self._call_limit_base = command_call_limit
            self._call_limit_default = command_call_limit.get("*", CALL_LIMIT_DEFAULT)

    # --- connection lifecycle -----------------------------------------------------------

    def _create_session(self) -> GatewaySession:
        return GatewaySession(self.loop)

    # A method, not a property: aiosmtpd's __init__ evaluates every property via
    # inspect.getmembers(self), before any session exists.
    def gsession(self) -> GatewaySession:
        assert isinstance(self.session, GatewaySession)
        return self.session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        facts = self.gsession().facts
        peer = transport.get_extra_info("peername")
        facts.peer = f"[{peer[0]}]:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        facts.peer_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        facts.tls = self.is_tls
        if not first:  # after STARTTLS: a new session (RFC 3207 s 4.2), the same client
            self._use_proxied_address()
        elif _from_balancer(facts.peer_ip, self.settings):
            self._awaiting_proxy = True  # _handle_client reads the header, then admits
        elif self._handshake_context is None:
            self._admit()

    def _admit(self) -> None:
        """Count the session in the connection limits, under the address it now has."""
        if self._on_open:
            self._refusal = self._on_open(self)
            if self._refusal is None:
                self._reset_timeout()  # now counted: the pre-AUTH timeout may be shorter

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:
            return  # a failed STARTTLS handshake can report the loss twice
        self._lost = True
        session = self.session
        super().connection_lost(error)
        # asyncio's StreamReaderProtocol keeps a reset in its ``_closed`` future, which
        # only its __del__ retrieves; when the session outlives the connection (a relay
        # finishing after the client reset), the future can be collected first and
        # asyncio logs "Future exception was never retrieved". Nobody waits on it here.
        closed = getattr(self, "_closed", None)
        if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
            closed.exception()
        if isinstance(session, GatewaySession) and session.transaction is not None:
            transaction, session.transaction = session.transaction, None
            task = self.loop.create_task(
                self.submission.abort(transaction), name="abort-transaction"
            )
            _background.add(task)
            task.add_done_callback(_background.discard)
        if self._on_close:
            self._on_close(self)

    async def _handle_client(self) -> None:
        """Read a balancer's PROXY header; refuse over-limit connections and clients that
        talk before the greeting; then aiosmtpd's command loop."""
        if self._awaiting_proxy and not await self._accept_proxy_header():
            return
        if self._handshake_context is not None and not await self._start_tls(
            self._handshake_context
        ):
            return
        if self._awaiting_proxy or self._handshake_context is not None:
            self._admit()
        if self._refusal is not None:
            await self.write_reply(self._refusal)
            self._close()
            return
        if self.settings.greeting_delay:
            await asyncio.sleep(self.settings.greeting_delay)
        if await self._refuse_early_input("early_talker"):
            return
        try:
            await super()._handle_client()
        except ConnectionError:
            # aiosmtpd re-raises a reset (from a drain, or from DATA's reader) out of its
            # task, which nobody awaits: asyncio would log "Task exception was never
            # retrieved". The client is gone; connection_lost has already cleaned up.
            log.info("client_gone", session=self.gsession().facts.session_id)

    async def _accept_proxy_header(self) -> bool:
        """Read the PROXY header within ``proxy_protocol_timeout``; from then on the
        session is the client's, not the balancer's (unless it is the balancer's own
        LOCAL connection). Without a valid header: log, count, close without a word."""
        facts = self.gsession().facts
        try:
            async with asyncio.timeout(self.settings.proxy_protocol_timeout):
                header = await self._read_proxy_header()
        except (ProxyHeaderError, TimeoutError, asyncio.IncompleteReadError) as exc:
            reason = (
                exc.reason
                if isinstance(exc, ProxyHeaderError)
                else "timeout"
                if isinstance(exc, TimeoutError)
                else "closed"
            )
            log.info(
                "proxy_header_refused", session=facts.session_id, balancer=facts.peer, reason=reason
            )
            self.submission.proxy_header_refused(reason)
            self._close()
            return False
        self.proxy = header
        if header.source is not None:
            log.debug(
                "proxied", session=facts.session_id, balancer=facts.peer, client=header.source[0]
            )
        self._use_proxied_address()
        return True

    def _use_proxied_address(self) -> None:
        """From now on the session is the client's the PROXY header named, if one did."""
        if self.proxy is None:
            return
        facts = self.gsession().facts
        facts.tls = self.is_tls  # TLS ended at the balancer counts (PP2_TYPE_SSL)
        if self.proxy.source is None:  # LOCAL: the balancer's own connection
            return
        ip, port = self.proxy.source
        facts.peer = f"[{ip}]:{port}"
        facts.peer_ip = ip
        self.gsession().peer = (ip, port)  # type: ignore[assignment]  # a tuple really

    async def _start_tls(self, context: ssl.SSLContext) -> bool:
        """Implicit TLS started by us rather than by the listener, because a PROXY header
        comes first: aiosmtpd's own STARTTLS switch (smtp_STARTTLS), plus the bytes of the
        client's handshake already read along with the header."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        early, transport = bytes(buffer), self.transport
        buffer.clear()
        assert transport is not None
        waiter = self.loop.create_future()
        tls = sslproto.SSLProtocol(self.loop, self, context, waiter, server_side=True)
        self._tls_protocol = tls
        self._original_transport = transport
        transport.set_protocol(tls)
        self.transport = tls._app_transport
        tls.connection_made(transport)
        if early:
            _feed(tls, early)
        try:
            async with asyncio.timeout(TLS_HANDSHAKE_TIMEOUT):
                await waiter
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            facts = self.gsession().facts
            log.info(
                "tls_handshake_failed",
                session=facts.session_id,
                peer=facts.peer,
                error=type(exc).__name__,
            )
            self._close()
            return False
        return True

    async def _read_proxy_header(self) -> ProxyHeader:
        """Exactly the header's bytes, so that anything after it stays for the
        early-talker check; v1 lines are read a byte at a time up to their bound."""
        reader = self._reader
        prefix = await reader.readexactly(proxy_header.PREFIX_LENGTH)
        if proxy_header.version_of(prefix) == 2:
            fixed = prefix + await reader.readexactly(
                proxy_header.V2_FIXED_LENGTH - proxy_header.PREFIX_LENGTH
            )
            body = await reader.readexactly(proxy_header.v2_body_length(fixed))
            return proxy_header.parse_v2(fixed, body)
        line = prefix
        while not line.endswith(b"\n") and len(line) < proxy_header.V1_MAX_LENGTH:
            line += await reader.readexactly(1)
        return proxy_header.parse_v1(line)

    def _pending_input(self) -> int:
        """Bytes received but not yet read. StreamReader has no public way to ask; aiosmtpd
        itself uses the same attribute to discard input pipelined across STARTTLS."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return len(buffer)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd parses every address with the email package's header parser and
        defines a class on each call: a fifth of a relay's CPU. Plain <dot-atom@domain>
        paths take a regex; anything else (quoted local parts, literals, source routes)
        goes to aiosmtpd's parser. tests/smtp/test_addresses.py checks they agree."""
        plain = parse_plain_path(arg)
        if plain is None:
            return super()._getaddr(arg)
        return plain

    def _reset_envelope(self) -> None:
        self._set_post_data_state()  # type: ignore[no-untyped-call]  # untyped in aiosmtpd

    @property
    def is_tls(self) -> bool:
        """TLS with us, or with the balancer that says so in its PROXY header (TLS
        terminated there: docs/operations.md#behind-a-load-balancer)."""
        if self._tls_protocol is not None or (self.proxy is not None and self.proxy.client_tls):
            return True
        return (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None
        )

    @property
    def in_transaction(self) -> bool:
        """A message is being composed or relayed: shutdown waits for it (up to its grace)."""
        if self._relaying:
            return True
        return isinstance(self.session, GatewaySession) and self.session.transaction is not None

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd calls this after every command line. Before AUTH it also tells the
        connection limits the session is active, and uses the idle timeout they give
        (shorter under load); DATA's and the relay's own timeouts pass a duration.

        aiosmtpd cancels its timer and starts a new one each time. Here the timer stays
        when it would fire no later than the new deadline: it then finds the deadline
        moved and waits on (``_idle_timer``), so a command costs no timer handle."""
        session = self.session
        if (
            duration is None
            and self._on_activity is not None
            and isinstance(session, GatewaySession)
            and not session.authenticated
        ):
            duration = self._on_activity(self)
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        timer = self._timeout_handle
        if timer is not None:
            if not timer.cancelled() and timer.when() <= deadline:
                return
            timer.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        if self.loop.time() < self._idle_deadline:  # moved since the timer was set
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("idle_timeout", session=self.gsession().facts.session_id)
        self.close_with(replies.IDLE_TIMEOUT)

    def close_with(self, reply: Reply) -> None:
        """Say why (421) and close; used by timeouts and shutdown."""
        if self.transport is None or self.transport.is_closing():
            return
        # A TLS transport can be half torn down already: then there is nobody to tell.
        with contextlib.suppress(RuntimeError, OSError, AttributeError):
            self._writer.write(reply.line().encode() + b"\r\n")
        self.transport.close()

    def _can_write(self) -> bool:
        """Whether a reply can still go out. A reset (RST) closes the transport before
        connection_lost cancels this task, so a reply computed in between (the answer to
        the dot, typically) finds it closed: asyncio's transport drops the write, uvloop's
        raises RuntimeError, which aiosmtpd's error path then meets again while pushing
        its 500, and the task ends in "Task exception was never retrieved". There is
        nobody left to tell, so the reply is dropped."""
        transport = self.transport
        return transport is not None and not transport.is_closing()

    async def _write(self, data: bytes) -> None:
        """Every byte the session sends goes through here (or :meth:`push`)."""
        if not self._can_write():
            return
        self._writer.write(data)
        await self._writer.drain()

    async def push(self, status: AnyStr) -> None:
        line = (
            add_enhanced_code(status)
            if isinstance(status, str)
            else status.decode("ascii", "replace")
        )
        if not self._can_write():
            log.info("reply_dropped", session=self.gsession().facts.session_id, code=line[:3])
            return
        await super().push(line)
        if line.startswith("421"):
            self._close()  # RFC 5321 s 3.8: 421 closes the channel
        elif line.startswith("5") and self.transport is not None:
            self._errors += 1
            if self._errors >= self._max_errors:
                log.info("too_many_errors", session=self.gsession().facts.session_id)
                self.submission.limit_refused("max_errors")
                await self.write_reply(replies.TOO_MANY_ERRORS)

    async def write_reply(self, reply: Reply) -> None:
        await self.push(reply.wire())

    # --- greeting and EHLO --------------------------------------------------------------

    async def _refuse_early_input(self, event: str) -> bool:
        """Input waiting before the greeting, or behind HELO/EHLO (RFC 2920 s 3.1: nothing
        may follow EHLO in a group, and before its reply a client cannot know that we
        pipeline), is an attack or a broken client: 554 5.5.0 and close."""
        if not self._pending_input():
            return False
        log.info(event, session=self.gsession().facts.session_id)
        await self.write_reply(replies.EARLY_TALKER)
        self._close()
        return True

    async def _greeted(self, command: str, hostname: str, *, extended: bool) -> bool:
        """What HELO and EHLO share: syntax, early input, and a fresh start."""
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {command} hostname")
            return False
        if await self._refuse_early_input("pipelined_greeting"):
            return False
        session = self.gsession()
        await self.end_transaction(session)
        self._reset_envelope()
        session.extended_smtp = extended
        session.host_name = hostname
        session.facts.helo = hostname
        return True

    async def smtp_HELO(self, hostname: str) -> None:
        if await self._greeted("HELO", hostname, extended=False):
            await self._write_lines([f"250 {self.hostname}"])

    async def smtp_EHLO(self, hostname: str) -> None:
        if not await self._greeted("EHLO", hostname, extended=True):
            return
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context and not self.is_tls:
            lines.append("STARTTLS")
        if self.is_tls or self.settings.allow_plaintext_auth:
            lines.append("AUTH " + " ".join(MECHANISMS))
        lines.append("HELP")
        await self._write_lines([f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"])

    async def _write_lines(self, lines: list[str]) -> None:
        await self._write("".join(f"{line}\r\n" for line in lines).encode())

    # --- STARTTLS (RFC 3207) ------------------------------------------------------------

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """Upgrade through ``loop.start_tls``: uvloop's TLS costs ~50 KB per idle
        session where aiosmtpd's own upgrade (asyncio's pure-Python SSL layer) costs ~300 KB.

        Order matters. Plaintext the client pipelined behind STARTTLS is discarded
        *before* the handshake starts (RFC 3207 s 4.2; CVE-2011-0411): the session
        cannot await between that and ``start_tls``, so nothing unread is left, and later
        plaintext reaches the TLS layer, where it fails the handshake. Nothing is
        discarded *after* the handshake: a command the client sends right after its
        Finished message may already be in the reader, and it is a real command."""
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.is_tls:
            await self.push("454 4.7.0 TLS not available")  # RFC 3207 s 4: or already on
            return
        await self.end_transaction(self.gsession())  # none survives the upgrade
        await self.push("220 Ready to start TLS")
        if self.transport is None or self.transport.is_closing():
            return
        self._reader._buffer.clear()  # type: ignore[attr-defined]  # the injection, if any
        try:
            transport = await self.loop.start_tls(
                cast(asyncio.WriteTransport, self.transport),
                self,
                self.tls_context,
                server_side=True,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error  # aiosmtpd's loop closes the session
        if transport is None:  # typeshed allows it; a server-side upgrade never returns it
            raise TLSSetupException()
        previous = self.gsession().facts
        self.transport = transport
        self._reader._transport = transport  # type: ignore[attr-defined]  # flow control
        self._writer._transport = transport  # type: ignore[attr-defined]
        self._over_ssl = True  # StreamReaderProtocol: EOF closes the transport itself
        # RFC 3207 s 4.2: forget everything the client told us; keep what we know.
        self._set_rset_state()  # type: ignore[no-untyped-call]  # untyped in aiosmtpd
        session = self.session = self._create_session()
        session.peer = transport.get_extra_info("peername")
        session.ssl = {
            key: transport.get_extra_info(key) for key in ("peercert", "cipher", "ssl_object")
        }
        session.facts = SessionFacts(
            session_id=previous.session_id, peer=previous.peer, peer_ip=previous.peer_ip
        )
        session.facts.tls = True
        self._use_proxied_address()  # behind a balancer: still the phone's address
        self._reset_timeout()

    # --- AUTH ---------------------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        session = self.gsession()
        if not session.host_name or not session.extended_smtp:
            await self.write_reply(replies.NEED_EHLO)
            return
        if not self.is_tls and not self.settings.allow_plaintext_auth:
            await self.write_reply(replies.AUTH_NEEDS_TLS)
            return
        if session.authenticated:
            await self.write_reply(replies.AUTH_ALREADY)
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        if len(arg) > self.settings.max_auth_bytes:
            await self.write_reply(replies.AUTH_TOO_LONG)
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            await self.write_reply(replies.AUTH_UNKNOWN_MECHANISM)
            return
        if " " in initial.strip():
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        if initial:
            data = b"" if initial == "=" else self._decode(initial)
            if data is None:
                await self._auth_failed(replies.AUTH_BAD_BASE64)
                return
        else:
            response = await self._challenge(b"")
            if isinstance(response, Reply):
                if response is replies.AUTH_ABORTED:
                    await self.write_reply(response)  # RFC 4954 s 4: no failure, no delay
                else:
                    await self._auth_failed(response)
                return
            data = response
        try:
            credentials = PARSERS[mechanism](data)
        except SaslSyntaxError as exc:
            log.info(
                "auth_syntax",
                session=session.facts.session_id,
                mechanism=mechanism,
                detail=str(exc),
            )
            await self._auth_failed(replies.AUTH_BAD_SYNTAX)
            return
        await self.submission.learn_key(credentials)
        outcome = self.submission.authenticate(session.facts, credentials)
        if outcome.claims is None:
            challenge = error_challenge(mechanism, self.submission.audience)
            if challenge is not None:
                # RFC 7628 s 3.2.3: the client answers the error challenge with a dummy
                # response (^A), and only then gets the final 535.
                answer = await self._challenge(challenge)
                if isinstance(answer, Reply) and answer is replies.AUTH_TOO_LONG:
                    await self._auth_failed(answer)
                    return
            await self._auth_failed(outcome.reply)
            return
        session.authenticated = True
        if self._on_authenticated is not None:
            self._on_authenticated(self)
        self._reset_timeout()  # the usual idle timeout from now on, not the pre-AUTH one
        await self.write_reply(outcome.reply)

    async def _auth_failed(self, reply: Reply) -> None:
        """Answer a failed AUTH after the session's growing delay; after too many failures
        in this session, 421 4.7.0 follows and the session closes. Only this session
        waits: other clients behind the same address are not slowed down."""
        penalty = self.submission.auth_failure(self.gsession().facts)
        if penalty.delay > 0:
            await asyncio.sleep(penalty.delay)
        if self.transport is None or self.transport.is_closing():
            return
        await self.write_reply(reply)
        transport = self.transport  # the reply may have closed it (max_errors)
        if penalty.close is not None and transport is not None and not transport.is_closing():
            await self.write_reply(penalty.close)  # a 421: push() closes the connection

    @staticmethod
    def _decode(text: str) -> bytes | None:
        try:
            return b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None

    async def _challenge(self, challenge: bytes) -> bytes | Reply:
        """Send ``334 <base64>``; read and decode the client's one-line answer."""
        await self._write(b"334 " + b64encode(challenge) + b"\r\n")
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._discard_line(exc.consumed)
            return replies.AUTH_TOO_LONG
        blob = line.strip()
        if len(blob) > self.settings.max_auth_bytes:
            return replies.AUTH_TOO_LONG
        if blob == b"*":  # RFC 4954 s 4: the client cancels
            return replies.AUTH_ABORTED
        decoded = self._decode(blob.decode("ascii", "replace"))
        return replies.AUTH_BAD_BASE64 if decoded is None else decoded

    async def _discard_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    # --- MAIL / RCPT (called through _Hooks after aiosmtpd parsed the command) ----------

    async def on_mail(
        self, session: GatewaySession, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = "" if address == "<>" else address
        reply, transaction = await self.submission.mail(session.facts, sender, options)
        if transaction is not None:
            session.transaction = transaction
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply.wire()

    async def on_rcpt(self, session: GatewaySession, envelope: Envelope, address: str) -> str:
        transaction = session.transaction
        if transaction is None:
            return "503 5.5.1 Need MAIL command"
        reply = await self.submission.rcpt(transaction, address)
        if reply.is_success:
            envelope.rcpt_tos.append(address)
        return reply.wire()

    async def end_transaction(self, session: GatewaySession) -> None:
        transaction, session.transaction = session.transaction, None
        await self.submission.abort(transaction)

    # --- DATA ---------------------------------------------------------------------------

    def _keep_alive(self, duration: float) -> None:
        """Push the timeout out, at most once a second (timer handles are not free)."""
        now = time.monotonic()
        if now - self._last_timer_reset >= 1.0:
            self._last_timer_reset = now
            self._reset_timeout(duration)

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        session = self.gsession()
        transaction = session.transaction
        if transaction is None or not transaction.recipients:
            await self.push(
                "503 5.5.1 Need RCPT command" if transaction else "503 5.5.1 Need MAIL command"
            )
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.settings.data_timeout)
        self._last_timer_reset = time.monotonic()
        # The message's share of [limits] data_bytes_in_flight, given back when the
        # transaction ends, however it ends (reply, error, disconnect, cancellation).
        reservation = self.submission.data_budget.reservation()
        try:
            if transaction.declared_size:
                reservation.cover(
                    min(transaction.declared_size, self.data_size_limit or 0)
                    * transaction.copies_in_memory
                )
            content, problem = await self._read_data(reservation, transaction.copies_in_memory)
            if problem is not None:
                if problem is replies.INSUFFICIENT_STORAGE:
                    log.info("data_bytes_in_flight", session=session.facts.session_id)
                    self.submission.limit_refused("data_bytes_in_flight")
                await self.end_transaction(session)
                self._reset_envelope()
                await self.write_reply(problem)
                return
            # The client is now waiting on us, not idle: give the relay its own timeout.
            self._reset_timeout(self.submission.data_reply_within)
            session.transaction = None
            self._relaying = True
            relay = asyncio.ensure_future(self.submission.data(session.facts, transaction, content))
            try:
                reply = await asyncio.shield(relay)
            except asyncio.CancelledError:
                # The client reset the connection after the dot (connection_lost cancels
                # this task). The message was received whole, so its relay or hold runs to
                # the end and is logged like any other; only the reply is lost. Cancelling
                # it instead would cut the upstream's DATA short with no decision logged.
                log.info("client_gone_after_dot", session=session.facts.session_id)
                await asyncio.wait([relay])
                if not relay.cancelled() and relay.exception() is not None:
                    await self.submission.abort(transaction)
                self._relaying = False
                raise
            except Exception:
                await self.submission.abort(transaction)
                raise
            finally:
                del content  # the budget is given back below: free the buffer first
                self._reset_envelope()
                self._reset_timeout()
            try:
                await self.write_reply(reply)
            finally:
                self._relaying = False
        finally:
            reservation.release()

    async def _read_data(
        self, reservation: Reservation, copies: int
    ) -> tuple[bytes | bytearray, Reply | None]:
        """Read up to the lone dot. Only CRLF.CRLF ends DATA; everything else is content.

        The message is kept once, in the bytearray returned (never copied to bytes), and
        counted against the data budget as it arrives: ``copies`` bytes of budget per
        byte received. Over the budget, the rest is read and dropped, then 452 4.3.1."""
        limit = self.data_size_limit
        data = bytearray()
        size = 0
        too_long = too_big = bare = full = False
        reader = self._reader
        data_timeout = self.settings.data_timeout
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)  # drain, keep reading to the dot
                too_long = True
                continue
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("client closed the connection during DATA") from exc
            if line == b".\r\n":
                break
            self._keep_alive(data_timeout)
            size += len(line)
            if too_long or too_big or full:
                continue
            if limit and size > limit:
                too_big = True
                data = bytearray()
                continue
            if len(line) > RFC5321_LINE_LIMIT:
                too_long = True
                data = bytearray()
                continue
            if not reservation.cover(size * copies):
                full = True
                data = bytearray()
                continue
            body_end = len(line) - 2
            if line.find(b"\n", 0, body_end) != -1 or line.find(b"\r", 0, body_end) != -1:
                bare = True
            data += line[1:] if line[:1] == b"." else line
        if too_long:
            return bytearray(), replies.LINE_TOO_LONG
        if too_big:
            return bytearray(), replies.MESSAGE_TOO_BIG
        if full:
            return bytearray(), replies.INSUFFICIENT_STORAGE
        if bare:
            if self.settings.bare_linefeeds == "reject":
                return bytearray(), replies.BARE_LINEFEED
            # Normalising makes a second copy for a moment: count it too.
            if not reservation.cover(size * (copies + 1)):
                return bytearray(), replies.INSUFFICIENT_STORAGE
            return _LINE_ENDINGS_RE.sub(b"\r\n", data), None
        return data, None


_METHOD_NAMES: dict[type, _MethodNames] = {}


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``protocol`` bytes as if they had just arrived from its transport."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)


def _from_balancer(ip: str, settings: SmtpSettings) -> bool:
    """Whether a connection from ``ip`` must begin with a PROXY header."""
    if not settings.proxy_protocol_from:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in settings.proxy_protocol_from)


class _MethodNames(NamedTuple):
    """A session class's protocol methods as aiosmtpd names them."""

    smtp: dict[str, str]  # "EHLO" -> "smtp_EHLO"
    auth: dict[str, str]  # "PLAIN" -> "auth_PLAIN" (or its __auth_mechanism_name__)
    hooks: dict[str, Callable[..., Any]]  # "MAIL" -> _HOOKS.handle_MAIL


class _BoundOnLookup(Mapping[str, Any]):
    """aiosmtpd's table of a session's methods, by protocol name, binding a method only
    when aiosmtpd looks it up (once or twice a command), not all of them per connection."""

    __slots__ = ("_attributes", "_owner", "_wrap")

    def __init__(
        self,
        owner: object,
        attributes: dict[str, str],
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self._owner = owner
        self._attributes = attributes
        self._wrap = wrap

    def __getitem__(self, name: str) -> Any:
        method = getattr(self._owner, self._attributes[name])
        return method if self._wrap is None else self._wrap(method)

    def __iter__(self) -> Iterator[str]:
        return iter(self._attributes)

    def __len__(self) -> int:
        return len(self._attributes)


def _method_names(cls: type) -> _MethodNames:
    names = _METHOD_NAMES.get(cls)
    if names is None:
        attributes = dir(cls)
        names = _METHOD_NAMES[cls] = _MethodNames(
            smtp={a.replace("smtp_", ""): a for a in attributes if a.startswith("smtp_")},
            auth={
                getattr(
                    getattr(cls, a),
                    "__auth_mechanism_name__",
                    a.replace("auth_", "").replace("__", "-"),
                ): a
                for a in attributes
                if a.startswith("auth_")
            },
            hooks={
                a.replace("handle_", ""): getattr(_HOOKS, a)
                for a in dir(_HOOKS)
                if a.startswith("handle_")
            },
        )
    return names


_background: set[asyncio.Task[Any]] = set()
