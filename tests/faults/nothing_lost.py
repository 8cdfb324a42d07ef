"""The "nothing lost" harness: messages with unique ids sent while faults are injected and
the gateway is SIGKILLed and restarted; then every message is accounted for.

    python -m tests.faults.nothing_lost --messages 2000 --clients 8 --kills 5

Faults: a proxy between gateway and upstream refuses connections, cuts them after a random
number of bytes, or slows them; the gateway process is killed (SIGKILL) and restarted.
A fifth of the devices have a banned app, so their mail is held, not relayed.

Clients behave like real ones: a 4xx reply or a broken connection means "try again
later" (here: soon, up to 10 attempts); 250 or 5xx is final. Afterwards:
  * every message that got 250 is at the upstream or in the hold store, byte-identical
    after the gateway's Received header;
  * no message that got a 5xx was delivered;
  * a message may be delivered although its client never saw the 250 only when the
    gateway's connection to the upstream broke after the data went out (451 4.4.2 "lost")
    or the gateway was killed mid-transaction: RFC 1047's window. These are counted, as are
    duplicates (the client then retries a message the upstream already has).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.proxy import FaultProxy, ProxyFaults
from gateway.testing.upstream import FakeUpstream

TIKTOK = "com.zhiliaoapp.musically"
BAN = (
    f'[[policy]]\nid = "ban"\nmatch.apps_any = ["{TIKTOK}"]\naction = "hold"\n'
    'message = "Remove TikTok."\nstate = "enforce"\n'
)
LOST = "4.4.2 Connection to upstream mail server lost; please try again later"
MAX_ATTEMPTS = 10


@dataclass
class Message:
    ident: str
    device: FakeDevice
    content: bytes
    attempts: list[tuple[int, str]] = field(default_factory=list)

    @property
    def final(self) -> tuple[int, str] | None:
        last = self.attempts[-1] if self.attempts else None
        return last if last and (last[0] == 250 or last[0] >= 500) else None


@dataclass
class Report:
    messages: int = 0
    accepted: int = 0  # got 250 (relayed or held)
    held: int = 0
    refused: int = 0  # got a final 5xx
    gave_up: int = 0  # still 4xx / broken after MAX_ATTEMPTS
    attempts: int = 0
    kills: int = 0
    proxy_cuts: int = 0
    proxy_refusals: int = 0
    duplicates: int = 0  # extra copies at the upstream
    delivered_without_250: int = 0  # RFC 1047 window: allowed, counted
    violations: list[str] = field(default_factory=list)

    def summary(self) -> str:
        data = dict(self.__dict__)
        data["violations"] = len(self.violations)
        return json.dumps(data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """`gateway serve` as a process that can be killed and started again on the same port."""

    def __init__(self, config: Path, port: int) -> None:
        self.config = config
        self.port = port
        self.process: asyncio.subprocess.Process | None = None

    @classmethod
    def configured(
        cls,
        workdir: Path,
        issuer: TestIssuer,
        upstream_port: int,
        policies: dict[str, str],
        upstream_timeout: int = 10,
    ) -> Gateway:
        """Write a config for a fixed free port (kept across restarts)."""
        port = free_port()
        config = write_config(
            workdir,
            issuer=issuer,
            upstream_port=upstream_port,
            policies=policies,
            smtp={"listen": f"127.0.0.1:{port}", "idle_timeout": 30},
            upstream={"timeout": upstream_timeout},
        )
        return cls(config, port)

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
            "--grace", "2", "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return
        raise RuntimeError("gateway did not start")

    async def kill(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


async def send_until_final(message: Message, port: int, rng: random.Random) -> None:
    while len(message.attempts) < MAX_ATTEMPTS and message.final is None:
        try:
            result = await message.device.send(port, message=message.content, timeout=10)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            message.attempts.append((0, f"connection: {type(exc).__name__}"))
        else:
            step = result.data or result.mail or result.auth or (0, "no reply")
            if result.rcpt and not result.data:
                step = next(iter(result.rcpt.values()))
            message.attempts.append(step)
        if message.final is None:
            await asyncio.sleep(0.05 + rng.random() * 0.2)


async def chaos(
    proxy: FaultProxy,
    gateway: Gateway,
    kills: int,
    progress: Callable[[], float],
    done: asyncio.Event,
    rng: random.Random,
) -> int:
    """Flip proxy faults every 50 ms; SIGKILL and restart the gateway each time another
    1/(kills+1) of the messages is settled, so the kills land mid-run at any size."""
    killed = 0
    while not done.is_set():
        roll = rng.random()
        if roll < 0.15:
            proxy.faults = ProxyFaults(refuse=True)
        elif roll < 0.45:
            proxy.faults = ProxyFaults(cut_after=rng.randint(0, 6000))
        elif roll < 0.55:
            proxy.faults = ProxyFaults(delay=0.02)
        else:
            proxy.faults = ProxyFaults()
        if killed < kills and progress() >= (killed + 1) / (kills + 1):
            await gateway.kill()
            killed += 1
            await asyncio.sleep(0.2)
            await gateway.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=0.05)
    proxy.faults = ProxyFaults()
    return killed


def body_after_trace(content: bytes) -> bytes:
    return content[content.index(b"From: ") :]


async def run(workdir: Path, *, messages: int, clients: int, kills: int, seed: int = 7) -> Report:
    rng = random.Random(seed)
    issuer = TestIssuer.generate("k1")
    report = Report(messages=messages)
    async with FakeUpstream.running() as upstream:
        proxy = FaultProxy("127.0.0.1", upstream.port)
        await proxy.start()
        gateway = Gateway.configured(
            workdir, issuer, proxy.port, {"ban.toml": BAN}, upstream_timeout=3
        )
        port = gateway.port
        await gateway.start()
        devices = [
            FakeDevice(
                issuer,
                user=f"user{i}@example.test",
                device_id=f"phone-{i}",
                apps={TIKTOK} if i % 5 == 0 else set(),
            )
            for i in range(10)
        ]
        queue: asyncio.Queue[Message] = asyncio.Queue()
        all_messages = []
        for n in range(messages):
            device = devices[n % len(devices)]
            ident = f"nl-{seed}-{n:06d}"
            content = make_message(
                subject=f"nothing lost {ident}", sender=device.user, body=f"id {ident}\r\n"
            ).replace(b"Subject:", f"X-Test-Id: {ident}\r\nSubject:".encode(), 1)
            message = Message(ident, device, content)
            all_messages.append(message)
            queue.put_nowait(message)

        async def worker() -> None:
            while not queue.empty():
                await send_until_final(queue.get_nowait(), port, rng)

        done = asyncio.Event()

        def progress() -> float:
            return sum(1 for m in all_messages if m.final is not None) / len(all_messages)

        chaos_task = asyncio.create_task(chaos(proxy, gateway, kills, progress, done, rng))
        await asyncio.gather(*(worker() for _ in range(clients)))
        done.set()
        report.kills = await chaos_task
        await asyncio.sleep(0.5)  # let a release or retry in flight finish
        await gateway.stop()
        await proxy.stop()
        report.proxy_cuts, report.proxy_refusals = proxy.cuts, proxy.refused

        delivered: Counter[str] = Counter()
        delivered_bytes: dict[str, bytes] = {}
        for received in upstream.messages:
            found = received.content.split(b"X-Test-Id: ", 1)
            if len(found) == 2:
                ident = found[1].split(b"\r\n", 1)[0].decode()
                delivered[ident] += 1
                delivered_bytes[ident] = body_after_trace(received.content)
        store = HoldStore(workdir / "hold.db")
        held: dict[str, bytes] = {}
        for row in store.select(limit=1_000_000):
            full = store.get(row.hold_id)
            assert full is not None
            assert full.content is not None
            ident = full.content.split(b"X-Test-Id: ", 1)[1].split(b"\r\n", 1)[0].decode()
            held[ident] = body_after_trace(full.content)
        store.close()

    for message in all_messages:
        report.attempts += len(message.attempts)
        final = message.final
        expected = body_after_trace(message.content)
        copies = delivered[message.ident]
        report.duplicates += max(0, copies - 1)
        if final and final[0] == 250:
            report.accepted += 1
            if message.ident in held:
                report.held += 1
                if held[message.ident] != expected:
                    report.violations.append(f"{message.ident}: held bytes differ")
            elif copies:
                if delivered_bytes[message.ident] != expected:
                    report.violations.append(f"{message.ident}: delivered bytes differ")
            else:
                report.violations.append(f"{message.ident}: got 250 but is nowhere: LOST")
            continue
        if final and final[0] >= 500:
            report.refused += 1
        else:
            report.gave_up += 1
        if copies or message.ident in held:
            ambiguous = [a for a in message.attempts if a[1] == LOST or a[0] == 0]
            if (final and final[0] >= 500) or not ambiguous:
                report.violations.append(
                    f"{message.ident}: delivered although refused: {message.attempts}"
                )
            else:
                report.delivered_without_250 += 1
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nothing-lost-") as tmp:
        report = asyncio.run(
            run(
                Path(tmp),
                messages=args.messages,
                clients=args.clients,
                kills=args.kills,
                seed=args.seed,
            )
        )
    print(report.summary())
    for violation in report.violations:
        print("VIOLATION", violation)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
