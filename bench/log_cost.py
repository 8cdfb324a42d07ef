"""What the log costs per message at the default level (info), event by event.

    python -m bench.log_cost [--rounds 5] [--calls 20000]

A gateway (in this process, the shipped policies, logging configured as `gateway serve`
does at ``info``) relays one message per session for a phone that authenticates with a
device token; the log lines those sessions write are captured. Then each captured event
is logged again, ``calls`` times per round, through the same processor chain into a
discarding stream, and timed with this thread's CPU clock:

  full       the gateway's chain (context, level, timestamp, secret redaction, control
             character escaping, JSON)
  no-guards  the same chain without redaction and escaping (``guard_fields``), to show
             what they cost
  filtered   the same call below the level in force (what a disabled event costs)

Figures are medians of the rounds, in µs per event and per message (events per message
as captured). The per-message CPU of the whole gateway is in bench.run's phone table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from bench.run import REPO
from gateway.ops import logs
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer

SESSIONS = 20
_STANDARD = {"event", "level", "timestamp", "logger"}


async def captured_events(directory: Path) -> list[dict[str, Any]]:
    """The events ``SESSIONS`` one-message sessions write at info, as JSON objects."""
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    issuer = TestIssuer.generate("log-cost")
    shipped = {p.name: p.read_text() for p in (REPO / "config" / "policies").glob("*.toml")}
    async with gateway_with_upstream(directory, issuer, shipped) as (gateway, _):
        stream.seek(0)
        stream.truncate()
        for n in range(SESSIONS):
            device = FakeDevice(issuer, user=f"user{n}@example.test", device_id=f"phone-{n}")
            result = await device.send(gateway.port)
            if not result.accepted:
                raise RuntimeError(f"session {n} was not accepted: {result}")
        lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _cpu_per_call(call: Callable[[], None], calls: int) -> float:
    started = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - started) / calls * 1e6


def _chain(level: str, guards: bool) -> None:
    processors = list(logs._processors(json=True))
    if not guards:
        processors = [p for p in processors if p is not logs.guard_fields]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            20 if level == "info" else 30  # logging.INFO, logging.WARNING
        ),
        logger_factory=structlog.WriteLoggerFactory(io.StringIO()),
        cache_logger_on_first_use=False,
    )


def measure(events: list[dict[str, Any]], rounds: int, calls: int) -> dict[str, list[float]]:
    """µs per message (all captured events of one message) for each chain, per round."""
    per_message = len(events) / SESSIONS
    samples = [
        (event["event"], {k: v for k, v in event.items() if k not in _STANDARD}) for event in events
    ]
    figures: dict[str, list[float]] = {"full": [], "no-guards": [], "filtered": []}
    log = structlog.get_logger("gateway")
    for _ in range(rounds):
        for name, level, guards in (
            ("full", "info", True),
            ("no-guards", "info", False),
            ("filtered", "warning", True),
        ):
            _chain(level, guards)
            costs = [
                _cpu_per_call(partial(log.info, event, **fields), calls // len(samples))
                for event, fields in samples
            ]
            figures[name].append(statistics.fmean(costs) * per_message)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20_000, help="log calls per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-log-cost-") as tmp:
        events = asyncio.run(captured_events(Path(tmp)))
    kinds = Counter(event["event"] for event in events)
    size = sum(len(json.dumps(event)) + 1 for event in events) / SESSIONS
    print(f"# Log cost per message at the default level (info), python {sys.version.split()[0]}")
    print(f"\n{SESSIONS} sessions of one message each wrote {len(events)} lines:")
    for kind, count in kinds.most_common():
        print(f"- {kind}: {count / SESSIONS:g} per message")
    print(f"- {size:,.0f} bytes of log per message")
    figures = measure(events, args.rounds, args.calls)
    full = statistics.median(figures["full"])
    print(f"\n| chain | µs CPU per message (median of {args.rounds}) | share of full |")
    print("|---|---:|---:|")
    for name, values in figures.items():
        value = statistics.median(values)
        print(f"| {name} | {value:.1f} | {value / full:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
