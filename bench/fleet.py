"""A fleet: 1, 2 and 3 ``gateway serve`` replicas on one PostgreSQL, behind HAProxy.

    python -m bench.fleet            # the full run: 3 repetitions (a few minutes)
    python -m bench.fleet --smoke    # seconds: does the bench work?

Three gateways share one throwaway PostgreSQL store (``initdb`` in a temporary directory,
``fsync`` on) and relay to Postfix's ``smtp-sink``. Three HAProxies in TCP mode, each
sending PROXY v2 (``send-proxy-v2``, health-checked with ``check-send-proxy``), balance
the first 1, 2 and 3 of them. bench/loadgen.py drives each HAProxy in turn, interleaved
(1 2 3, 1 2 3, ...), with AUTH PLAIN and device tokens, in two workloads:

relay  the devices are compliant: every message is relayed to smtp-sink (the store sees
       the device inventory only)
hold   the devices run a banned app: every message is held, one durable PostgreSQL write
       before the 250 (the store is emptied between runs)

Figures per cell are medians of the repetitions: messages/s, p50 and p99 latency per
message, CPU seconds per 1,000 messages of the gateways, PostgreSQL, HAProxy and the
generator. Then what a fleet-wide per-user message rate would cost: one upsert-and-count
on PostgreSQL per message, timed, against the message's own time.

All of it runs on this machine's CPUs: generator, HAProxy, PostgreSQL, smtp-sink and the
gateways share them, so more replicas cannot add CPU here. The figures show what the
fleet's machinery costs, not how a fleet on more machines scales.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import psycopg_pool

from bench.held_rss import BAN
from bench.run import (
    APPS,
    REPO,
    TIKTOK,
    child_pids,
    cpu_seconds,
    free_port,
    process_running,
    processes,
    spawn_gateway,
    start_sink,
)
from gateway.testing.haproxy import TemporaryHaproxy, temporary_haproxy
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.postgres import TemporaryPostgres, temporary_postgres

REPLICAS = (1, 2, 3)
WORKLOADS = ("relay", "hold")
DEVICES = 100  # tokens per workload, one user and device each
LOADGEN_TIMEOUT = 600.0
RATE_USERS = 100  # users the per-user counter is spread over


@dataclass(frozen=True)
class Plan:
    repetitions: int
    messages: dict[str, int]  # workload -> messages per run
    concurrency: int
    per_connection: int
    size: int
    upserts: int


PLANS = {
    "full": Plan(3, {"relay": 6000, "hold": 3000}, 30, 100, 1024, 3000),
    "smoke": Plan(1, {"relay": 300, "hold": 150}, 6, 50, 1024, 200),
}


@dataclass
class Cell:
    rate: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # part -> s per 1,000 messages
    failures: int = 0
    first_failure: str = ""

    @staticmethod
    def median(values: Sequence[float]) -> float:
        return statistics.median(values) if values else float("nan")


# --- CPU of the parts ---------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its living children (ended children are not counted:
    the pools keep their connections, so PostgreSQL's backends live through a run)."""
    total = 0.0
    for each in (pid, *child_pids(pid)):
        try:
            total += cpu_seconds(each)
        except (OSError, ValueError, IndexError):
            continue
    return total


# --- the fleet ------------------------------------------------------------------------------


def write_tokens(issuer: TestIssuer, path: Path, apps: list[str], prefix: str) -> Path:
    pairs = [
        [
            f"{prefix}{i}@example.test",
            issuer.token(
                subject=f"{prefix}{i}@example.test",
                device_id=f"{prefix}-{i}",
                apps=apps,
                lifetime=timedelta(hours=2),
            ),
        ]
        for i in range(DEVICES)
    ]
    path.write_text(json.dumps(pairs))
    return path


def gateway_config(workdir: Path, issuer: TestIssuer, sink_port: int, url: str) -> tuple[Path, int]:
    port = free_port()
    config = write_config(
        workdir,
        issuer=issuer,
        upstream_port=sink_port,
        policies={"ban.toml": BAN},
        smtp={
            "listen": f"127.0.0.1:{port}",
            "idle_timeout": 300,
            "proxy_protocol_from": ["127.0.0.1/32"],  # HAProxy, on loopback
        },
        # The hold workload's mail stays banned: passes over it would only add noise.
        hold={"release_interval_seconds": 3600},
    )
    with config.open("a") as out:
        out.write(f'\n[store]\nurl = "{url}"\n')
    return config, port


async def loadgen(port: int, tokens: Path, plan: Plan, workload: str) -> dict[str, float | str]:
    command = [
        sys.executable, "-m", "bench.loadgen", "--port", str(port), "--json",
        "--messages", str(plan.messages[workload]), "--concurrency", str(plan.concurrency),
        "--per-connection", str(plan.per_connection), "--size", str(plan.size),
        "--auth", str(tokens),
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), LOADGEN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"the generator took longer than {LOADGEN_TIMEOUT} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"the generator failed: {err.decode(errors='replace')[-2000:]}")
    result: dict[str, float | str] = json.loads(out)
    return result


async def measure(
    haproxy: TemporaryHaproxy,
    gateway_pids: Sequence[int],
    postgres: TemporaryPostgres,
    tokens: Path,
    plan: Plan,
    workload: str,
    cell: Cell,
) -> None:
    """One run of ``workload`` through ``haproxy``, its figures added to ``cell``."""
    assert postgres.process is not None
    assert haproxy.process is not None
    pids = {
        "gateways": list(gateway_pids),
        "PostgreSQL": [postgres.process.pid],
        "HAProxy": [haproxy.process.pid],
    }
    before = {part: sum(tree_cpu(p) for p in each) for part, each in pids.items()}
    out = await loadgen(haproxy.port, tokens, plan, workload)
    after = {part: sum(tree_cpu(p) for p in each) for part, each in pids.items()}
    messages = max(1.0, float(out["messages"]))
    cell.rate.append(float(out["rate"]))
    cell.p50.append(float(out["p50_ms"]))
    cell.p99.append(float(out["p99_ms"]))
    cell.failures += int(out["failures"]) + plan.messages[workload] - int(out["messages"])
    cell.first_failure = cell.first_failure or str(out["first_failure"])
    for part in pids:
        cell.cpu.setdefault(part, []).append((after[part] - before[part]) / messages * 1000)
    cell.cpu.setdefault("generator", []).append(float(out["cpu_seconds"]) / messages * 1000)


def empty_store(url: str) -> None:
    """Delete the held mail (the hold workload's), so each run starts from an empty store."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(b"TRUNCATE held CASCADE")


async def sessions_per_server(haproxy: TemporaryHaproxy) -> list[int]:
    """Sessions HAProxy sent to each gateway so far (``show stat`` stot)."""
    text = await haproxy.command("show stat")
    rows = csv.DictReader(io.StringIO(text.removeprefix("# ")))
    return [
        int(row["stot"] or 0)
        for row in rows
        if row.get("pxname") == "gateways" and row["svname"] not in ("BACKEND", "FRONTEND")
    ]


# --- a fleet-wide per-user rate: what one store round trip per message costs ------------------


RATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS bench_user_rate (user_key text NOT NULL, "
    "window_start bigint NOT NULL, n integer NOT NULL, PRIMARY KEY (user_key, window_start))"
)
UPSERT = (
    b"INSERT INTO bench_user_rate (user_key, window_start, n) VALUES (%s, %s, 1) "
    b"ON CONFLICT (user_key, window_start) DO UPDATE SET n = bench_user_rate.n + 1 RETURNING n"
)


@dataclass(frozen=True)
class UpsertFigures:
    durable_us: float  # median, synchronous_commit on
    async_commit_us: float  # median, synchronous_commit off (a lost count is harmless)
    postgres_cpu_us: float  # PostgreSQL's CPU per upsert, durable
    client_cpu_us: float  # the calling process's CPU per upsert (thread hop, psycopg), durable


async def upsert_figures(url: str, postgres: TemporaryPostgres, count: int) -> UpsertFigures:
    """Median µs of one upsert-and-count as the gateway would make it: on a store worker
    thread, over a pooled connection, one statement in autocommit (one round trip)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(RATE_TABLE.encode())
    assert postgres.process is not None
    results = []
    cpu_per = client_per = 0.0
    for synchronous in ("on", "off"):
        pool = psycopg_pool.ConnectionPool(
            url,
            kwargs={"autocommit": True, "options": f"-c synchronous_commit={synchronous}"},
            min_size=1,
            max_size=1,
            open=False,
        )
        pool.open(wait=True, timeout=10)
        executor = ThreadPoolExecutor(max_workers=1)
        loop = asyncio.get_running_loop()

        def upsert(n: int, pool: psycopg_pool.ConnectionPool = pool) -> int:
            with pool.connection() as conn:
                row = conn.execute(
                    UPSERT, (f"user{n % RATE_USERS}", int(time.time()) // 60)
                ).fetchone()
                return int(row[0]) if row else 0

        try:
            samples = []
            cpu_before = tree_cpu(postgres.process.pid)
            client_before = time.process_time()
            for n in range(count):
                started = time.perf_counter()
                await loop.run_in_executor(executor, upsert, n)
                samples.append((time.perf_counter() - started) * 1e6)
            if synchronous == "on":
                cpu_per = (tree_cpu(postgres.process.pid) - cpu_before) / count * 1e6
                client_per = (time.process_time() - client_before) / count * 1e6
            results.append(statistics.median(samples))
        finally:
            executor.shutdown(wait=True)
            pool.close()
    return UpsertFigures(results[0], results[1], cpu_per, client_per)


# --- the report -------------------------------------------------------------------------------

PARTS = ("gateways", "PostgreSQL", "HAProxy", "generator")


def print_cells(cells: dict[tuple[str, int], Cell], plan: Plan) -> None:
    print(f"\n## Throughput through HAProxy, medians of {plan.repetitions}\n")
    print(
        f"{plan.concurrency} client connections, {plan.per_connection} messages each (pipelined), "
        f"{plan.size // 1024} KiB messages, AUTH PLAIN with {DEVICES} device tokens per workload.\n"
    )
    print(
        "| workload | replicas | msg/s | vs 1 replica | p50 ms | p99 ms | failed "
        "| CPU s/1000 msgs: gateways | PostgreSQL | HAProxy | generator | runs msg/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for workload in WORKLOADS:
        one = Cell.median(cells[(workload, 1)].rate)
        for replicas in REPLICAS:
            c = cells[(workload, replicas)]
            rate = Cell.median(c.rate)
            cpu = " | ".join(f"{Cell.median(c.cpu.get(part, [])):.3f}" for part in PARTS)
            print(
                f"| {workload} | {replicas} | {rate:,.0f} | {rate / one:.2f} "
                f"| {Cell.median(c.p50):.2f} | {Cell.median(c.p99):.2f} | {c.failures} | {cpu} "
                f"| {', '.join(f'{r:,.0f}' for r in c.rate)} |"
            )
    failures = [c.first_failure for c in cells.values() if c.failures]
    if failures:
        print(f"\nfirst failure: {failures[0]}")


def print_rate_cost(figures: UpsertFigures, relay: Cell, replicas: int) -> None:
    p50_us = Cell.median(relay.p50) * 1000
    gateway_cpu_us = Cell.median(relay.cpu["gateways"]) * 1000  # s/1000 -> µs per message
    print("\n## What a fleet-wide per-user message rate would cost\n")
    print(
        "One upsert-and-count per message (`INSERT ... ON CONFLICT DO UPDATE SET n = n + 1 "
        "RETURNING n`, keyed by user and minute), on a store worker thread over a pooled "
        "connection, one round trip, the fleet idle:\n"
    )
    print(f"- durable (synchronous_commit on): {figures.durable_us:,.0f} µs per message (median)")
    print(
        f"- synchronous_commit off (a count lost in a crash is harmless): "
        f"{figures.async_commit_us:,.0f} µs per message (median)"
    )
    print(
        f"- CPU per durable upsert: PostgreSQL {figures.postgres_cpu_us:,.0f} µs, the calling "
        f"process {figures.client_cpu_us:,.0f} µs (the thread hop and psycopg)"
    )
    print(
        f"- against the message's own time, relayed through HAProxy to {replicas} replica: "
        f"p50 latency {p50_us:,.0f} µs, so +{figures.durable_us / p50_us:.0%} durable or "
        f"+{figures.async_commit_us / p50_us:.0%} without; the gateways' CPU "
        f"{gateway_cpu_us:,.0f} µs per message, to which the upsert's CPU "
        f"({figures.postgres_cpu_us + figures.client_cpu_us:,.0f} µs, on the same cores) adds "
        f"+{(figures.postgres_cpu_us + figures.client_cpu_us) / gateway_cpu_us:.0%}"
    )
    print(
        "- the limit stays per replica (`[limits] messages_per_user_per_minute`, a token bucket "
        "in each process): a limit of L per replica lets a user send up to N x L a minute "
        f"across N replicas (here up to {max(REPLICAS)} x L), as HAProxy spreads a user's "
        "connections"
    )


# --- main -----------------------------------------------------------------------------------


async def run(plan: Plan, mode: str) -> int:
    issuer = TestIssuer.generate("bench")
    print(
        f"# A fleet on one PostgreSQL behind HAProxy ({mode}), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    command = " ".join(["python -m bench.fleet", *sys.argv[1:]])
    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; command: {command}")
    print(
        f"\n**Shared machine:** these {os.cpu_count()} CPU cores are shared by the generator, "
        "HAProxy, PostgreSQL, smtp-sink and every gateway replica. A second or third replica "
        "adds no CPU here, only processes competing for the same cores: the table shows what "
        "running as a fleet costs (PROXY v2, the shared store, more processes), not how a "
        "fleet on separate machines scales."
    )
    with tempfile.TemporaryDirectory(prefix="gateway-bench-fleet-") as tmp, processes() as started:
        work = Path(tmp)
        sink = start_sink(started)
        relay_tokens = write_tokens(issuer, work / "relay.json", APPS[:5], "relay")
        hold_tokens = write_tokens(issuer, work / "hold.json", [TIKTOK, *APPS[:4]], "hold")
        tokens = {"relay": relay_tokens, "hold": hold_tokens}
        # Gateways stop before PostgreSQL and HAProxy do (the innermost context).
        async with (
            temporary_postgres(fsync=True) as postgres,
            AsyncExitStack() as stack,
        ):
            replicas_started = stack.enter_context(processes())
            version = (await postgres.psql("SHOW server_version")).strip()
            await postgres.psql("CREATE DATABASE fleet")
            url = postgres.url.rsplit("/", 1)[0] + "/fleet"
            print(f"PostgreSQL {version} (throwaway, fsync on); HAProxy in TCP mode, send-proxy-v2")
            gateways = []
            for n in range(max(REPLICAS)):
                config, port = gateway_config(work / f"gw{n}", issuer, sink.port, url)
                process = await asyncio.to_thread(
                    spawn_gateway, replicas_started, config, config.parent / "gateway.log", port
                )
                gateways.append((process.pid, port))
            haproxies = {}
            for replicas in REPLICAS:
                servers = [("127.0.0.1", port) for _, port in gateways[:replicas]]
                haproxies[replicas] = await stack.enter_async_context(temporary_haproxy(servers))
                await haproxies[replicas].wait_up(replicas, timeout=30)
            cells = {(w, r): Cell() for w in WORKLOADS for r in REPLICAS}
            for repetition in range(plan.repetitions):
                for workload in WORKLOADS:
                    for replicas in REPLICAS:
                        await measure(
                            haproxies[replicas],
                            [pid for pid, _ in gateways[:replicas]],
                            postgres,
                            tokens[workload],
                            plan,
                            workload,
                            cells[(workload, replicas)],
                        )
                        if workload == "hold":  # the next run starts from an empty store
                            await asyncio.to_thread(empty_store, url)
                print(f"  repetition {repetition + 1} measured", file=sys.stderr, flush=True)
            spread = {r: await sessions_per_server(h) for r, h in haproxies.items()}
            upserts = await upsert_figures(url, postgres, plan.upserts)
        print_cells(cells, plan)
        print(
            "\nSessions HAProxy sent to each replica over the whole run: "
            + "; ".join(f"{r} replica(s): {', '.join(map(str, s))}" for r, s in spread.items())
        )
        print_rate_cost(upserts, cells[("relay", 1)], 1)
    failed = sum(c.failures for c in cells.values())
    print(f"\nfailed messages: {failed}")
    print(f"smtp-sink left running: {'yes' if process_running('smtp-sink') else 'no'}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run: does the bench work?")
    args = parser.parse_args()
    for tool in ("smtp-sink", "haproxy"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} not found (apt-get install postfix haproxy)", file=sys.stderr)
            return 2
    mode = "smoke" if args.smoke else "full"
    return asyncio.run(run(PLANS[mode], mode))


if __name__ == "__main__":
    sys.exit(main())
