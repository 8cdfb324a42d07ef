"""A fast asyncio SMTP load generator: pipelining, optional AUTH PLAIN, per-message latency.

    python -m bench.loadgen --port 2525 --messages 2000 --concurrency 20 --per-connection 100
        [--size 1024] [--auth TOKENS.json] [--starttls] [--json]

Each of ``concurrency`` workers opens a connection, says EHLO, authenticates when
given tokens (AUTH PLAIN with a pre-minted token: one user and device per worker), then
sends up to ``per-connection`` messages, pipelining MAIL, RCPT and DATA (RFC 2920), and
reconnects until the shared message budget is spent. Latency is per message: from
writing MAIL FROM to reading the final 250. It prints the figures, and its own CPU time,
so the bench can show its cost is well below the targets' (it runs against smtp-sink).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import resource
import ssl
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LoadResult:
    messages: int = 0
    failures: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    first_failure: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float | int | str]:
        data = asdict(self)
        del data["latencies_ms"]
        data.update(
            rate=round(self.rate, 1),
            p50_ms=round(self.percentile(0.50), 3),
            p99_ms=round(self.percentile(0.99), 3),
        )
        return data


class SmtpFailure(Exception):
    pass


def make_body(size: int, index: int) -> bytes:
    header = (
        f"From: <load@example.test>\r\nTo: <sink@example.test>\r\n"
        f"Subject: load {index}\r\nMessage-ID: <load-{index}@example.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(0, (size - len(header)) // len(line))
    return header + body + b".\r\n"


REPLY_TIMEOUT = 30.0  # a target that stops answering is a failure, not a hang


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    while True:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):  # no task per read, unlike wait_for
                line = await reader.readline()
        except TimeoutError:
            raise SmtpFailure(f"no reply within {REPLY_TIMEOUT:.0f} s") from None
        if not line:
            raise SmtpFailure("connection closed")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def _expect(reader: asyncio.StreamReader, code: int) -> None:
    got, line = await _reply(reader)
    if got != code:
        raise SmtpFailure(line.decode("ascii", "replace").strip())


async def worker(
    host: str,
    port: int,
    budget: list[int],
    per_connection: int,
    body: bytes,
    credentials: tuple[str, str] | None,
    result: LoadResult,
    tls: ssl.SSLContext | None = None,
) -> None:
    sender = credentials[0] if credentials else "load@example.test"
    envelope = f"MAIL FROM:<{sender}>\r\nRCPT TO:<sink@example.test>\r\nDATA\r\n".encode()
    while budget[0] > 0:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        try:
            await _expect(reader, 220)
            writer.write(b"EHLO load.test\r\n")
            await _expect(reader, 250)
            if tls is not None:  # as a phone does: STARTTLS, a full handshake, EHLO again
                writer.write(b"STARTTLS\r\n")
                await _expect(reader, 220)
                await writer.start_tls(tls)
                writer.write(b"EHLO load.test\r\n")
                await _expect(reader, 250)
            if credentials:
                user, token = credentials
                blob = base64.b64encode(f"\0{user}\0{token}".encode())
                writer.write(b"AUTH PLAIN " + blob + b"\r\n")
                await _expect(reader, 235)
            sent = 0
            while sent < per_connection and budget[0] > 0:
                budget[0] -= 1
                started = time.perf_counter()
                writer.write(envelope)
                try:
                    await _expect(reader, 250)
                    await _expect(reader, 250)
                    await _expect(reader, 354)
                    writer.write(body)
                    await _expect(reader, 250)
                except SmtpFailure as failure:
                    result.failures += 1
                    result.first_failure = result.first_failure or str(failure)
                    break
                result.latencies_ms.append((time.perf_counter() - started) * 1000)
                result.messages += 1
                sent += 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
        except (SmtpFailure, ConnectionError) as failure:
            result.failures += 1
            result.first_failure = result.first_failure or str(failure)
            await asyncio.sleep(0.01)
        finally:
            writer.close()


async def run_load(
    host: str,
    port: int,
    *,
    messages: int,
    concurrency: int,
    per_connection: int,
    size: int,
    tokens: list[tuple[str, str]] | None = None,
    starttls: bool = False,
) -> LoadResult:
    result = LoadResult()
    budget = [messages]
    body = make_body(size, 0)
    tls = None
    if starttls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE  # a bench's certificate; the handshake is the cost
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(
        *(
            worker(
                host,
                port,
                budget,
                per_connection,
                body,
                tokens[i % len(tokens)] if tokens else None,
                result,
                tls,
            )
            for i in range(concurrency)
        )
    )
    result.seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result.cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (
        cpu_after.ru_stime - cpu_before.ru_stime
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--per-connection", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--auth", type=Path, help="JSON list of [user, token] pairs")
    parser.add_argument("--starttls", action="store_true", help="STARTTLS before AUTH")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tokens = (
        [(user, token) for user, token in json.loads(args.auth.read_text())] if args.auth else None
    )
    coroutine = run_load(
        args.host,
        args.port,
        messages=args.messages,
        concurrency=args.concurrency,
        per_connection=args.per_connection,
        size=args.size,
        starttls=args.starttls,
        tokens=tokens,
    )
    try:
        import uvloop  # as the targets use it when installed

        result = uvloop.run(coroutine)
    except ImportError:
        result = asyncio.run(coroutine)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>14}: {value}")
        if result.latencies_ms:
            print(f"{'mean_ms':>14}: {statistics.fmean(result.latencies_ms):.3f}")


if __name__ == "__main__":
    main()
