"""`gateway serve` as a real process: SIGHUP reloads, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

TIKTOK = "com.zhiliaoapp.musically"
BAN = f"""
[[policy]]
id = "remove-tiktok"
match.apps_any = ["{TIKTOK}"]
scope.device_class = ["mobile", "tablet"]
action = "reject"
message = "Remove TikTok from this device to keep mobile access to work email."
"""


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def _read_json_lines(
    stream: asyncio.StreamReader, wanted: str, within: float = 15.0
) -> dict[str, object]:
    async with asyncio.timeout(within):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"process ended before logging {wanted!r}")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == wanted:
                return event  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_serve_as_a_process_reloads_on_sighup_and_drains_on_sigterm(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--grace", "5",
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert process.stderr is not None
        try:
            listening = await _read_json_lines(process.stderr, "listening")
            port = int(str(listening["submission"]).rsplit(":", 1)[1])
            phone = FakeDevice(issuer, user="alice@example.test", apps={TIKTOK})
            assert (await phone.send(port)).mail == (
                550,
                "5.7.1 Remove TikTok from this device to keep mobile access to work email.",
            )
            policy = tmp_path / "policies" / "ban.toml"
            policy.write_text(policy.read_text() + 'state = "retracted"\n')
            process.send_signal(signal.SIGHUP)
            reload = await _read_json_lines(process.stderr, "policy_reload")
            assert reload["retracted"] == ["remove-tiktok"]
            result = await phone.send(port, at=datetime.now(UTC))
            assert result.data is not None
            assert result.data[0] == 250
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=10) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert len(upstream.messages) == 1
