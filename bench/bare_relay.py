"""The baseline: a bare aiosmtpd -> aiosmtplib relay with no policy, no AUTH, no tokens.

    python -m bench.bare_relay --listen 127.0.0.1:2526 --upstream 127.0.0.1:2525
        [--tls-cert PEM [--implicit-listen 127.0.0.1:2527]] [--any-auth]

What a competent engineer would write in an afternoon: aiosmtpd receives the whole
message, then sends it upstream on a pooled aiosmtplib connection, and answers 250 only
after the upstream's 250. The gateway is compared with this (c/b): the cost of policy,
tokens, lock-step relay and bookkeeping over the bare minimum.

For the phones' workload (bench/phone.py) it also does what a phone needs: STARTTLS with
``--tls-cert`` (aiosmtpd's own upgrade), implicit TLS on ``--implicit-listen``, and a
trivial AUTH (``--any-auth``: every AUTH PLAIN succeeds, no token is checked).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import ssl
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


class PooledRelay:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[aiosmtplib.SMTP] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = self.idle.pop() if self.idle else None
        if client is None or not client.is_connected:
            client = aiosmtplib.SMTP(hostname=self.host, port=self.port, start_tls=False)
            await client.connect()
        try:
            content = envelope.original_content or b""
            await client.sendmail(envelope.mail_from or "", envelope.rcpt_tos, content)
        except aiosmtplib.SMTPException as exc:
            client.close()
            return f"451 4.4.1 upstream: {exc}"
        self.idle.append(client)
        return "250 2.0.0 OK"


class BareSMTP(SMTP):
    """aiosmtpd with AUTH lines as long as a line may be: a device token is about 1 KB,
    past aiosmtpd's 512-octet default for commands (the gateway raises it the same way)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.line_length_limit = 8192  # read before __init__ sizes the stream reader
        super().__init__(*args, **kwargs)
        # aiosmtpd keeps these limits in a class-level dict: replace it, do not mutate it.
        self.command_size_limits = collections.defaultdict(
            lambda: self.command_size_limit, {"AUTH": self.line_length_limit}
        )


def any_auth(*_args: Any) -> AuthResult:
    """The trivial AUTH: the bare relay's stand-in for the gateway's token check."""
    return AuthResult(success=True)


async def serve(
    listen_host: str,
    listen_port: int,
    upstream_host: str,
    upstream_port: int,
    tls_cert: str | None = None,
    implicit: tuple[str, int] | None = None,
    auth: bool = False,
) -> None:
    loop = asyncio.get_running_loop()
    handler = PooledRelay(upstream_host, upstream_port)
    context = None
    if tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls_cert)

    def session() -> SMTP:
        return BareSMTP(
            handler,
            hostname="bare-relay",
            ident="bare relay",
            tls_context=context,
            authenticator=any_auth if auth else None,
            auth_require_tls=False,  # implicit TLS is not aiosmtpd's STARTTLS: allow it there
        )

    servers = [await loop.create_server(session, listen_host, listen_port)]
    if implicit is not None and context is not None:
        servers.append(await loop.create_server(session, implicit[0], implicit[1], ssl=context))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:2526")
    parser.add_argument("--upstream", default="127.0.0.1:2525")
    parser.add_argument("--tls-cert", help="PEM with key and chain: offer STARTTLS")
    parser.add_argument("--implicit-listen", help="also listen with implicit TLS here")
    parser.add_argument("--any-auth", action="store_true", help="accept every AUTH PLAIN")
    args = parser.parse_args()
    listen_host, listen_port = args.listen.rsplit(":", 1)
    upstream_host, upstream_port = args.upstream.rsplit(":", 1)
    implicit = None
    if args.implicit_listen:
        implicit_host, implicit_port = args.implicit_listen.rsplit(":", 1)
        implicit = (implicit_host, int(implicit_port))
    coroutine = serve(
        listen_host,
        int(listen_port),
        upstream_host,
        int(upstream_port),
        tls_cert=args.tls_cert,
        implicit=implicit,
        auth=args.any_auth,
    )
    try:
        import uvloop  # the gateway runs on uvloop when installed: same here, to be fair

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)


if __name__ == "__main__":
    main()
