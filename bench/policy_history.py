"""What recording a policy version in the history costs, beside what loading the set costs.

    python -m bench.policy_history            # 1,000, 5,000 and 100,000 policies
    python -m bench.policy_history --smoke    # 200 and 1,000: does it work?

For each size, a policy directory of app bans in 10 files (bench/reload_under_load.py's
generator) is loaded by a PolicyStore as a start-up does, and recorded the way the
gateway records it (``read_contents`` + ``snapshot`` with the services' Fingerprints,
then one write to a fresh SQLite hold store); then one file is edited, the store reloads
(its parse cache parses that file only) and the new version is recorded the same way.
Each step is timed in the same round; medians of ``--rounds``. Sets of more than
MAX_POLICIES policies are not fingerprinted (compared by files only).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import structlog

from bench.reload_under_load import write_policies
from gateway.hold.store import HoldStore
from gateway.policy.history import (
    KEEP_VERSIONS,
    MAX_POLICIES,
    Fingerprints,
    read_contents,
    snapshot,
)
from gateway.policy.store import PolicyStore


def _record(
    policies: PolicyStore, fingerprints: Fingerprints, store: HoldStore, trigger: str
) -> float:
    started = time.perf_counter()
    policy_set = policies.current.source
    snap = snapshot(policy_set, read_contents(policy_set, policies.directory), fingerprints)
    store.record_policy_version(snap, time.time(), trigger, "bench", KEEP_VERSIONS)
    return time.perf_counter() - started


def measure(count: int, rounds: int) -> dict[str, float]:
    """Medians in ms: start-up load and its record, one-file reload and its record."""
    steps: dict[str, list[float]] = {"load": [], "record": [], "reload": [], "record2": []}
    with tempfile.TemporaryDirectory(prefix="bench-history-") as scratch:
        for n in range(rounds):
            directory = Path(scratch) / f"policies-{n}"
            edited = write_policies(directory, count, 10)
            with HoldStore(Path(scratch) / f"hold-{n}.db") as store:
                policies, fingerprints = PolicyStore(directory, {}), Fingerprints()
                started = time.perf_counter()
                policies.reload("startup")
                steps["load"].append(time.perf_counter() - started)
                steps["record"].append(_record(policies, fingerprints, store, "startup"))
                text = edited.read_text()
                edited.write_text(text.replace('"Remove app 0."', f'"Remove app 0 ({n})."'))
                started = time.perf_counter()
                policies.reload("sighup")
                steps["reload"].append(time.perf_counter() - started)
                steps["record2"].append(_record(policies, fingerprints, store, "sighup"))
                policies.close()
    return {step: statistics.median(values) * 1000 for step, values in steps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sets, one round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    # the reloads' policy_reload events list every policy added: not for a terminal
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sizes = (200, 1000) if args.smoke else (1000, 5000, 100_000)
    rounds = 1 if args.smoke else args.rounds
    print(
        "| policies | start-up load ms | its record ms | record / load "
        "| one-file reload ms | its record ms | record / reload |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for count in sizes:
        m = measure(count, rounds)
        note = "" if count <= MAX_POLICIES else " (not fingerprinted)"
        print(
            f"| {count}{note} | {m['load']:.0f} | {m['record']:.1f} "
            f"| {m['record'] / m['load']:.2f} | {m['reload']:.0f} | {m['record2']:.1f} "
            f"| {m['record2'] / m['reload']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
