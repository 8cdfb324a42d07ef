"""The gateway measured side by side with smtp-sink and a bare relay, in one run.

    python -m bench.run              # the full matrix (about 5 minutes on 2 cores)
    python -m bench.run --quick      # one repetition, fewer messages
    python -m bench.run --smoke      # seconds: checks the bench itself works (CI)

Targets, all on loopback, all relaying to one Postfix ``smtp-sink`` (not a Postfix daemon:
a standalone test program from Debian's ``postfix`` package, stopped at the end):
  a  smtp-sink directly: the ceiling of SMTP on this machine
  b  bench/bare_relay.py: aiosmtpd -> aiosmtplib, no policy, no AUTH
  c  the gateway: AUTH PLAIN with a device token, the shipped policies
  d  the gateway with 10,000 policies

The same generator (bench/loadgen.py) drives every target, with AUTH where the target
needs it; Postfix's smtp-source also drives a and b. Figures per cell are medians of
the repetitions, run interleaved (a b c d, a b c d, ...) so that machine noise spreads
evenly. Then: engine µs/decision, token verification with and without the cache, reload
of 10,000 policies under load, release of 10,000 held messages, and RSS with 1,000 idle
sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
APPS = [f"com.harmless{i}.app" for i in range(50)]  # no policy matches: every message allowed
TIKTOK = "com.zhiliaoapp.musically"


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (a supervisor's workers, a postmaster's
    backends)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def memory_mb(pid: int, key: str) -> float:
    """VmRSS (now) or VmHWM (peak) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_running(name: str) -> bool:
    """Like `pgrep -x -P <this process>`, from /proc (procps is not on every minimal
    machine): a child of this run with that name. Other programs' processes of the same
    name (another benchmark, a developer's own smtp-sink) are not this run's leftovers."""
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            parent = int(text[text.rindex(")") + 2 :].split()[1])
            if comm == name and parent == me:
                return True
    return False


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@dataclass
class Target:
    key: str
    label: str
    port: int
    process: subprocess.Popen[bytes]
    tokens: Path | None = None  # AUTH PLAIN credentials for the load generator
    cpu: list[float] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_sink(started: list[subprocess.Popen[bytes]]) -> Target:
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        # -m: smtp-sink serves 256 connections at once by default and queues the rest
        # unanswered; the relays' pools and 100 direct clients need more.
        ["smtp-sink", *user, "-m", "4000", f"127.0.0.1:{port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started.append(process)
    wait_for_port(port)
    return Target("a", "smtp-sink", port, process)


def start_bare_relay(started: list[subprocess.Popen[bytes]], sink: Target) -> Target:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_relay", "--listen", f"127.0.0.1:{port}",
         "--upstream", f"127.0.0.1:{sink.port}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started.append(process)
    wait_for_port(port)
    return Target("b", "bare relay", port, process)


def ten_thousand_policies(directory: Path, count: int = 10_000) -> None:
    """App bans, as in bench/engine.py, in 20 files; none matches the bench's devices."""
    directory.mkdir(parents=True, exist_ok=True)
    per_file = count // 20
    for file_index in range(20):
        lines = []
        for i in range(file_index * per_file, (file_index + 1) * per_file):
            lines.append(
                f'[[policy]]\nid = "ban-{i:05d}"\nmatch.apps_any = ["com.vendor{i}.app"]\n'
                f'action = "hold"\nmessage = "Remove app {i}."\nstate = "enforce"\n'
            )
        (directory / f"bans-{file_index:02d}.toml").write_text("\n".join(lines))


def gateway_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # Keep as many idle upstream connections as the bare relay does (it keeps all):
        # with fewer than the concurrent transactions, connections churn (docs/performance.md).
        GATEWAY_UPSTREAM__POOL_SIZE="128",
        GATEWAY_LIMITS__MAX_CONNECTIONS="5000",
        GATEWAY_LIMITS__MAX_CONNECTIONS_PER_IP="5000",
        GATEWAY_LIMITS__MESSAGES_PER_USER_PER_MINUTE="100000000",
        GATEWAY_LIMITS__COMMAND_CALL_LIMIT="100000000",
        GATEWAY_SMTP__MAX_MESSAGE_SIZE="10000000",
    )
    env.update(extra)
    return env


def spawn_gateway(
    started: list[subprocess.Popen[bytes]], config: Path, log_path: Path, port: int
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config),
             "--log-level", "info"],  # production default: a decision event per message
            cwd=REPO, env=gateway_env(), stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    started.append(process)
    wait_for_port(port, timeout=60)
    return process


def write_tokens(issuer: TestIssuer, path: Path, devices: int = 100) -> Path:
    pairs = [
        [
            f"user{i}@example.test",
            issuer.token(
                subject=f"user{i}@example.test",
                device_id=f"bench-{i}",
                apps=APPS,
                lifetime=timedelta(hours=2),
            ),
        ]
        for i in range(devices)
    ]
    path.write_text(json.dumps(pairs))
    return path


def start_gateway(
    started: list[subprocess.Popen[bytes]],
    workdir: Path,
    key: str,
    label: str,
    sink: Target,
    issuer: TestIssuer,
    policies: dict[str, str] | None,
) -> Target:
    port = free_port()
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=sink.port,
        policies=policies,
        smtp={"listen": f"127.0.0.1:{port}", "idle_timeout": 300},
    )
    process = spawn_gateway(started, config, workdir / "gateway.log", port)
    tokens = write_tokens(issuer, workdir / "tokens.json")
    return Target(key, label, port, process, tokens=tokens)


# --- load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    concurrency: int
    size: int
    per_connection: int
    messages: int

    def __str__(self) -> str:
        size = f"{self.size // 1024} KB"
        mode = "1/conn" if self.per_connection == 1 else f"{self.per_connection}/conn"
        return f"c={self.concurrency:<3} {size:>6} {mode:>8}"


@dataclass
class Figures:
    rate: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_per_1000: list[float] = field(default_factory=list)
    generator_cpu_per_1000: list[float] = field(default_factory=list)
    failures: int = 0

    def median(self, name: str) -> float:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else 0.0


def loadgen_command(target: Target, cell: Cell) -> list[str]:
    """The generator for one cell against one target, with AUTH where it needs it."""
    command = [
        sys.executable, "-m", "bench.loadgen", "--port", str(target.port), "--json",
        "--messages", str(cell.messages), "--concurrency", str(cell.concurrency),
        "--per-connection", str(cell.per_connection), "--size", str(cell.size),
    ]  # fmt: skip
    if target.tokens is not None:
        command += ["--auth", str(target.tokens)]
    return command


def loadgen(target: Target, cell: Cell) -> dict[str, float]:
    command = loadgen_command(target, cell)
    cpu_before = cpu_seconds(target.pid)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    cpu_after = cpu_seconds(target.pid)
    result: dict[str, float] = json.loads(done.stdout)
    result["target_cpu"] = cpu_after - cpu_before
    return result


def smtp_source(target: Target, cell: Cell) -> float:
    """Messages/s with Postfix's smtp-source (no AUTH: targets a and b only)."""
    command = [
        "smtp-source", "-l", str(cell.size), "-m", str(cell.messages),
        "-s", str(cell.concurrency), "-f", "load@example.test", "-t", "sink@example.test",
    ]  # fmt: skip
    if cell.per_connection > 1:
        command.append("-d")  # many messages per connection
    started = time.perf_counter()
    subprocess.run(
        [*command, f"127.0.0.1:{target.port}"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return cell.messages / (time.perf_counter() - started)


def run_matrix(
    targets: list[Target], cells: list[Cell], repetitions: int
) -> dict[tuple[str, Cell], Figures]:
    results: dict[tuple[str, Cell], Figures] = {}
    for cell in cells:
        for _ in range(repetitions):
            for target in targets:
                figures = results.setdefault((target.key, cell), Figures())
                out = loadgen(target, cell)
                figures.failures += int(out["failures"])
                figures.rate.append(out["rate"])
                figures.p50.append(out["p50_ms"])
                figures.p99.append(out["p99_ms"])
                messages = max(1.0, out["messages"])
                figures.cpu_per_1000.append(out["target_cpu"] / messages * 1000)
                figures.generator_cpu_per_1000.append(out["cpu_seconds"] / messages * 1000)
        print(f"  measured {cell}", file=sys.stderr, flush=True)
    return results


def print_matrix(
    targets: list[Target],
    cells: list[Cell],
    results: dict[tuple[str, Cell], Figures],
    source_rates: dict[tuple[str, Cell], float],
) -> None:
    print("\n## Throughput, latency and cost per cell (medians)\n")
    print(
        "| cell | target | msg/s | p50 ms | p99 ms | target CPU s/1000 | generator CPU s/1000 "
        "| smtp-source msg/s | failures |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        for target in targets:
            f = results[(target.key, cell)]
            source = source_rates.get((target.key, cell))
            print(
                f"| {cell} | {target.key} {target.label} | {f.median('rate'):,.0f} "
                f"| {f.median('p50'):.2f} | {f.median('p99'):.2f} "
                f"| {f.median('cpu_per_1000'):.3f} | {f.median('generator_cpu_per_1000'):.3f} "
                f"| {f'{source:,.0f}' if source else '-'} | {f.failures} |"
            )
    print("\n## Ratios (message rate, medians of the same cell)\n")
    print("| cell | c/b | c/a | d/c |")
    print("|---|---:|---:|---:|")
    for cell in cells:
        a, b, c, d = (results[(k, cell)].median("rate") for k in "abcd")
        print(f"| {cell} | {c / b:.2f} | {c / a:.3f} | {d / c:.2f} |")


# --- the extra figures --------------------------------------------------------------------


def engine_figure() -> float:
    from bench.engine import measure

    micros, _, _ = measure(10_000, rounds=5, calls=2000)
    return micros


def token_figures(issuer: TestIssuer) -> tuple[float, float]:
    from gateway.tokens.verify import TokenVerifier

    token = issuer.token(apps=APPS, lifetime=timedelta(hours=1))
    now = datetime.now(UTC)
    results = []
    for cache_size in (0, 4096):
        verifier = TokenVerifier(issuer.verifier_settings(), cache_size=cache_size)
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(1000):
                verifier.verify(token, now)
            samples.append((time.perf_counter() - started) / 1000 * 1e6)
        results.append(statistics.median(samples))
    return results[0], results[1]


def reload_figures(policy_dir: Path) -> tuple[list[float], list[float]]:
    """(cold loads, reloads after editing one file), seconds: read, parse, compile."""
    from gateway.policy.store import PolicyStore

    cold, edited = [], []
    for _ in range(3):
        store = PolicyStore(policy_dir, {})
        started = time.perf_counter()
        store.reload(trigger="bench")
        cold.append(time.perf_counter() - started)
    policy_file = policy_dir / "bans-00.toml"
    original = policy_file.read_text()
    for n in range(3):
        policy_file.write_text(original.replace("Remove app 0.", f"Remove app 0 ({n})."))
        started = time.perf_counter()
        result = store.reload(trigger="bench")
        edited.append(time.perf_counter() - started)
        if not result.ok or result.diff.changed != ("ban-00000",):
            raise RuntimeError(f"unexpected reload result: {result}")
    policy_file.write_text(original)
    return cold, edited


def reload_under_load(target: Target, workdir: Path, cell: Cell) -> tuple[int, int, list[float]]:
    """Edit a policy file and SIGHUP the 10,000-policy gateway every 0.25 s while the load
    runs; returns (reloads, failed messages, server-side reload seconds from its log)."""
    policy_file = workdir / "policies" / "bans-00.toml"
    original = policy_file.read_text()
    log_path = workdir / "gateway.log"
    log_before = log_path.stat().st_size
    generator = subprocess.Popen(
        loadgen_command(target, cell), cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    reloads = 0
    while generator.poll() is None:
        reloads += 1
        policy_file.write_text(original.replace("Remove app 0.", f"Remove app 0 ({reloads})."))
        target.process.send_signal(signal.SIGHUP)
        time.sleep(0.25)
    out = json.loads(generator.communicate()[0])
    policy_file.write_text(original)
    seconds = []
    with log_path.open("rb") as log:
        log.seek(log_before)
        for line in log:
            if b'"policy_reload"' in line:
                seconds.append(float(json.loads(line)["seconds"]))
    return reloads, int(out["failures"]), seconds


def release_figure(sink: Target, issuer: TestIssuer, workdir: Path, count: int) -> float:
    """Fill a hold store with ``count`` held messages from 1,000 devices, start a gateway
    on it, retract the ban, and time until the store is empty. Messages/s."""
    from gateway.domain import HeldSubmission
    from gateway.hold.store import HoldStore
    from gateway.policy.engine import decide
    from gateway.policy.store import PolicyStore
    from gateway.tokens.verify import TokenVerifier

    ban = (
        f'[[policy]]\nid = "ban"\nmatch.apps_any = ["{TIKTOK}"]\naction = "hold"\n'
        'message = "Remove TikTok."\nstate = "enforce"\n'
    )
    port = free_port()
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=sink.port,
        policies={"ban.toml": ban},
        smtp={"listen": f"127.0.0.1:{port}"},
    )
    verifier = TokenVerifier(issuer.verifier_settings())
    now = datetime.now(UTC)
    devices = [
        verifier.verify(
            issuer.token(
                subject=f"user{i}@example.test", device_id=f"held-{i}", apps=[TIKTOK, *APPS[:5]]
            ),
            now,
        )
        for i in range(1000)
    ]
    body = b"Subject: held\r\n\r\n" + b"x" * 1000 + b"\r\n"
    policies = PolicyStore(workdir / "policies", {})
    policies.reload(trigger="bench")
    store = HoldStore(workdir / "hold.db")
    store._db.execute("PRAGMA synchronous=OFF")  # filling only; the gateway uses FULL
    for n in range(count):
        claims = devices[n % len(devices)]
        decision = decide(policies.current, claims, now)
        store.hold(
            HeldSubmission(claims.subject, ("sink@example.test",), body, claims, decision, now)
        )
    store.close()
    with processes() as started:
        process = spawn_gateway(started, config, workdir / "gateway.log", port)
        db = sqlite3.connect(workdir / "hold.db")
        began = time.perf_counter()
        (workdir / "policies" / "ban.toml").write_text(ban.replace("enforce", "retracted"))
        process.send_signal(signal.SIGHUP)
        deadline = began + 300
        while time.perf_counter() < deadline:
            if db.execute("SELECT COUNT(*) FROM held").fetchone()[0] == 0:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - began
        left = db.execute("SELECT COUNT(*) FROM held").fetchone()[0]
        db.close()
    if left:
        raise RuntimeError(f"{left} held messages were not released within 300 s")
    return count / elapsed


async def idle_sessions(target: Target, count: int) -> float:
    """Open ``count`` authenticated sessions that then sit idle; the gateway's RSS in MB."""
    pairs = json.loads(target.tokens.read_text()) if target.tokens else []
    connections = []
    for i in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        await reader.readline()
        writer.write(b"EHLO idle.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        user, token = pairs[i % len(pairs)]
        writer.write(b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{token}".encode()) + b"\r\n")
        reply = await reader.readline()
        if not reply.startswith(b"235"):
            raise RuntimeError(f"idle session {i}: {reply!r}")
        connections.append(writer)
    await asyncio.sleep(1.0)
    rss = memory_mb(target.pid, "VmRSS")
    for writer in connections:
        writer.close()
    return rss


# --- main ---------------------------------------------------------------------------------


def cells_for(mode: str) -> tuple[list[Cell], int]:
    if mode == "smoke":
        return [Cell(20, 1024, 100, 200), Cell(5, 102400, 1, 20)], 1
    scale = 0.4 if mode == "quick" else 1.0
    cells = []
    for concurrency in (1, 20, 100):
        for size in (1024, 102400):
            for per_connection in (100, 1):
                base = 3000 if size == 1024 and per_connection > 1 else 1000
                if size > 1024:
                    base //= 2
                if concurrency == 1:
                    base //= 3
                cells.append(Cell(concurrency, size, per_connection, max(50, int(base * scale))))
    return cells, 1 if mode == "quick" else 3


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="one repetition, fewer messages")
    group.add_argument("--smoke", action="store_true", help="tiny run: does the bench work?")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    for tool in ("smtp-sink", "smtp-source"):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} not found. Install Debian's postfix package for its test tools:\n"
                "  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix\n"
                "(the bench runs smtp-sink itself and never starts the Postfix daemon)",
                file=sys.stderr,
            )
            return 2
    cells, repetitions = cells_for(mode)
    issuer = TestIssuer.generate("bench")
    print(f"# Compliance Gateway benchmark ({mode}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {repetitions} repetition(s)")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, processes() as started:
        work = Path(tmp)
        sink = start_sink(started)
        bare = start_bare_relay(started, sink)
        shipped = {p.name: p.read_text() for p in (REPO / "config" / "policies").glob("*.toml")}
        gateway = start_gateway(
            started, work / "c", "c", "gateway, shipped policies", sink, issuer, shipped
        )
        policy_count = 100 if mode == "smoke" else 10_000
        ten_thousand_policies(work / "d" / "policies", policy_count)
        big = start_gateway(
            started, work / "d", "d", f"gateway, {policy_count:,} policies", sink, issuer, None
        )
        targets = [sink, bare, gateway, big]
        results = run_matrix(targets, cells, repetitions)
        source_rates = {
            (target.key, cell): smtp_source(target, cell)
            for cell in cells
            for target in (sink, bare)
        }
        print_matrix(targets, cells, results, source_rates)
        print("\n## Peak RSS over the whole run (VmHWM)\n")
        for target in targets:
            print(f"- {target.key} {target.label}: {memory_mb(target.pid, 'VmHWM'):.1f} MB")

        print("\n## Other figures\n")
        print(f"- engine: {engine_figure():.1f} µs per decision at 10,000 policies (median)")
        uncached, cached = token_figures(issuer)
        per_session = next(c.per_connection for c in cells if c.per_connection > 1)
        print(
            f"- token verification: {uncached:.1f} µs uncached, {cached:.1f} µs from the cache; "
            f"once per session of {per_session} messages: {uncached / per_session:.2f} µs/message"
        )
        cold, edited = reload_figures(work / "d" / "policies")
        count = f"{policy_count:,}"
        print(
            f"- {count} policies, in-process (read, parse, compile): cold load (start-up) median "
            f"{statistics.median(cold):.3f} s; reload after editing one file median "
            f"{statistics.median(edited):.3f} s ({', '.join(f'{s:.3f}' for s in edited)})"
        )
        load_cell = Cell(20, 1024, 100, 400 if mode == "smoke" else 6000)
        reloads, failures, server_seconds = reload_under_load(big, work / "d", load_cell)
        print(
            f"- reload under load (d, {load_cell}): {reloads} SIGHUP reloads, {failures} failed "
            f"messages; server-side reload time median "
            f"{statistics.median(server_seconds) if server_seconds else float('nan'):.3f} s, "
            f"max {max(server_seconds, default=float('nan')):.3f} s ({len(server_seconds)} logged)"
        )
        held = 500 if mode == "smoke" else 10_000
        rate = release_figure(sink, issuer, work / "release", held)
        print(f"- release of {held:,} held messages to smtp-sink: {rate:,.0f} messages/s")
        sessions = 100 if mode == "smoke" else 1000
        rss_before = memory_mb(gateway.pid, "VmRSS")
        rss = asyncio.run(idle_sessions(gateway, sessions))
        print(
            f"- RSS with {sessions:,} idle authenticated sessions: {rss:.1f} MB "
            f"(before: {rss_before:.1f} MB)"
        )
        phone_failures = phone_workload(mode, sink, work / "phone")
    idle_session_table(mode)
    print(f"\nsmtp-sink left running: {'yes' if process_running('smtp-sink') else 'no'}")
    return 1 if phone_failures else 0


def phone_workload(mode: str, sink: Target, workdir: Path) -> int:
    """The phones' table (bench/phone.py) against the run's own sink; failed messages."""
    from bench import phone  # bench.phone builds on this module's helpers

    devices, messages, repetitions = {
        "smoke": (40, 40, 1),
        "quick": (5000, 1000, 1),
        "full": (5000, 2000, 3),
    }[mode]
    workdir.mkdir()
    results = phone.measure(
        devices=devices, messages=messages, repetitions=repetitions, sink=sink, workdir=workdir
    )
    phone.print_results(results)
    return sum(f.failures for f in results.warm.values())


def idle_session_table(mode: str) -> None:
    """RSS of a fresh gateway per mode holding idle sessions, then after they close."""
    from bench import idle_sessions

    counts = {"smoke": (50,), "quick": (1000,), "full": (1000, 10_000)}[mode]
    idle_sessions.raise_fd_limit()
    print("\n## Idle sessions: gateway RSS (ECDSA P-256, uvloop)\n")
    print("| sessions | mode | RSS before MB | RSS idle MB | KB/session | RSS after close MB |")
    print("|---:|---|---:|---:|---:|---:|")
    verdict = ""
    for count in counts:
        for name in idle_sessions.MODES:
            row = idle_sessions.run_mode(idle_sessions.measure_mode(name, count, None))
            print(
                f"| {count:,} | {name} | {row['rss_base_mb']} | {row['rss_idle_mb']} "
                f"| {row['kb_per_session']} | {row['rss_after_close_mb']} |",
                flush=True,
            )
            if count == 10_000 and name == "starttls":
                idle = float(row["rss_idle_mb"])
                verdict = f"{idle:.0f} MB: {'met' if idle <= 600 else 'not met'}"
    if verdict:
        print(f"\nTarget: 10,000 idle STARTTLS sessions ≤ 600 MB RSS: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
