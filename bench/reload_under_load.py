"""SMTP latency while a 100,000-policy gateway reloads one file every 2 s.

    python -m bench.reload_under_load [--policies 100000] [--files 100] [--messages 4000]
                                      [--concurrency 10] [--interval 2] [--gateway-src DIR]
                                      [--json]

Writes ``policies`` app bans in ``files`` files (none matches the bench's devices), starts
`gateway serve` on them (uvloop when installed), and runs bench/loadgen.py (AUTH PLAIN,
100 devices, 1 KB messages, 10 per connection) twice: once with the policies left alone
(idle), once while the bench edits one file and sends SIGHUP every ``interval`` seconds.
Prints p50/p99/max per message and msg/s for both runs, p99 during / p99 idle (the target:
at most 2), and the server-side reload times from the gateway's log. ``--gateway-src``
runs the gateway from another checkout (PYTHONPATH), for before/after figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.inflight_rss import discarding_upstream
from bench.run import write_tokens
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer


def write_policies(directory: Path, count: int, files: int) -> Path:
    """App bans in ``files`` files; returns the file the bench edits."""
    directory.mkdir(parents=True, exist_ok=True)
    per_file = count // files
    for file_index in range(files):
        lines = [
            f'[[policy]]\nid = "ban-{i:06d}"\nmatch.apps_any = ["com.vendor{i}.app"]\n'
            f'action = "hold"\nmessage = "Remove app {i}."\nstate = "enforce"\n'
            for i in range(file_index * per_file, (file_index + 1) * per_file)
        ]
        (directory / f"bans-{file_index:03d}.toml").write_text("\n".join(lines))
    return directory / "bans-000.toml"


REPO = Path(__file__).resolve().parent.parent


def _port_in(log: Path) -> int | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"listening"' in line:
            return int(str(json.loads(line)["submission"]).rsplit(":", 1)[1])
    return None


async def _listening(log: Path, process: asyncio.subprocess.Process) -> int:
    async with asyncio.timeout(300):
        while process.returncode is None:
            port = _port_in(log)
            if port is not None:
                return port
            await asyncio.sleep(0.5)
    raise RuntimeError(f"gateway serve ended before listening; see {log}")


async def _load(port: int, tokens: Path, messages: int, concurrency: int) -> dict[str, float]:
    generator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.loadgen", "--port", str(port), "--json",
        "--messages", str(messages), "--concurrency", str(concurrency),
        "--per-connection", "10", "--size", "1024", "--auth", str(tokens),
        stdout=asyncio.subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    out, _ = await generator.communicate()
    figures: dict[str, float] = json.loads(out)
    return figures


async def measure(args: argparse.Namespace) -> dict[str, object]:
    issuer = TestIssuer.generate("bench")
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        edited = write_policies(directory / "policies", args.policies, args.files)
        original = edited.read_text()
        tokens = write_tokens(issuer, directory / "tokens.json")
        async with discarding_upstream() as (upstream_port, _):
            config = write_config(
                directory,
                issuer=issuer,
                upstream_port=upstream_port,
                smtp={"idle_timeout": 300},
                limits={"max_connections_per_ip": 1000, "command_call_limit": 100_000},
            )
            env = dict(os.environ)
            if args.gateway_src is not None:
                env["PYTHONPATH"] = str(args.gateway_src)
            log = directory / "gateway.log"
            with log.open("wb") as stderr:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "serve", "--config", str(config),
                    "--log-level", "info",
                    stderr=stderr, stdout=asyncio.subprocess.DEVNULL, env=env, cwd=name,
                )  # fmt: skip
            try:
                port = await _listening(log, process)
                await _load(port, tokens, 500, args.concurrency)  # warm up
                idle = await _load(port, tokens, args.messages, args.concurrency)
                log_before = log.stat().st_size
                load = asyncio.create_task(_load(port, tokens, args.messages, args.concurrency))
                reloads = 0
                while not load.done():
                    reloads += 1
                    edited.write_text(
                        original.replace("Remove app 0.", f"Remove app 0 ({reloads}).")
                    )
                    process.send_signal(signal.SIGHUP)
                    await asyncio.wait([load], timeout=args.interval)
                during = load.result()
                await asyncio.sleep(1.0)
            finally:
                process.terminate()
                await process.wait()
            seconds = []
            parsed_here = 0  # a changed file parsed in the serving process after all
            with log.open("rb") as stream:
                stream.seek(log_before)
                for line in stream:
                    if b'"policy_reload"' in line:
                        seconds.append(float(json.loads(line)["seconds"]))
                    parsed_here += b'"policy_parse_process_failed"' in line
    return {
        "policies": args.policies,
        "files": args.files,
        "idle": idle,
        "during_reloads": during,
        "reloads_sent": reloads,
        "reloads_logged": len(seconds),
        "reload_seconds_median": round(statistics.median(seconds), 3) if seconds else None,
        "p99_ratio": round(float(during["p99_ms"]) / float(idle["p99_ms"]), 2),
        "parse_process_failures": parsed_here,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--gateway-src", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{figures['policies']:,} policies in {figures['files']} files")
    for label in ("idle", "during_reloads"):
        run = figures[label]
        assert isinstance(run, dict)
        print(
            f"{label:>15}: {run['rate']:8.1f} msg/s  p50 {run['p50_ms']:8.2f} ms  "
            f"p99 {run['p99_ms']:8.2f} ms  failures {run['failures']}"
        )
    print(
        f"p99 during / idle: {figures['p99_ratio']} (target <= 2)   "
        f"reloads: {figures['reloads_logged']} logged of {figures['reloads_sent']} sent, "
        f"median {figures['reload_seconds_median']} s server-side, "
        f"{figures['parse_process_failures']} parse-process failures   "
        f"({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
