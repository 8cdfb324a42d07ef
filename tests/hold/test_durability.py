"""Held mail survives SIGKILL; the admin CLI lists, releases and drops it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban

BAN = tiktok_ban("hold", phones_only=False)


@asynccontextmanager
async def serve(config: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--grace", "2",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        async with asyncio.timeout(15):
            while True:
                line = await process.stderr.readline()
                assert line, "gateway exited before listening"
                if b'"listening"' in line:
                    port = int(json.loads(line)["submission"].rsplit(":", 1)[1])
                    break
        # Keep reading the log, or a full pipe would block the server.
        drain = asyncio.create_task(process.stderr.read())
        yield process, port
        drain.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.slow
async def test_sigkill_loses_no_held_mail_and_retraction_releases_it(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        sent = [make_message(subject=f"held {n}") for n in range(5)]
        async with serve(config) as (process, port):
            phone = FakeDevice(issuer, apps={TIKTOK})
            for content in sent:
                assert (await phone.send(port, message=content)).data == (
                    250,
                    "2.6.0 held: Remove TikTok.",
                )
            process.send_signal(signal.SIGKILL)
            await process.wait()

        listed = cli(config, "hold", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        held = json.loads(listed.stdout)["messages"]
        assert [h["policy_ids"] for h in held] == [["remove-tiktok"]] * 5

        dropped = cli(config, "hold", "drop", held[4]["hold_id"])
        assert dropped.stdout.startswith("1 message(s) dropped")

        async with serve(config) as (process, port):
            policy = tmp_path / "policies" / "ban.toml"
            policy.write_text(BAN.replace('state = "enforce"', 'state = "retracted"'))
            await upstream.wait_for(4, timeout=10)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    delivered = [m.content[m.content.index(b"From: ") :] for m in upstream.messages]
    assert delivered == sent[:4]
    assert json.loads(cli(config, "hold", "list", "--json").stdout)["messages"] == []


@pytest.mark.slow
async def test_admin_release_relays_despite_policy(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path, issuer=issuer, upstream_port=upstream.port, policies={"ban.toml": BAN}
        )
        async with serve(config) as (_process, port):
            for user in ("alice@example.test", "bob@example.test"):
                phone = FakeDevice(issuer, user=user, device_id=user, apps={TIKTOK})
                assert (await phone.send(port)).data == (250, "2.6.0 held: Remove TikTok.")
            released = await asyncio.to_thread(
                cli, config, "hold", "release", "--user", "bob@example.test"
            )
            assert released.stdout.startswith("1 message(s) marked for release")
            await upstream.wait_for(1, timeout=15)
            assert [m.sender for m in upstream.messages] == ["bob@example.test"]
            shown = await asyncio.to_thread(cli, config, "hold", "list", "--json")
            assert [h["user"] for h in json.loads(shown.stdout)["messages"]] == [
                "alice@example.test"
            ]
        refused = cli(config, "hold", "drop")
        assert refused.returncode == 2
        assert "name hold ids, or a filter" in refused.stderr
