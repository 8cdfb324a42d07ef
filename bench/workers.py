"""One worker against two (``gateway serve --workers 2``) on the phones' workload, in one
run: every message on its own connection with STARTTLS (a full TLS handshake, no
resumption) and AUTH PLAIN with a device token, relayed to smtp-sink.

    python -m bench.workers [--messages 3000] [--concurrency 50] [--rounds 5] [--smoke]

Both gateways run side by side (own port, own store, same settings and certificate); the
rounds alternate between them (1, 2, 1, 2, ...), so a change in the machine's load hits
both. Prints medians of the rounds: messages per second, latency, the gateway's CPU (the
supervisor and its workers summed) and the load generator's, per 1000 messages; then
the ratio of 2 workers to 1.

Its limit, said with the figures: the load generator, smtp-sink and the gateways share
the machine's cores, so on a 2-core machine two workers compete with the generator for
the second core and the ratio is a floor, not what two cores of a server give.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from bench.run import (
    REPO,
    child_pids,
    cpu_seconds,
    free_port,
    gateway_env,
    processes,
    start_sink,
    wait_for_port,
    write_tokens,
)
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer


@dataclass
class Side:
    workers: int
    port: int
    process: subprocess.Popen[bytes]
    rate: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_per_1000: list[float] = field(default_factory=list)
    generator_cpu_per_1000: list[float] = field(default_factory=list)
    failures: int = 0

    def cpu(self) -> float:
        """CPU seconds of the gateway: its process and its workers (their children)."""
        return sum(cpu_seconds(pid) for pid in (self.process.pid, *child_pids(self.process.pid)))


def start(
    started: list[subprocess.Popen[bytes]],
    workdir: Path,
    issuer: TestIssuer,
    sink_port: int,
    certificate: Path,
    workers: int,
) -> Side:
    port = free_port()
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=sink_port,
        smtp={
            "listen": f"127.0.0.1:{port}",
            "idle_timeout": 300,
            "tls_cert": str(certificate),
            "tls_key": str(certificate),
        },
    )
    with (workdir / "gateway.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--workers", str(workers)],
            cwd=REPO, env=gateway_env(), stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    started.append(process)
    wait_for_port(port, timeout=60)
    return Side(workers, port, process)


def measure(side: Side, tokens: Path, messages: int, concurrency: int) -> None:
    command = [
        sys.executable, "-m", "bench.loadgen", "--port", str(side.port), "--json",
        "--messages", str(messages), "--concurrency", str(concurrency),
        "--per-connection", "1", "--size", "2048", "--auth", str(tokens), "--tls", "starttls",
    ]  # fmt: skip
    before = side.cpu()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    spent = side.cpu() - before
    out = json.loads(done.stdout)
    sent = max(1.0, float(out["messages"]))
    side.failures += int(out["failures"])
    side.rate.append(float(out["rate"]))
    side.p50.append(float(out["p50_ms"]))
    side.p99.append(float(out["p99_ms"]))
    side.cpu_per_1000.append(spent / sent * 1000)
    side.generator_cpu_per_1000.append(float(out["cpu_seconds"]) / sent * 1000)


def report(sides: list[Side], args: argparse.Namespace) -> str:
    one, two = sides
    lines = [
        f"## 1 worker against 2 (phones: STARTTLS + AUTH, 1 message per connection, "
        f"{args.messages} messages, c={args.concurrency}, medians of {args.rounds} "
        f"interleaved rounds, {os.cpu_count()} cores shared with the generator)",
        "",
        "| workers | msg/s | p50 ms | p99 ms | gateway CPU s/1000 msg "
        "| generator CPU s/1000 msg | failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        lines.append(
            f"| {side.workers} | {statistics.median(side.rate):.0f} "
            f"| {statistics.median(side.p50):.1f} | {statistics.median(side.p99):.1f} "
            f"| {statistics.median(side.cpu_per_1000):.2f} "
            f"| {statistics.median(side.generator_cpu_per_1000):.2f} | {side.failures} |"
        )
    ratio = statistics.median(two.rate) / max(statistics.median(one.rate), 1e-9)
    lines += [
        "",
        "Rounds, msg/s in order: "
        + "; ".join(
            f"{side.workers} worker(s): " + ", ".join(f"{rate:.0f}" for rate in side.rate)
            for side in sides
        )
        + f". Load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}.",
        f"Ratio, 2 workers / 1: {ratio:.2f}x messages per second "
        f"(p50 {statistics.median(two.p50) / max(statistics.median(one.p50), 1e-9):.2f}x).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a few messages, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.messages, args.concurrency, args.rounds = 40, 4, 1
    issuer = TestIssuer.generate("k1")
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp, processes() as started:
        root = Path(tmp)
        certificate = root / "gateway.pem"
        authority = trustme.CA()
        authority.issue_cert("gateway.test").private_key_and_cert_chain_pem.write_to_path(
            str(certificate)
        )
        sink = start_sink(started)
        tokens = write_tokens(issuer, root / "tokens.json", devices=200)
        sides = [start(started, root / f"w{n}", issuer, sink.port, certificate, n) for n in (1, 2)]
        measure(sides[0], tokens, min(args.messages, 200), args.concurrency)  # warm-up
        measure(sides[1], tokens, min(args.messages, 200), args.concurrency)
        for side in sides:
            side.rate.clear()
            side.p50.clear()
            side.p99.clear()
            side.cpu_per_1000.clear()
            side.generator_cpu_per_1000.clear()
            side.failures = 0
        for _ in range(args.rounds):
            for side in sides:
                measure(side, tokens, args.messages, args.concurrency)
            print(f"  round {len(sides[0].rate)} done", file=sys.stderr, flush=True)
        print(report(sides, args))
        return 1 if any(side.failures for side in sides) else 0


if __name__ == "__main__":
    sys.exit(main())
