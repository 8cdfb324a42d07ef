"""The gateway's memory with held mail across release ticks, and with large mail in flight.

    python -m bench.held_rss            # the full run (about 8 minutes, 1.3 GB of disk)
    python -m bench.held_rss --huge     # also 10,000 held x 1 MB (about 11 GB of disk)
    python -m bench.held_rss --quick    # seconds per case, tiny numbers: does it work?

Part 1, held mail. For each case (0, 1,000 and 10,000 held with 1 KB bodies; 0, 100 and
1,000 with 1 MB bodies), a fresh hold store is filled directly through
``HoldStore.hold`` (messages from up to 1,000 devices, all held by one app ban), then a
real ``python -m gateway serve`` runs on it with smtp-sink as its upstream. The policy
still holds every message, so every release pass reads the held mail, decides and
sends nothing: the case the issue's crash loop came from. Passes are the gateway's own
release tick (5 s, not configurable from the command line); the bench counts them by
the store's write probe, which each tick writes first. The gateway's RSS (VmRSS) is
sampled every 20 ms over ``--ticks`` ticks after the first; its peak over that window
is VmHWM, reset at the window's start (``/proc/PID/clear_refs``). Target: flat within
50 MB across cases and ticks.

Part 2, mail in flight. A fresh gateway (nothing held, the messages allowed) relays 8
concurrent 24 MiB messages, one per client (bench/loadgen.py), to smtp-sink, which
discards them. Target: peak RSS (VmHWM) below 2 x 8 x 24 MiB = 384 MiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from bench.run import (
    REPO,
    TIKTOK,
    Target,
    cpu_seconds,
    free_port,
    memory_mb,
    process_running,
    processes,
    start_sink,
    wait_for_port,
)
from gateway.domain import DeviceClaims
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

KB = 1024
MB = 1024 * 1024
FLAT_MB = 50.0  # part 1's target: RSS within this across cases and ticks
DEVICES = 1000  # held mail comes from at most this many devices
RELEASE_TICK = 5.0  # gateway/server.py RELEASE_TICK: the passes this bench waits for
BAN = (
    f'[[policy]]\nid = "ban"\nmatch.apps_any = ["{TIKTOK}"]\naction = "hold"\n'
    'message = "Remove TikTok."\nstate = "enforce"\n'
)
HARMLESS = ["com.harmless.app"]


@dataclass(frozen=True)
class Case:
    held: int
    size: int

    @property
    def body(self) -> str:
        return f"{self.size // MB} MB" if self.size >= MB else f"{self.size // KB} KB"

    @property
    def disk_bytes(self) -> int:
        return self.held * (self.size + 2 * KB)  # body, row and index overhead


@dataclass
class TickFigures:
    peak_rss: float  # MB, the highest sample between this tick's probe and the next
    cpu: float  # seconds of gateway CPU
    read_mb: float  # bytes the gateway read (rchar), MB


@dataclass
class CaseFigures:
    case: Case
    samples: list[float] = field(default_factory=list)  # VmRSS, MB
    ticks: list[TickFigures] = field(default_factory=list)
    peak: float = 0.0  # VmHWM over the measured window, MB
    peak_since_start: float = 0.0  # VmHWM from start-up to the window's start, MB
    hwm_reset: bool = True
    fill_seconds: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        return max(self.peak, *self.samples) - min(self.samples)


# --- the gateway process ------------------------------------------------------------------


def read_bytes(pid: int) -> float:
    """Bytes read by the process (rchar: read syscalls, page cache hits included), MB."""
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def spawn_gateway(
    started: list[subprocess.Popen[bytes]], config: Path, port: int
) -> subprocess.Popen[bytes]:
    with (config.parent / "gateway.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--log-level", "info"],  # the production default
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    started.append(process)
    wait_for_port(port, timeout=60)
    return process


def gateway_config(workdir: Path, issuer: TestIssuer, sink: Target) -> tuple[Path, int]:
    port = free_port()
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=sink.port,
        policies={"ban.toml": BAN},
        smtp={"listen": f"127.0.0.1:{port}", "idle_timeout": 300},
    )
    return config, port


# --- part 1: held mail --------------------------------------------------------------------


def make_body(size: int) -> bytes:
    header = b"From: <user@example.test>\r\nTo: <sink@example.test>\r\nSubject: held\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(max(0, size - len(header)), len(line))
    return header + line * lines + b"x" * max(0, rest - 2) + b"\r\n"


def held_devices(issuer: TestIssuer, count: int) -> list[DeviceClaims]:
    """Devices with the banned app, their claims verified as the gateway verifies them."""
    from gateway.tokens.verify import TokenVerifier

    verifier = TokenVerifier(issuer.verifier_settings())
    now = datetime.now(UTC)
    return [
        verifier.verify(
            issuer.token(
                subject=f"user{i}@example.test",
                device_id=f"held-{i}",
                apps=[TIKTOK, *HARMLESS],
                lifetime=timedelta(hours=2),
            ),
            now,
        )
        for i in range(count)
    ]


def fill_store(database: Path, policy_dir: Path, issuer: TestIssuer, case: Case) -> None:
    """Hold ``case.held`` messages as the gateway does: the device's verified claims, the
    engine's decision under the same policies, one HeldSubmission per message."""
    from gateway.domain import Action, HeldSubmission
    from gateway.hold.store import HoldStore
    from gateway.policy.engine import decide
    from gateway.policy.store import PolicyStore

    now = datetime.now(UTC)
    devices = held_devices(issuer, min(case.held, DEVICES))
    policies = PolicyStore(policy_dir, {})
    policies.reload(trigger="bench")
    body = make_body(case.size)
    store = HoldStore(database)
    store._db.execute("PRAGMA synchronous=OFF")  # filling only; the gateway uses FULL
    try:
        for n in range(case.held):
            claims = devices[n % len(devices)]
            decision = decide(policies.current, claims, now)
            if decision.action is not Action.HOLD:
                raise RuntimeError(f"the bench's policy does not hold its devices: {decision}")
            store.hold(
                HeldSubmission(claims.subject, ("sink@example.test",), body, claims, decision, now)
            )
    finally:
        store.close()


def last_probe(db: sqlite3.Connection) -> float | None:
    """When the gateway's tick last wrote its store probe (None before the first tick)."""
    with suppress(sqlite3.Error):
        row = db.execute("SELECT written_at FROM health WHERE id = 1").fetchone()
        return float(row[0]) if row else None
    return None


def watch_ticks(pid: int, database: Path, ticks: int, figures: CaseFigures) -> None:
    """Wait for the first tick, then sample RSS over ``ticks`` more."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    try:
        deadline = time.monotonic() + 60 + ticks * 60  # a pass may take long: say so, not hang
        seen = last_probe(db)
        while (probe := last_probe(db)) == seen or probe is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no release tick within {deadline} s (see gateway.log)")
            time.sleep(0.02)
        figures.peak_since_start = memory_mb(pid, "VmHWM")
        figures.hwm_reset = reset_peak(pid)
        seen, tick_peak = probe, 0.0
        cpu, read = cpu_seconds(pid), read_bytes(pid)
        last_check = 0.0
        while len(figures.ticks) < ticks and time.monotonic() < deadline:
            rss = memory_mb(pid, "VmRSS")
            figures.samples.append(rss)
            tick_peak = max(tick_peak, rss)
            if time.monotonic() - last_check >= 0.1:
                last_check = time.monotonic()
                probe = last_probe(db)
                if probe != seen:  # a new tick began: the previous one is complete
                    cpu_now, read_now = cpu_seconds(pid), read_bytes(pid)
                    figures.ticks.append(TickFigures(tick_peak, cpu_now - cpu, read_now - read))
                    seen, tick_peak, cpu, read = probe, rss, cpu_now, read_now
            time.sleep(0.02)
        figures.peak = memory_mb(pid, "VmHWM")
        if not figures.hwm_reset:  # VmHWM covers start-up too: the samples' peak instead
            figures.peak = max(figures.samples)
    finally:
        db.close()


def measure_case(
    work: Path, issuer: TestIssuer, sink: Target, case: Case, ticks: int
) -> CaseFigures:
    workdir = work / f"held-{case.held}-{case.size}"
    config, port = gateway_config(workdir, issuer, sink)
    figures = CaseFigures(case)
    started_fill = time.perf_counter()
    fill_store(workdir / "hold.db", workdir / "policies", issuer, case)
    figures.fill_seconds = time.perf_counter() - started_fill
    with processes() as started:
        process = spawn_gateway(started, config, port)
        watch_ticks(process.pid, workdir / "hold.db", ticks, figures)
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited ({process.returncode}); see {workdir}")
    shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"  measured {case.held:,} held x {case.body}: {len(figures.ticks)} ticks",
        file=sys.stderr,
        flush=True,
    )
    return figures


def print_held(results: list[CaseFigures], ticks: int) -> bool:
    print("\n## RSS with held mail across release ticks\n")
    print(
        f"Passes: the gateway's own release tick (every {RELEASE_TICK:g} s; not configurable "
        f"from the command line), counted by the store's write probe; {ticks} ticks per case "
        "after the first. The policy holds every message, so each pass reads all of them and "
        "sends none.\n"
    )
    print(
        "| held | body | ticks | RSS median MB | RSS max MB | peak (VmHWM) MB | max-min MB "
        "| median vs 0 held | peak - 0-held median MB | CPU s/tick | MB read/tick "
        "| peak at start-up MB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    baselines = {r.case.size: r.median for r in results if r.case.held == 0}
    for r in results:
        base = baselines.get(r.case.size, results[0].median)
        cpu = statistics.median(t.cpu for t in r.ticks) if r.ticks else float("nan")
        read = statistics.median(t.read_mb for t in r.ticks) if r.ticks else float("nan")
        print(
            f"| {r.case.held:,} | {r.case.body} | {len(r.ticks)} | {r.median:.1f} "
            f"| {max(r.samples):.1f} | {r.peak:.1f} | {r.spread:.1f} "
            f"| {r.median / base:.2f}x ({r.median - base:+.1f} MB) | {r.peak - base:+.1f} "
            f"| {cpu:.3f} | {read:,.1f} | {r.peak_since_start:.1f} |"
        )
    if not all(r.hwm_reset for r in results):
        print("\n(VmHWM could not be reset here: peaks are the highest 20 ms samples)")
    highest = max(max(r.peak, *r.samples) for r in results)
    lowest = min(min(r.samples) for r in results)
    short = [r for r in results if len(r.ticks) < ticks]
    flat = highest - lowest
    verdict = "PASS" if flat <= FLAT_MB and not short else "FAIL"
    print(
        f"\nRSS across all cases and ticks: lowest {lowest:.1f} MB, highest {highest:.1f} MB: "
        f"flat within {flat:.1f} MB (target {FLAT_MB:.0f} MB): {verdict}"
        + (f"; {len(short)} case(s) saw fewer than {ticks} ticks" if short else "")
    )
    return verdict == "PASS"


# --- part 2: mail in flight ---------------------------------------------------------------


@dataclass
class InFlight:
    clients: int
    size: int
    before: list[float] = field(default_factory=list)  # VmRSS before each round, MB
    peaks: list[float] = field(default_factory=list)  # VmHWM over each round, MB
    seconds: list[float] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""

    @property
    def target(self) -> float:
        return 2 * self.clients * self.size / MB


def measure_in_flight(
    work: Path, issuer: TestIssuer, sink: Target, clients: int, size: int, rounds: int
) -> InFlight:
    workdir = work / "in-flight"
    config, port = gateway_config(workdir, issuer, sink)
    tokens = workdir / "tokens.json"
    tokens.write_text(
        json.dumps(
            [
                [
                    f"big{i}@example.test",
                    issuer.token(
                        subject=f"big{i}@example.test",
                        device_id=f"big-{i}",
                        apps=HARMLESS,  # the ban does not match: relayed
                        lifetime=timedelta(hours=2),
                    ),
                ]
                for i in range(clients)
            ]
        )
    )
    result = InFlight(clients, size)
    with processes() as started:
        process = spawn_gateway(started, config, port)
        time.sleep(1.0)  # start-up settled
        for _ in range(rounds):
            result.before.append(memory_mb(process.pid, "VmRSS"))
            if not reset_peak(process.pid):
                print("  (VmHWM could not be reset: the peak includes start-up)", file=sys.stderr)
            command = [
                sys.executable, "-m", "bench.loadgen", "--port", str(port), "--json",
                "--messages", str(clients), "--concurrency", str(clients),
                "--per-connection", "1", "--size", str(size), "--auth", str(tokens),
            ]  # fmt: skip
            began = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
            result.seconds.append(time.perf_counter() - began)
            out = json.loads(done.stdout)
            result.failures += int(out["failures"]) + clients - int(out["messages"])
            result.first_failure = result.first_failure or str(out["first_failure"])
            result.peaks.append(memory_mb(process.pid, "VmHWM"))
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited ({process.returncode}); see {workdir}")
        process.send_signal(signal.SIGTERM)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def print_in_flight(result: InFlight, judged: bool) -> bool:
    """Print part 2; ``judged``: the target is for 24 MiB messages, not --quick's."""
    size = f"{result.size / MB:g} MiB"
    print(f"\n## Peak RSS with {result.clients} concurrent {size} messages relayed\n")
    print(
        f"Each of {result.clients} clients sends one {size} message at once (AUTH PLAIN, "
        f"allowed), relayed to smtp-sink, which discards it; {len(result.peaks)} round(s) "
        "on one gateway, VmHWM reset before each.\n"
    )
    peak = max(result.peaks)
    median = statistics.median(result.peaks)
    before = statistics.median(result.before)
    in_flight = result.clients * result.size / MB
    print(f"- RSS before: {before:.1f} MB (median)")
    print(
        f"- peak RSS (VmHWM): median {median:.1f} MB, max {peak:.1f} MB "
        f"({', '.join(f'{p:.1f}' for p in result.peaks)})"
    )
    print(
        f"- growth over the {in_flight:g} MiB in flight: {(peak - before) / in_flight:.2f} "
        "bytes of RSS per byte of message"
    )
    print(
        f"- seconds per round: {statistics.median(result.seconds):.2f} (median); "
        f"failed messages: {result.failures}"
        + (f" (first: {result.first_failure})" if result.failures else "")
    )
    verdict = "PASS" if peak < result.target and not result.failures else "FAIL"
    print(
        f"\nPeak {peak:.1f} MB against the target 2 x {result.clients} x {size} = "
        f"{result.target:.0f} MiB: {peak / result.target:.2f} of it: "
        + (verdict if judged else "not judged (--quick: the target is for 24 MiB messages)")
    )
    return verdict == "PASS" or not judged


# --- main ---------------------------------------------------------------------------------


def cases_for(mode: str, huge: bool) -> list[Case]:
    if mode == "quick":
        return [Case(0, KB), Case(20, KB), Case(0, MB), Case(5, MB)]
    cases = [Case(n, KB) for n in (0, 1000, 10_000)] + [Case(n, MB) for n in (0, 100, 1000)]
    if huge:
        cases.append(Case(10_000, MB))
    return cases


def check_disk(work: Path, cases: Sequence[Case]) -> str | None:
    """Why the run cannot go on (too little free disk), or None. Cases run one after
    another and each store is removed after its case: the largest one counts."""
    largest = max(cases, key=lambda c: c.disk_bytes)
    needed = largest.disk_bytes * 1.2 + 512 * MB  # WAL, page slack, logs
    free = shutil.disk_usage(work).free
    if free < needed:
        return (
            f"bench: {work} has {free / 1e9:.1f} GB free; the largest case ({largest.held:,} "
            f"held x {largest.body}) needs about {needed / 1e9:.1f} GB. Free some space or "
            "point TMPDIR at a larger disk"
            + (" (or run without --huge)." if largest.held * largest.size >= 10_000 * MB else ".")
        )
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny numbers, one tick per case")
    parser.add_argument(
        "--huge", action="store_true", help="also 10,000 held x 1 MB (about 11 GB of disk)"
    )
    parser.add_argument("--ticks", type=int, help="release ticks measured per case (default 10)")
    parser.add_argument("--rounds", type=int, help="rounds of the in-flight part (default 3)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    ticks = args.ticks or (1 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    in_flight_size = 1 * MB if args.quick else 24 * MB
    if shutil.which("smtp-sink") is None:
        print(
            "bench: smtp-sink not found. Install Debian's postfix package for its test tools:\n"
            "  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix\n"
            "(the bench runs smtp-sink itself and never starts the Postfix daemon)",
            file=sys.stderr,
        )
        return 2
    cases = cases_for(mode, args.huge)
    # The in-process policy load (filling the stores) logs; keep the report on stdout clean.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    with tempfile.TemporaryDirectory(prefix="gateway-held-rss-") as tmp, processes() as started:
        work = Path(tmp)
        if (refusal := check_disk(work, cases)) is not None:
            print(refusal, file=sys.stderr)
            return 2
        print(f"# Gateway memory with held mail ({mode}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        command = " ".join(["python -m bench.held_rss", *sys.argv[1:]])
        print(f"python {sys.version.split()[0]}; command: {command}")
        issuer = TestIssuer.generate("bench")
        sink = start_sink(started)
        results = [measure_case(work, issuer, sink, case, ticks) for case in cases]
        flat = print_held(results, ticks)
        in_flight = measure_in_flight(work, issuer, sink, 8, in_flight_size, rounds)
        bounded = print_in_flight(in_flight, judged=not args.quick)
    print(f"\nsmtp-sink left running: {'yes' if process_running('smtp-sink') else 'no'}")
    print(f"overall: {'PASS' if flat and bounded else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
