"""The benchmarks themselves must keep working: `bench.run --smoke` and `bench.held_rss
--quick` end to end (figures are not checked here; speed and memory are judged by the full
runs, never by a test)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.bench.kit import run_bench


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("smtp-source") is None, reason="needs Debian's postfix tools")
def test_bench_smoke_run_completes_without_failed_messages() -> None:
    done = run_bench("run", "--smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout
    for section in (
        "## Throughput",
        "## Ratios",
        "## Peak RSS",
        "## Other figures",
        "## The phones' workload",
        "## Idle sessions",
    ):
        assert section in report
    phone_rows = re.findall(
        r"^\| (ECDSA P-256|RSA 2048) \| (starttls|implicit) \| (gateway|bare) \|.* (\d+) \|$",
        report,
        re.MULTILINE,
    )
    assert len(phone_rows) == 8  # 2 certificates x 2 TLS modes x 2 targets
    assert all(failures == "0" for *_, failures in phone_rows)
    idle_rows = re.findall(r"^\| 50 \| (clear|starttls|implicit) \|", report, re.MULTILINE)
    assert idle_rows == ["clear", "starttls", "implicit"]
    rows = [line for line in report.splitlines() if re.match(r"\| c=\d", line)]
    assert len(rows) == 8 + 2  # 2 cells x 4 targets, then 2 ratio rows
    assert all(line.rstrip(" |").endswith(" 0") for line in rows[:8])  # no failed message
    assert "0 failed messages" in report  # reload under load
    assert report.rstrip().endswith("smtp-sink left running: no")


@pytest.mark.slow
def test_inflight_rss_bench_runs_and_reports_figures() -> None:
    done = run_bench("inflight_rss", "--messages", "2", "--size-mib", "1", "--json", timeout=120)
    figures = json.loads(done.stdout)
    assert figures["accepted"] == figures["upstream_accepted"] == 2
    assert figures["peak_rss_mib"] >= figures["rss_before_mib"] > 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="needs Debian's postfix tools")
def test_held_rss_quick_run_prints_every_case_and_both_verdicts() -> None:
    done = run_bench("held_rss", "--quick")
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout
    assert "## RSS with held mail across release ticks" in report
    rows = re.findall(r"^\| ([\d,]+) \| (1 KB|1 MB) \| (\d+) \|", report, re.MULTILINE)
    assert rows == [("0", "1 KB", "1"), ("20", "1 KB", "1"), ("0", "1 MB", "1"), ("5", "1 MB", "1")]
    assert re.search(r"flat within [\d.]+ MB \(target 50 MB\): (PASS|FAIL)", report)
    assert "## Peak RSS with 8 concurrent 1 MiB messages relayed" in report
    assert "failed messages: 0" in report
    assert re.search(r"target 2 x 8 x 1 MiB = 16 MiB: [\d.]+ of it: not judged", report)
    assert "smtp-sink left running: no" in report


@pytest.mark.slow
def test_sync_bench_smoke_run_reports_both_passdbs_and_the_endpoint() -> None:
    """`bench.sync --smoke`: logins through two real Dovecots (the gateway deciding, and a
    static passdb) and the endpoint alone, without a failed login or request."""
    from gateway.testing.dovecot import DovecotUnavailable, dovecot_binary

    try:
        dovecot_binary()
    except DovecotUnavailable as exc:
        pytest.skip(str(exc))
    done = run_bench("sync", "--smoke", "--json", timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout)
    for passdb in ("gateway", "static"):
        assert figures["logins"][passdb]["median"] > 0
        assert figures["logins"][passdb]["failures"] == 0
    assert figures["ratio"] > 0
    assert figures["endpoint"]["requests"] > 0
    assert figures["endpoint"]["errors"] == 0
    assert figures["endpoint"]["p99_ms"] >= figures["endpoint"]["p50_ms"] > 0


@pytest.mark.slow
def test_log_cost_bench_captures_a_sessions_lines_and_prints_each_chain() -> None:
    done = run_bench("log_cost", "--rounds", "1", "--calls", "200", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout
    assert "- auth_ok: 1 per message" in report
    assert "- decision: 1 per message" in report
    chains = re.findall(r"^\| (full|no-guards|filtered) \| ([\d.]+) \|", report, re.MULTILINE)
    assert [name for name, _ in chains] == ["full", "no-guards", "filtered"]
    assert all(float(value) > 0 for _, value in chains)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("smtp-sink") is None, reason="needs Debian's postfix tools")
def test_workers_bench_smoke_run_compares_one_worker_with_two() -> None:
    """`bench.workers --smoke`: both gateways (1 and 2 workers) take the phones' workload
    (STARTTLS, AUTH, one message per connection) without a failed message, and the ratio
    is printed."""
    done = run_bench("workers", "--smoke", timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(r"^\| ([12]) \| (\d+) \|.*\| (\d+) \|$", done.stdout, re.MULTILINE)
    assert [(workers, failed) for workers, _, failed in rows] == [("1", "0"), ("2", "0")]
    assert all(int(rate) > 0 for _, rate, _ in rows)
    assert re.search(r"Ratio, 2 workers / 1: [\d.]+x", done.stdout)


def _needs(*tools: str) -> None:
    """Skip unless the servers a bench starts are installed (PostgreSQL is found the way the
    test kit finds it, outside PATH on Debian)."""
    from gateway.testing.postgres import PostgresUnavailable, server_binaries

    try:
        server_binaries()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    for tool in tools:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin") is None:
            pytest.skip(f"needs {tool}")


@pytest.mark.slow
def test_stores_bench_smoke_run_compares_both_backends_side_by_side() -> None:
    """`bench.stores --smoke`: holds and a release on SQLite and on a throwaway PostgreSQL,
    every figure a positive rate, the ratio printed (the targets are judged by full runs)."""
    _needs("smtp-sink")
    done = run_bench("stores", "--smoke", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout
    assert "## Holds: messages/s" in report
    holds = re.findall(
        r"^\| (4|64) KiB, (1|16) sessions? \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|",
        report,
        re.MULTILINE,
    )
    assert [(size, sessions) for size, sessions, *_ in holds] == [
        ("4", "1"), ("4", "16"), ("64", "1"), ("64", "16"),
    ]  # fmt: skip
    for _, _, sqlite, postgres, ratio in holds:
        sqlite_rate, postgres_rate = (float(v.replace(",", "")) for v in (sqlite, postgres))
        assert sqlite_rate > 0
        assert postgres_rate > 0
        assert float(ratio) == pytest.approx(postgres_rate / sqlite_rate, abs=0.02, rel=0.02)
    assert re.search(r"in every cell: lowest ratio [\d.]+: not judged", report)
    release = {
        backend: (rate, cpu)
        for backend, rate, cpu in re.findall(
            r"^\| (SQLite|PostgreSQL) \| ([\d,]+) \| ([\d.]+) \|", report, re.MULTILINE
        )
    }
    assert set(release) == {"SQLite", "PostgreSQL"}
    for rate, cpu in release.values():
        assert float(rate.replace(",", "")) > 0
        assert float(cpu) > 0  # the gateway's CPU per released message
    assert re.search(r"^PostgreSQL / SQLite: [\d.]+$", report, re.MULTILINE)
    assert report.count("release >= 1,000 messages/s") == 2
    assert "smtp-sink left running: no" in report


@pytest.mark.slow
def test_fleet_bench_smoke_run_reports_every_replica_count_and_the_rate_cost() -> None:
    """`bench.fleet --smoke`: 1, 2 and 3 gateways on one PostgreSQL behind HAProxy, both
    workloads, no failed message, every replica given sessions, the per-user rate's cost."""
    _needs("smtp-sink", "haproxy")
    done = run_bench("fleet", "--smoke", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = done.stdout
    assert "CPU cores are shared by the generator, HAProxy, PostgreSQL" in report
    rows = re.findall(
        r"^\| (relay|hold) \| (\d) \| ([\d,]+) \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| (\d+) \|",
        report,
        re.MULTILINE,
    )
    assert [(w, r) for w, r, *_ in rows] == [
        (w, r) for w in ("relay", "hold") for r in ("1", "2", "3")
    ]
    for _, _, rate, p50, p99, failed in rows:
        assert float(rate.replace(",", "")) > 0
        assert float(p99) >= float(p50) > 0
        assert failed == "0"
    spread = re.search(r"1 replica\(s\): (\d+); 2 replica\(s\): (\d+), (\d+); "
                       r"3 replica\(s\): (\d+), (\d+), (\d+)", report)  # fmt: skip
    assert spread is not None
    assert all(int(sessions) > 0 for sessions in spread.groups())  # round robin reached all
    durable = re.search(r"durable \(synchronous_commit on\): ([\d,]+) µs per message", report)
    assert durable is not None
    assert int(durable.group(1).replace(",", "")) > 0
    assert "a limit of L per replica lets a user send up to N x L" in report
    assert "failed messages: 0" in report
    assert "smtp-sink left running: no" in report
