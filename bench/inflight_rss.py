"""Peak RSS of a `gateway serve` process with big messages in flight at once.

    python -m bench.inflight_rss [--messages 8] [--size-mib 24] [--json]

Starts a discarding upstream in this process and `gateway serve` as a child process
(relaying to it, a test issuer's tokens), sends ``messages`` messages of ``size-mib`` MiB
at the same time from as many authenticated connections, and prints the gateway's
resident memory before the messages and its peak (the kernel's VmHWM) after them, with
the target from docs/performance.md: below 2 x messages x size. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.testing.device import FakeDevice
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

MIB = 1024 * 1024


class _Discard:
    """Accepts every message and keeps nothing: only the gateway's memory is measured."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.accepted += 1
        envelope.content = envelope.original_content = None
        return "250 2.0.0 OK"


@asynccontextmanager
async def discarding_upstream() -> AsyncIterator[tuple[int, _Discard]]:
    handler = _Discard()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, data_size_limit=0, hostname="sink.test"), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[1], handler
    finally:
        server.close()
        await server.wait_closed()


def big_message(size: int) -> bytes:
    head = b"From: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: big\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line))


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


async def _port_from_log(stream: asyncio.StreamReader) -> int:
    async with asyncio.timeout(30):
        while True:
            line = await stream.readline()
            if not line:
                raise RuntimeError("gateway serve ended before listening")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                return int(str(event["submission"]).rsplit(":", 1)[1])


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def measure(messages: int, size: int) -> dict[str, float | int]:
    issuer = TestIssuer.generate("bench")
    message = big_message(size)
    with tempfile.TemporaryDirectory() as directory:
        async with discarding_upstream() as (upstream_port, sink):
            config = write_config(
                Path(directory),
                issuer=issuer,
                upstream_port=upstream_port,
                smtp={"max_message_size": size + MIB, "data_timeout": 300},
                upstream={"timeout": 300},
            )
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", str(config),
                stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert process.stderr is not None
            try:
                port = await _port_from_log(process.stderr)
                drain = asyncio.create_task(_drain(process.stderr))
                await asyncio.sleep(0.5)
                before = memory_kib(process.pid, "VmRSS")
                started = time.monotonic()
                devices = [
                    FakeDevice(issuer, user="alice@example.test", device_id=f"phone-{n}")
                    for n in range(messages)
                ]
                results = await asyncio.gather(
                    *(device.send(port, message=message, timeout=300) for device in devices)
                )
                seconds = time.monotonic() - started
                peak = memory_kib(process.pid, "VmHWM")
            finally:
                process.terminate()
                await process.wait()
            drain.cancel()
    return {
        "messages": messages,
        "size_mib": size / MIB,
        "accepted": sum(result.accepted for result in results),
        "upstream_accepted": sink.accepted,
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "target_mib": 2 * messages * size / MIB,
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--size-mib", type=float, default=24.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.messages, int(args.size_mib * MIB)))
    if args.json:
        print(json.dumps(figures))
    else:
        print(
            f"{figures['messages']} concurrent messages of {figures['size_mib']:g} MiB: "
            f"{figures['accepted']} accepted ({figures['upstream_accepted']} upstream) "
            f"in {figures['seconds']} s"
        )
        print(f"gateway RSS before: {figures['rss_before_mib']} MiB")
        print(
            f"gateway peak RSS:   {figures['peak_rss_mib']} MiB "
            f"(target: below {figures['target_mib']:g} MiB)"
        )
    below = figures["peak_rss_mib"] < figures["target_mib"]
    return 0 if below and figures["accepted"] == figures["messages"] else 1


if __name__ == "__main__":
    sys.exit(main())
