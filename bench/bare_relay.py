"""The baseline: a bare aiosmtpd -> aiosmtplib relay with no policy, no AUTH, no tokens.

    python -m bench.bare_relay --listen 127.0.0.1:2526 --upstream 127.0.0.1:2525

What a competent engineer would write in an afternoon: aiosmtpd receives the whole
message, then sends it upstream on a pooled aiosmtplib connection, and answers 250 only
after the upstream's 250. The gateway is compared with this (c/b): the cost of policy,
tokens, lock-step relay and bookkeeping over the bare minimum.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session


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


async def serve(listen_host: str, listen_port: int, upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = PooledRelay(upstream_host, upstream_port)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare-relay", ident="bare relay"),
        listen_host,
        listen_port,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:2526")
    parser.add_argument("--upstream", default="127.0.0.1:2525")
    args = parser.parse_args()
    listen_host, listen_port = args.listen.rsplit(":", 1)
    upstream_host, upstream_port = args.upstream.rsplit(":", 1)
    coroutine = serve(listen_host, int(listen_port), upstream_host, int(upstream_port))
    try:
        import uvloop  # the gateway runs on uvloop when installed: same here, to be fair

        uvloop.run(coroutine)
    except ImportError:
        asyncio.run(coroutine)


if __name__ == "__main__":
    main()
