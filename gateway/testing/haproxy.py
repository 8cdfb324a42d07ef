"""A throwaway HAProxy in front of gateways, as a TCP balancer sending PROXY v2.

HAProxy (Debian ``haproxy``) runs in the foreground (``-db``) with a temporary config:
one frontend on a free loopback port, one backend with the given gateways, every server
``send-proxy-v2`` (the client's address in a PROXY v2 header, docs/operations.md#behind-a-load-balancer)
and health-checked with ``option smtpchk`` and ``check-send-proxy`` (so checks arrive as
PROXY ``LOCAL``, greet and say HELO as a real balancer's would). A stats socket tells
which servers HAProxy considers UP. ``stop()`` ends the process group.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from gateway.testing.dovecot import free_port
from gateway.testing.process import stop_group

START_TIMEOUT = 15.0
CHECK_INTERVAL_MS = 200


class HaproxyUnavailable(RuntimeError):
    """haproxy is not installed; the message says what to install."""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )
    if found is None:
        raise HaproxyUnavailable("haproxy not found (apt-get install haproxy)")
    return found


def render_config(
    root: Path,
    *,
    port: int,
    servers: Sequence[tuple[str, int]],
    balance: str = "roundrobin",
    proxy: str = "send-proxy-v2",
    check_tls: bool = False,
    tls_certificate: Path | None = None,
) -> str:
    """The balancer: TCP mode, ``proxy`` to every server, SMTP health checks (over TLS
    after the PROXY header with ``check_tls``, for implicit TLS listeners). With
    ``tls_certificate`` (key and chain, PEM) HAProxy terminates TLS itself and says so in
    the PROXY header (``proxy-v2-options ssl``)."""
    terminate = f" ssl crt {tls_certificate}" if tls_certificate is not None else ""
    options = " proxy-v2-options ssl" if tls_certificate is not None else ""
    lines = [
        "global",
        f"    stats socket {root}/stats.sock mode 600 level admin",
        "    maxconn 500",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout check 2s",
        "frontend submission",
        f"    bind 127.0.0.1:{port}{terminate}",
        "    default_backend gateways",
        "backend gateways",
        f"    balance {balance}",
        "    option smtpchk HELO haproxy.test",
        f"    default-server {proxy}{options} check check-send-proxy inter {CHECK_INTERVAL_MS}ms"
        " fall 2 rise 1" + (" check-ssl verify none" if check_tls else ""),
    ]
    lines += [f"    server g{i} {host}:{p}" for i, (host, p) in enumerate(servers, 1)]
    return "\n".join(lines) + "\n"


@dataclass
class TemporaryHaproxy:
    root: Path
    port: int  # the frontend: where phones connect
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    async def start(self, binary: str) -> None:
        config = self.root / "haproxy.cfg"
        check = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            "-f",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await check.communicate()
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its config:\n{output.decode(errors='replace')}")
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "-db",
            "-f",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not (self.root / "stats.sock").exists():
                    if self.process.returncode is not None:
                        raise RuntimeError(f"haproxy exited at start:\n{await self._stderr()}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise RuntimeError("haproxy did not start (no stats socket)") from None

    async def _stderr(self) -> str:
        process = self.process
        if process is None or process.stderr is None or process.returncode is None:
            return ""
        return (await process.stderr.read()).decode(errors="replace")[-3000:]

    async def command(self, line: str) -> str:
        """One command on the stats socket (HAProxy's management guide, s 9.3)."""
        reader, writer = await asyncio.open_unix_connection(str(self.root / "stats.sock"))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(5.0):
                return (await reader.read()).decode(errors="replace")
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    async def server_status(self) -> dict[str, str]:
        """Each backend server's status as HAProxy sees it: "UP" once its last health
        check passed at layer 7 (the SMTP greeting and HELO; "* " marks a check running
        now, after that result), else what ``show stat``
        says ("DOWN", "UP 1/2" while a check is failing, ...) and the check's result."""
        text = await self.command("show stat")
        rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
        return {
            row["svname"]: row["status"]
            if row["status"] != "UP" or row["check_status"].removeprefix("* ") == "L7OK"
            else f"UP {row['check_status']}"
            for row in rows
            if row.get("pxname") == "gateways" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    async def wait_up(self, count: int, timeout: float = 10.0) -> dict[str, str]:  # noqa: ASYNC109
        """Wait until ``count`` servers are UP with a passed health check."""
        async with asyncio.timeout(timeout):
            while True:
                status = await self.server_status()
                if sum(s == "UP" for s in status.values()) >= count:
                    return status
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM (hard stop: connections end at once), then SIGKILL to the group."""
        process, self.process = self.process, None
        await stop_group(process, signal.SIGTERM)


@asynccontextmanager
async def temporary_haproxy(
    servers: Sequence[tuple[str, int]],
    *,
    balance: str = "roundrobin",
    proxy: str = "send-proxy-v2",
    check_tls: bool = False,
    tls_certificate: Path | None = None,
) -> AsyncIterator[TemporaryHaproxy]:
    """HAProxy balancing ``servers`` (host, port) from a free loopback port; always
    stopped. Raises :class:`HaproxyUnavailable` when haproxy is not installed."""
    binary = haproxy_binary()
    root = Path(tempfile.mkdtemp(prefix="gateway-haproxy-"))
    haproxy = TemporaryHaproxy(root, free_port())
    try:
        text = render_config(
            root,
            port=haproxy.port,
            servers=servers,
            balance=balance,
            proxy=proxy,
            check_tls=check_tls,
            tls_certificate=tls_certificate,
        )
        (root / "haproxy.cfg").write_text(text)
        await haproxy.start(binary)
        yield haproxy
    finally:
        await haproxy.stop()
        shutil.rmtree(root, ignore_errors=True)
