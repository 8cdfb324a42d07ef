"""Mail-sync logins measured: Dovecot with the gateway deciding, against the same Dovecot
with a static passdb, side by side in one run; and the sync endpoint alone.

    python -m bench.sync              # 3 interleaved rounds of 5 s, 8 IMAP workers
    python -m bench.sync --smoke      # seconds: checks the bench itself works (CI)

a  Dovecot 2.3 from deploy/dovecot/ (the two-passdb oauth2 chain), asking `gateway serve`
   (its own process, `--log-level info`: a decision event per login)
b  the same Dovecot configuration with the oauth2 passdbs replaced by
   ``passdb { driver = static  args = nopassword=y }``: what a login costs without a
   decision

Each worker is a thread looping IMAP connect, LOGIN (user + device token as the
password), LOGOUT with imaplib; rounds alternate a, b, a, b, ... so that machine noise
spreads evenly; figures are medians of the rounds. Target: a/b >= 0.8.

Then the endpoint alone: POST /oauth2/introspect as Dovecot 2.3.19 sends it, over
keep-alive connections from a small asyncio client in this process, with tokens the
gateway has already verified (its cache). Requests/s and latency percentiles, measured
by the client. Targets: >= 2,000 requests/s, p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from gateway.testing.dovecot import (
    DEPLOY_DIR,
    TemporaryDovecot,
    free_port,
    substitute,
    temporary_dovecot,
)
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

REPO = Path(__file__).resolve().parent.parent
CLIENT_SECRET = "bench-client-secret"  # noqa: S105  # a throwaway on loopback
# No policy matches: every login allowed. 10 apps: a token of about 740 bytes (an IMAP
# LOGIN line over about 1 KiB is refused by Dovecot 2.3's imap-login: docs/sync.md).
APPS = [f"com.harmless{i}.app" for i in range(10)]
OAUTH2_PASSDBS = """passdb {
  driver = oauth2
  args = /etc/dovecot/oauth2-refusal.conf.ext
  result_success = return-ok
  result_failure = continue
}
passdb {
  driver = oauth2
  args = /etc/dovecot/oauth2-introspect.conf.ext
}
"""
STATIC_PASSDB = """passdb {
  driver = static
  args = nopassword=y
}
"""


# --- the processes ------------------------------------------------------------------------


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    sync_port: int
    tokens: list[tuple[str, str]]


def start_gateway(workdir: Path, devices: int) -> Gateway:
    issuer = TestIssuer.generate("bench-1")
    sync_port = free_port()
    (workdir / "sync-secret").write_text(CLIENT_SECRET + "\n")
    policies = {"remove-tiktok.toml": (REPO / "config/policies/remove-tiktok.toml").read_text()}
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=free_port(),  # never used: nobody sends mail here
        policies=policies,
        sync={
            "listen": f"127.0.0.1:{sync_port}",
            "client_id": "dovecot",
            "client_secret_file": "sync-secret",
        },
    )
    with (workdir / "gateway.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--log-level", "info"],  # production default: a decision event per login
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        wait_for_port(sync_port, timeout=60)
    except RuntimeError:
        process.kill()
        raise
    tokens = [
        (
            f"user{i}@example.test",
            issuer.token(
                subject=f"user{i}@example.test",
                device_id=f"bench-{i}",
                apps=APPS,
                lifetime=timedelta(hours=2),
            ),
        )
        for i in range(devices)
    ]
    return Gateway(process, sync_port, tokens)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def static_deploy_dir(workdir: Path) -> Path:
    """deploy/dovecot/ with the oauth2 chain replaced by a static passdb, nothing else."""
    directory = workdir / "dovecot-static"
    shutil.copytree(DEPLOY_DIR, directory)
    conf = directory / "dovecot.conf"
    conf.write_text(
        substitute(conf.read_text(), [(OAUTH2_PASSDBS, STATIC_PASSDB)], name="dovecot.conf")
    )
    return directory


@asynccontextmanager
async def two_dovecots(workdir: Path, sync_port: int) -> AsyncIterator[dict[str, TemporaryDovecot]]:
    url = f"http://127.0.0.1:{sync_port}/"
    async with (
        temporary_dovecot(gateway_url=url, client_secret=CLIENT_SECRET) as gated,
        temporary_dovecot(
            gateway_url=url, client_secret=CLIENT_SECRET, deploy_dir=static_deploy_dir(workdir)
        ) as static,
    ):
        yield {"gateway": gated, "static": static}


# --- IMAP logins --------------------------------------------------------------------------


@dataclass
class LoginRound:
    logins: int
    failures: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.logins / self.seconds


def login_round(
    port: int, tokens: list[tuple[str, str]], workers: int, seconds: float
) -> LoginRound:
    """``workers`` threads, each looping connect + LOGIN + LOGOUT until the time is up."""
    counts = [0] * workers
    failures = [0] * workers
    start = threading.Barrier(workers + 1)
    deadline = 0.0

    def work(index: int) -> None:
        start.wait()
        n = index
        while time.monotonic() < deadline:
            user, token = tokens[n % len(tokens)]
            n += workers
            try:
                imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
                try:
                    imap.login(user, token)
                    counts[index] += 1
                finally:
                    imap.logout()
            except (imaplib.IMAP4.error, OSError):
                failures[index] += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    deadline = began + seconds
    start.wait()
    for thread in threads:
        thread.join(seconds + 30)
    return LoginRound(sum(counts), sum(failures), time.monotonic() - began)


# --- the endpoint alone -------------------------------------------------------------------


def introspect_request(port: int, token: str) -> bytes:
    body = urllib.parse.urlencode(
        {"token": token, "client_id": "dovecot", "client_secret": CLIENT_SECRET}
    ).encode()
    return (
        "POST /oauth2/introspect HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        "X-Dovecot-Auth-Service: imap\r\nX-Dovecot-Auth-Remote: 127.0.0.1\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


@dataclass
class EndpointRun:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def endpoint_run(
    port: int, tokens: list[tuple[str, str]], connections: int, seconds: float
) -> EndpointRun:
    requests = [introspect_request(port, token) for _, token in tokens]
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def connection(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = index
        try:
            while time.monotonic() < deadline:
                request = requests[n % len(requests)]
                n += connections
                sent = time.perf_counter()
                writer.write(request)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - sent)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    began = time.monotonic()
    await asyncio.gather(*(connection(i) for i in range(connections)))
    return EndpointRun(len(latencies), errors, time.monotonic() - began, latencies)


# --- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    workers: int
    seconds: float
    rounds: int
    connections: int
    endpoint_seconds: float
    endpoint_rounds: int


async def run(plan: Plan, workdir: Path) -> dict[str, object]:
    gateway = start_gateway(workdir, devices=100)
    try:
        # Every token verified once: the endpoint run measures cached tokens.
        await endpoint_run(gateway.sync_port, gateway.tokens, 4, 0.5)
        async with two_dovecots(workdir, gateway.sync_port) as dovecots:
            rounds: dict[str, list[LoginRound]] = {"gateway": [], "static": []}
            for _ in range(plan.rounds):
                for name, dovecot in dovecots.items():
                    rounds[name].append(
                        await asyncio.to_thread(
                            login_round,
                            dovecot.ports.imap,
                            gateway.tokens,
                            plan.workers,
                            plan.seconds,
                        )
                    )
        endpoint = [
            await endpoint_run(
                gateway.sync_port, gateway.tokens, plan.connections, plan.endpoint_seconds
            )
            for _ in range(plan.endpoint_rounds)
        ]
    finally:
        stop(gateway.process)
    return report(plan, rounds, endpoint)


def report(
    plan: Plan, rounds: dict[str, list[LoginRound]], endpoint: list[EndpointRun]
) -> dict[str, object]:
    logins = {
        name: {
            "per_second": [round(r.per_second, 1) for r in runs],
            "median": round(statistics.median(r.per_second for r in runs), 1),
            "failures": sum(r.failures for r in runs),
        }
        for name, runs in rounds.items()
    }
    gated, static = logins["gateway"]["median"], logins["static"]["median"]
    assert isinstance(gated, float)
    assert isinstance(static, float)
    return {
        "plan": plan.__dict__,
        "cpus": os.cpu_count(),
        "logins": logins,
        "ratio": round(gated / static, 3) if static else None,
        "endpoint": {
            "per_second": round(statistics.median(e.per_second for e in endpoint), 1),
            "p50_ms": round(statistics.median(e.percentile(50) for e in endpoint), 3),
            "p99_ms": round(statistics.median(e.percentile(99) for e in endpoint), 3),
            "requests": sum(e.requests for e in endpoint),
            "errors": sum(e.errors for e in endpoint),
        },
    }


def print_report(figures: dict[str, object]) -> None:
    plan = figures["plan"]
    logins = figures["logins"]
    endpoint = figures["endpoint"]
    assert isinstance(plan, dict)
    assert isinstance(logins, dict)
    assert isinstance(endpoint, dict)
    print("## Logins per second through Dovecot 2.3 (imaplib connect + LOGIN + LOGOUT)")
    print(
        f"{plan['workers']} workers, {plan['rounds']} interleaved rounds of "
        f"{plan['seconds']} s, {figures['cpus']} CPUs shared by everything"
    )
    print("")
    print("| passdb | rounds (logins/s) | median | failed |")
    print("|---|---|---|---|")
    for name, label in (("gateway", "a  oauth2 chain, gateway deciding"), ("static", "b  static")):
        row = logins[name]
        rounds = ", ".join(f"{v:.0f}" for v in row["per_second"])
        print(f"| {label} | {rounds} | {row['median']:.0f} | {row['failures']} |")
    print("")
    print(f"ratio a/b: {figures['ratio']} (target >= 0.8)")
    print("")
    print("## The sync endpoint alone (POST /oauth2/introspect, cached tokens)")
    print(
        f"{plan['connections']} keep-alive connections, {plan['endpoint_rounds']} runs of "
        f"{plan['endpoint_seconds']} s: {endpoint['per_second']:.0f} requests/s (target >= 2000), "
        f"p50 {endpoint['p50_ms']:.2f} ms, p99 {endpoint['p99_ms']:.2f} ms (target <= 5), "
        f"{endpoint['errors']} errors"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync", description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--endpoint-seconds", type=float, default=5.0)
    parser.add_argument("--endpoint-rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="seconds: the bench works")
    parser.add_argument("--json", action="store_true", help="the figures as JSON")
    args = parser.parse_args(argv)
    plan = (
        Plan(workers=2, seconds=1.0, rounds=1, connections=2, endpoint_seconds=1.0,
             endpoint_rounds=1)
        if args.smoke
        else Plan(args.workers, args.seconds, args.rounds, args.connections,
                  args.endpoint_seconds, args.endpoint_rounds)
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gateway-bench-sync-") as directory:
        figures = asyncio.run(run(plan, Path(directory)))
    if args.json:
        print(json.dumps(figures))
    else:
        print_report(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
