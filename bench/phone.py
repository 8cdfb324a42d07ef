"""The phones' workload: one message per connection over TLS, from thousands of devices.

    python -m bench.phone [--devices 5000] [--messages 2000] [--repetitions 3] [--smoke]

Mobile mail apps connect, start TLS, authenticate, send one message and leave; a company
has thousands of distinct devices. Two targets relay to one Postfix ``smtp-sink``:

  gateway  `gateway serve` as in production: the shipped policies, token verification
           (signature checked once per token, then the token cache), the decision log at
           the default level, STARTTLS through the event loop's TLS, implicit TLS
  bare     bench/bare_relay.py with TLS and a trivial AUTH (every AUTH PLAIN succeeds):
           aiosmtpd -> aiosmtplib, what the gateway is measured against

For each certificate (ECDSA P-256 and RSA 2048) and each TLS mode (STARTTLS, RFC 3207,
and implicit TLS, RFC 8314) the same generator (bench/loadgen.py) runs against both,
interleaved, ``repetitions`` times: ``concurrency`` connections at a time, one message per
connection, each connection the next of ``devices`` tokens (distinct users and devices).
A first pass over every device is reported on its own ("cold": every AUTH verifies a
signature, as when a fleet's tokens are all new); the measured cells then run in the
steady state, where the cache (``[tokens] cache_entries``, sized to the fleet) holds
each device's current token. Figures are medians; the ratio gateway/bare is of medians
measured side by side in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import trustme

from bench.run import (
    REPO,
    Figures,
    Target,
    cpu_seconds,
    free_port,
    processes,
    spawn_gateway,
    start_sink,
    wait_for_port,
    write_tokens,
)
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

MODES = ("starttls", "implicit")
KEYS = {"ECDSA P-256": trustme.KeyType.ECDSA, "RSA 2048": trustme.KeyType.RSA}
CONCURRENCY = 20


@dataclass
class PhoneTarget:
    """One relay listening in clear with STARTTLS and with implicit TLS."""

    name: str
    process: subprocess.Popen[bytes]
    starttls_port: int
    implicit_port: int
    tokens: Path

    def port(self, mode: str) -> int:
        return self.starttls_port if mode == "starttls" else self.implicit_port


@dataclass
class PhoneFigures(Figures):
    """bench.run's figures, plus latency per connection and the first failure's text."""

    connection_p50: list[float] = field(default_factory=list)
    connection_p99: list[float] = field(default_factory=list)
    first_failure: str = ""


def certificate(directory: Path, key_type: trustme.KeyType) -> Path:
    ca = trustme.CA(key_type=key_type)
    cert = ca.issue_cert("gateway.test", "127.0.0.1", key_type=key_type)
    pem = directory / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    return pem


def start_gateway(
    started: list[subprocess.Popen[bytes]],
    workdir: Path,
    sink: Target,
    issuer: TestIssuer,
    pem: Path,
    tokens: Path,
) -> PhoneTarget:
    starttls, implicit = free_port(), free_port()
    shipped = {p.name: p.read_text() for p in (REPO / "config" / "policies").glob("*.toml")}
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=sink.port,
        policies=shipped,
        smtp={
            "listen": f"127.0.0.1:{starttls}",
            "implicit_tls_listen": f"127.0.0.1:{implicit}",
            "tls_cert": str(pem),
            "tls_key": str(pem),
            "idle_timeout": 300,
        },
    )
    process = spawn_gateway(started, config, workdir / "gateway.log", starttls)
    wait_for_port(implicit)
    return PhoneTarget("gateway", process, starttls, implicit, tokens)


def start_bare(
    started: list[subprocess.Popen[bytes]], sink: Target, pem: Path, tokens: Path
) -> PhoneTarget:
    starttls, implicit = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_relay", "--listen", f"127.0.0.1:{starttls}",
         "--upstream", f"127.0.0.1:{sink.port}", "--tls-cert", str(pem),
         "--implicit-listen", f"127.0.0.1:{implicit}", "--any-auth"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started.append(process)
    wait_for_port(starttls)
    wait_for_port(implicit)
    return PhoneTarget("bare", process, starttls, implicit, tokens)


def run_cell(
    target: PhoneTarget, mode: str, messages: int, offset: int, figures: PhoneFigures
) -> None:
    command = [
        sys.executable, "-m", "bench.loadgen", "--port", str(target.port(mode)), "--json",
        "--messages", str(messages), "--concurrency", str(CONCURRENCY),
        "--per-connection", "1", "--size", "1024", "--tls", mode,
        "--auth", str(target.tokens), "--rotate", "--offset", str(offset),
    ]  # fmt: skip
    before = cpu_seconds(target.process.pid)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    used = cpu_seconds(target.process.pid) - before
    out = json.loads(done.stdout)
    figures.failures += int(out["failures"])
    figures.first_failure = figures.first_failure or str(out.get("first_failure", ""))
    figures.rate.append(float(out["rate"]))
    figures.p50.append(float(out["p50_ms"]))
    figures.p99.append(float(out["p99_ms"]))
    figures.connection_p50.append(float(out["connection_p50_ms"]))
    figures.connection_p99.append(float(out["connection_p99_ms"]))
    figures.cpu_per_1000.append(used / max(1, int(out["messages"])) * 1000)


@dataclass(frozen=True)
class PhoneResults:
    devices: int
    repetitions: int
    cold: dict[tuple[str, str], PhoneFigures]  # (key, target)
    warm: dict[tuple[str, str, str], PhoneFigures]  # (key, mode, target)


def measure(
    *, devices: int, messages: int, repetitions: int, sink: Target, workdir: Path
) -> PhoneResults:
    """Run the phone workload against both targets for both keys; the caller owns ``sink``."""
    issuer = TestIssuer.generate("phones")
    tokens = write_tokens(issuer, workdir / "phones.json", devices=devices)
    cold: dict[tuple[str, str], PhoneFigures] = {}
    warm: dict[tuple[str, str, str], PhoneFigures] = {}
    for key_name, key_type in KEYS.items():
        directory = workdir / key_name.replace(" ", "-")
        directory.mkdir()
        pem = certificate(directory, key_type)
        with processes() as started:
            targets = [
                start_gateway(started, directory / "gateway", sink, issuer, pem, tokens),
                start_bare(started, sink, pem, tokens),
            ]
            for target in targets:  # every device once: the fleet's tokens are new
                run_cell(
                    target,
                    "starttls",
                    devices,
                    0,
                    cold.setdefault((key_name, target.name), PhoneFigures()),
                )
            offset = devices
            for mode in MODES:
                for _ in range(repetitions):
                    for target in targets:
                        figures = warm.setdefault((key_name, mode, target.name), PhoneFigures())
                        run_cell(target, mode, messages, offset, figures)
                    offset += messages
                print(f"  measured {key_name} {mode}", file=sys.stderr, flush=True)
    return PhoneResults(devices, repetitions, cold, warm)


def print_results(results: PhoneResults) -> None:
    print(
        f"\n## The phones' workload: one message per connection, {results.devices:,} devices, "
        f"concurrency {CONCURRENCY} (medians of {results.repetitions})\n"
    )
    print(
        "| certificate | TLS | target | msg/s | p50 ms/msg | p99 ms/msg | p50 ms/conn "
        "| p99 ms/conn | target CPU s/1000 msg | failures |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (key_name, mode, name), f in results.warm.items():
        print(
            f"| {key_name} | {mode} | {name} | {f.median('rate'):,.0f} | {f.median('p50'):.2f} "
            f"| {f.median('p99'):.2f} | {f.median('connection_p50'):.2f} "
            f"| {f.median('connection_p99'):.2f} | {f.median('cpu_per_1000'):.3f} "
            f"| {f.failures} |"
        )
    print("\n| certificate | TLS | gateway/bare msg/s | gateway/bare CPU per message | target |")
    print("|---|---|---:|---:|---|")
    for key_name in KEYS:
        for mode in MODES:
            gateway = results.warm[(key_name, mode, "gateway")]
            bare = results.warm[(key_name, mode, "bare")]
            ratio = gateway.median("rate") / max(bare.median("rate"), 1e-9)
            cpu = gateway.median("cpu_per_1000") / max(bare.median("cpu_per_1000"), 1e-9)
            verdict = "met" if ratio >= 1.0 else "not met"
            print(f"| {key_name} | {mode} | {ratio:.2f} | {cpu:.2f} | ≥ 1.0: {verdict} |")
    print(
        f"\nCold pass (STARTTLS, each of the {results.devices:,} devices once: "
        "every gateway AUTH verifies a signature):\n"
    )
    print("| certificate | gateway msg/s | bare msg/s | ratio |")
    print("|---|---:|---:|---:|")
    for key_name in KEYS:
        gateway_rate = results.cold[(key_name, "gateway")].median("rate")
        bare_rate = results.cold[(key_name, "bare")].median("rate")
        ratio = gateway_rate / max(bare_rate, 1e-9)
        print(f"| {key_name} | {gateway_rate:,.0f} | {bare_rate:,.0f} | {ratio:.2f} |")
    failures = [
        f"{key} {mode} {name}: {f.first_failure}"
        for (key, mode, name), f in results.warm.items()
        if f.failures
    ]
    if failures:
        print("\nFirst failures: " + "; ".join(failures))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=2000, help="per cell and repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny run: does the bench work?")
    args = parser.parse_args()
    if args.smoke:
        args.devices, args.messages, args.repetitions = 40, 40, 1
    print(
        f"# Phone workload, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="gateway-phone-") as tmp, processes() as started:
        sink = start_sink(started)
        results = measure(
            devices=args.devices,
            messages=args.messages,
            repetitions=args.repetitions,
            sink=sink,
            workdir=Path(tmp),
        )
    print_results(results)
    return 1 if any(f.failures for f in results.warm.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
