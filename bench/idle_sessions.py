"""RSS of a `gateway serve` process holding idle sessions: in clear, after STARTTLS, and
over implicit TLS; and after those sessions close.

    python -m bench.idle_sessions [--sessions 1000] [--modes clear,starttls,implicit]
                                  [--gateway-src DIR] [--json]

For each mode a fresh `gateway serve` child (uvloop when installed, as in production)
with an ECDSA P-256 certificate; the bench opens ``sessions`` connections, each EHLO,
(STARTTLS, EHLO,) AUTH PLAIN with one of 100 device tokens, then leaves them idle and
reads the child's VmRSS; then closes them all and reads it again 2 s later.
``--gateway-src`` runs the gateway from another checkout (PYTHONPATH), for before/after
figures with the same client. The client runs on uvloop when installed: asyncio's own
TLS layer would cost the bench process 256 KB per session. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import ssl
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import trustme

from bench.inflight_rss import _drain, discarding_upstream, memory_kib
from gateway.testing.device import FakeDevice
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

MODES = ("clear", "starttls", "implicit")
TOKENS = 100
BATCH = 200


def raise_fd_limit() -> int:
    """Both processes hold one descriptor per session: lift the soft limit to the hard one."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def _ports_from_log(stream: asyncio.StreamReader) -> tuple[int, int]:
    async with asyncio.timeout(60):
        while True:
            line = await stream.readline()
            if not line:
                raise RuntimeError("gateway serve ended before listening")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                submission = int(str(event["submission"]).rsplit(":", 1)[1])
                implicit = int(str(event["implicit_tls"]).rsplit(":", 1)[1])
                return submission, implicit


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if line[3:4] != b"-":
            return line


async def _session(
    mode: str, port: int, context: ssl.SSLContext, auth: bytes
) -> asyncio.StreamWriter:
    if mode == "implicit":
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="gateway.test"
        )
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO idle.test\r\n")
    await _reply(reader)
    if mode == "starttls":
        writer.write(b"STARTTLS\r\n")
        if not (await _reply(reader)).startswith(b"220"):
            raise RuntimeError("STARTTLS refused")
        await writer.start_tls(context, server_hostname="gateway.test")
        writer.write(b"EHLO idle.test\r\n")
        await _reply(reader)
    writer.write(auth)
    reply = await _reply(reader)
    if not reply.startswith(b"235"):
        raise RuntimeError(f"AUTH: {reply!r}")
    return writer


async def measure_mode(
    mode: str, sessions: int, gateway_src: Path | None
) -> dict[str, float | int | str]:
    issuer = TestIssuer.generate("bench")
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert = ca.issue_cert("gateway.test", "127.0.0.1", key_type=trustme.KeyType.ECDSA)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    auths = [
        b"AUTH PLAIN "
        + base64.b64encode(
            f"\0alice@example.test\0{FakeDevice(issuer, device_id=f'phone-{n}').token()}".encode()
        )
        + b"\r\n"
        for n in range(TOKENS)
    ]
    many = sessions + 100
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
        async with discarding_upstream() as (upstream_port, _):
            config = write_config(
                directory,
                issuer=issuer,
                upstream_port=upstream_port,
                smtp={
                    "tls_cert": "server.pem",
                    "tls_key": "server.pem",
                    "implicit_tls_listen": "127.0.0.1:0",
                    "idle_timeout": 600,
                },
                limits={
                    "max_connections": many,
                    "max_connections_per_ip": many,
                    "max_unauthenticated_connections": many,
                    "pre_auth_timeout_under_load_seconds": 600,
                },
            )
            env = dict(os.environ)
            if gateway_src is not None:
                env["PYTHONPATH"] = str(gateway_src)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", str(config),
                stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                env=env, cwd=str(directory),
            )  # fmt: skip
            assert process.stderr is not None
            writers: list[asyncio.StreamWriter] = []
            try:
                submission, implicit = await _ports_from_log(process.stderr)
                drain = asyncio.create_task(_drain(process.stderr))
                await asyncio.sleep(1.0)
                base = memory_kib(process.pid, "VmRSS")
                port = implicit if mode == "implicit" else submission
                started = time.monotonic()
                for first in range(0, sessions, BATCH):
                    batch = range(first, min(first + BATCH, sessions))
                    writers += await asyncio.gather(
                        *(_session(mode, port, client_context, auths[n % TOKENS]) for n in batch)
                    )
                opened = time.monotonic() - started
                await asyncio.sleep(2.0)
                idle = memory_kib(process.pid, "VmRSS")
                for writer in writers:
                    writer.close()
                writers = []
                await asyncio.sleep(3.0)
                after = memory_kib(process.pid, "VmRSS")
            finally:
                for writer in writers:
                    writer.close()
                process.terminate()
                await process.wait()
            drain.cancel()
    return {
        "mode": mode,
        "sessions": sessions,
        "rss_base_mb": round(base / 1024, 1),
        "rss_idle_mb": round(idle / 1024, 1),
        "kb_per_session": round((idle - base) / sessions, 1),
        "rss_after_close_mb": round(after / 1024, 1),
        "open_seconds": round(opened, 1),
    }


def run_mode(
    main: Coroutine[Any, Any, dict[str, float | int | str]],
) -> dict[str, float | int | str]:
    """Run one mode's measurement on uvloop when installed, as the gateway runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: dict[str, float | int | str] = uvloop.run(main)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--gateway-src", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    raise_fd_limit()
    rows = []
    for mode in args.modes.split(","):
        row = run_mode(measure_mode(mode, args.sessions, args.gateway_src))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{row['mode']:>8}: {row['sessions']:,} idle sessions  "
                f"RSS {row['rss_base_mb']} -> {row['rss_idle_mb']} MB "
                f"({row['kb_per_session']} KB/session), "
                f"{row['rss_after_close_mb']} MB after close  "
                f"(opened in {row['open_seconds']} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
