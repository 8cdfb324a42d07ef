"""SMTP latency while an admin runs impact previews over 50,000 inventory devices.

    python -m bench.admin_impact            # 3 interleaved rounds of each
    python -m bench.admin_impact --smoke    # seconds: checks the bench itself works

One `gateway serve` (its own process, `--log-level info`) relaying to Postfix's
``smtp-sink``, with 50,000 devices in its inventory (written to the hold store before it
starts; half of them with TikTok, so the story's ban holds them). Rounds alternate:

a  bench/loadgen.py alone (AUTH PLAIN with device tokens; no policy matches them)
b  the same load while a client posts impact previews of the ban's retraction to
   /api/v1/impact back to back (each decides all 50,000 devices twice, in a worker thread)

Figures are medians of the rounds: SMTP messages/s and p50/p99 latency as the load
generator measures them, and how many previews ran during b (with their duration).
Target: b's p99 within noise of a's (the preview must not block the event loop).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.run import (
    REPO,
    Cell,
    Target,
    free_port,
    loadgen,
    processes,
    spawn_gateway,
    start_sink,
    write_tokens,
)
from gateway.admin.tokens import Role, add_token
from gateway.domain import Access, Device, DeviceClaims, DeviceClass, Platform
from gateway.hold.store import HoldStore
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

TIKTOK = "com.zhiliaoapp.musically"
BAN = f"""
[[policy]]
id = "remove-tiktok"
match.apps_any = ["{TIKTOK}"]
action = "hold"
message = "Remove TikTok."
state = "{{state}}"
"""


def seed_inventory(database: Path, count: int, issuer: str) -> None:
    """``count`` devices seen just now, half of them with TikTok."""
    now = datetime.now(UTC)
    store = HoldStore(database)
    try:
        batch = []
        for i in range(count):
            claims = DeviceClaims(
                issuer=issuer,
                subject=f"inv{i}@example.test",
                audience=("gateway",),
                issued_at=now,
                expires_at=now + timedelta(hours=1),
                device=Device(f"inv-{i}", Platform.IOS, DeviceClass.MOBILE),
                apps=frozenset({TIKTOK} if i % 2 else {"com.harmless.app"}),
            )
            batch.append((claims, now.timestamp(), Access.SEND))
            if len(batch) == 5000:
                store.record_devices(batch)
                batch = []
        store.record_devices(batch)
    finally:
        store.close()


class Previews:
    """Posts impact previews back to back on a thread until stopped."""

    def __init__(self, url: str, token: str, csrf: str) -> None:
        self.url, self.token, self.csrf = url, token, csrf
        self.durations: list[float] = []
        self.released: int = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = BAN.replace("{state}", "retracted").encode()
        while not self._stop.is_set():
            request = urllib.request.Request(  # noqa: S310  # loopback URL built here
                self.url,
                data=body,
                method="POST",
                headers={"Authorization": f"Bearer {self.token}", "X-Gateway-CSRF": self.csrf,
                         "Content-Type": "text/plain"},
            )  # fmt: skip
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
                report = json.loads(response.read())
            self.durations.append(time.perf_counter() - started)
            self.released = len(report["released"])

    def __enter__(self) -> Previews:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=180)


def session_csrf(base: str, token: str) -> str:
    request = urllib.request.Request(  # noqa: S310
        base + "/session", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        csrf: str = json.loads(response.read())["csrf"]
        return csrf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--devices", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    devices = 2_000 if args.smoke else args.devices
    rounds = 1 if args.smoke else args.rounds
    cell = Cell(concurrency=20, size=1024, per_connection=100, messages=500 if args.smoke else 6000)
    issuer = TestIssuer.generate("bench")
    with tempfile.TemporaryDirectory(prefix="bench-admin-") as tmp, processes() as started:
        workdir = Path(tmp)
        sink = start_sink(started)
        port, admin_port = free_port(), free_port()
        tokens_file = workdir / "admin-tokens"
        admin_token = add_token(tokens_file, "bench", Role.VIEWER)
        config = write_config(
            workdir,
            issuer=issuer,
            upstream_port=sink.port,
            policies={"ban.toml": BAN.replace("{state}", "enforce")},
            smtp={"listen": f"127.0.0.1:{port}", "idle_timeout": 300},
            admin={"listen": f"127.0.0.1:{admin_port}", "tokens_file": str(tokens_file)},
        )
        seed_inventory(workdir / "hold.db", devices, issuer.issuer)
        process = spawn_gateway(started, config, workdir / "gateway.log", port)
        target = Target(
            "g", "gateway", port, process, tokens=write_tokens(issuer, workdir / "t.json")
        )
        base = f"http://127.0.0.1:{admin_port}/api/v1"
        csrf = session_csrf(base, admin_token)
        loadgen(target, Cell(20, 1024, 100, 500))  # warm-up: connections, token cache
        figures: dict[str, dict[str, list[float]]] = {
            k: {"rate": [], "p50_ms": [], "p99_ms": []} for k in ("a", "b")
        }
        previews: list[Previews] = []
        for _ in range(rounds):
            for key in ("a", "b"):
                if key == "a":
                    result = loadgen(target, cell)
                else:
                    with Previews(base + "/impact", admin_token, csrf) as running:
                        time.sleep(0.5)  # the first preview is under way
                        result = loadgen(target, cell)
                    previews.append(running)
                if result["failures"]:
                    sys.exit(
                        f"bench: {result['failures']} failed messages: {result['first_failure']}"
                    )
                for name in ("rate", "p50_ms", "p99_ms"):
                    figures[key][name].append(float(result[name]))
        durations = [d for p in previews for d in p.durations]
        print(f"# SMTP while impact previews run ({devices} inventory devices)\n")
        print(f"{rounds} round(s) of {cell.messages} messages, {cell}; medians.\n")
        print("| round | msg/s | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|")
        for key, label in (("a", "SMTP alone"), ("b", "SMTP + impact previews")):
            f = figures[key]
            print(f"| {label} | {statistics.median(f['rate']):.0f} | "
                  f"{statistics.median(f['p50_ms']):.2f} | {statistics.median(f['p99_ms']):.2f} |")  # fmt: skip
        print(
            f"\nPreviews completed during b: {len(durations)}, median "
            f"{statistics.median(durations) if durations else 0:.2f} s each, "
            f"{previews[-1].released if previews else 0} devices released per preview."
        )
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, check=False)  # fmt: skip
        print(f"Commit {done.stdout.strip()}, {datetime.now(UTC):%Y-%m-%d}.")


if __name__ == "__main__":
    main()
