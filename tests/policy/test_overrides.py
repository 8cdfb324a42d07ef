"""Suspend a policy and break-glass exemptions without editing files (docs/policies.md):
`gateway policy ...` writes the hold store of a running gateway, which picks the change
up within seconds, releases held mail and enforces again when the override ends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.domain import Overrides
from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import RunningGateway, running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream
from tests.stories import TIKTOK, tiktok_ban

HELD = (250, "2.6.0 held: Remove TikTok.")


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def cli(gateway: RunningGateway, *argv: str) -> int:
    """The CLI as an admin runs it next to the gateway: its own connection to the store."""
    return await asyncio.to_thread(main, [*argv, "--config", str(gateway.config_path)])


async def eventually(check: Callable[[], object], within: float = 5.0) -> float:
    started = time.monotonic()
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110  # polling a server we do not own
            await asyncio.sleep(0.05)
    return time.monotonic() - started


def phone(issuer: TestIssuer, name: str) -> FakeDevice:
    return FakeDevice(issuer, user=f"{name}@example.test", device_id=f"{name}-phone", apps={TIKTOK})


async def send(gateway: RunningGateway, device: FakeDevice, subject: str) -> tuple[int, str]:
    content = make_message(subject=subject, sender=device.user)
    reply = (await device.send(gateway.port, message=content)).data
    return reply[0], reply[1]


@pytest.mark.slow
async def test_suspend_by_cli_releases_held_mail_and_its_expiry_enforces_again(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("hold")},
        )
        # A long release tick: only the override's own pass can release the mail in time.
        async with running_gateway(config, release_tick=60) as gateway:
            ann = phone(issuer, "ann")
            assert await send(gateway, ann, "held one") == HELD
            assert upstream.messages == []

            code = await cli(
                gateway, "policy", "suspend", "remove-tiktok", "--for", "2h", "--reason", "outage"
            )
            assert code == 0, capsys.readouterr().err
            _out, err = capsys.readouterr()
            audit = json.loads(next(line for line in err.splitlines() if '"audit"' in line))
            assert audit["event"] == "admin_policy_suspend"
            assert audit["audit"] is True
            assert audit["policy_id"] == "remove-tiktok"
            assert audit["reason"] == "outage"

            took = await eventually(lambda: len(upstream.messages) == 1)
            assert took < 5.0
            assert b"held one" in upstream.messages[0].content
            store = HoldStore(gateway.settings.hold.database)
            try:
                await eventually(lambda: store.select() == [])  # deleted once relayed
            finally:
                store.close()
            # New mail from the phone is relayed while the policy is suspended.
            capsys.readouterr()
            code, _text = await send(gateway, ann, "while suspended")
            assert code == 250
            await upstream.wait_for(2)
            decision_log = [
                line for line in capsys.readouterr().out.splitlines() if "decision" in line
            ]
            assert any("overridden=['remove-tiktok: suspended']" in line for line in decision_log)

            code = await cli(gateway, "policy", "overrides", "--json")
            out = capsys.readouterr().out  # the gateway's own log lines are on stdout too
            listed = json.loads(out[out.index('{\n  "schema"') :])["overrides"]
            assert [(o["policy_id"], o["kind"], o["reason"]) for o in listed] == [
                ("remove-tiktok", "suspension", "outage")
            ]

            # A short suspension: when it ends, the ban holds mail again.
            assert await cli(gateway, "policy", "resume", "remove-tiktok") == 0
            services = gateway.server.services
            await eventually(lambda: services.policies.overrides == Overrides())
            assert await send(gateway, ann, "held again") == HELD
            assert (
                await cli(
                    gateway, "policy", "suspend", "remove-tiktok", "--for", "2s", "--reason", "x"
                )
                == 0
            )
            await eventually(lambda: services.policies.overrides.suspended)
            await upstream.wait_for(3)  # the mail held before was released again
            await eventually(lambda: services.policies.overrides == Overrides(), within=5.0)
            assert await send(gateway, ann, "after expiry") == HELD
            assert len(upstream.messages) == 3


@pytest.mark.slow
async def test_break_glass_exemption_is_for_its_one_user_and_expires(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeUpstream.running() as upstream:
        config = write_config(
            tmp_path,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={"ban.toml": tiktok_ban("hold")},
        )
        async with running_gateway(config, release_tick=60) as gateway:
            ann, ben = phone(issuer, "ann"), phone(issuer, "ben")
            assert await send(gateway, ann, "ann held") == HELD
            assert await send(gateway, ben, "ben held") == HELD
            code = await cli(
                gateway,
                "policy",
                "exempt",
                "remove-tiktok",
                "--user",
                "ann@example.test",
                "--for",
                "3s",
                "--reason",
                "CEO travelling",
            )
            assert code == 0, capsys.readouterr().err
            await upstream.wait_for(1)
            assert [m.sender for m in upstream.messages] == ["ann@example.test"]
            code, _text = await send(gateway, ann, "ann relayed")
            assert code == 250
            await upstream.wait_for(2)
            assert await send(gateway, ben, "ben still held") == HELD
            store = HoldStore(gateway.settings.hold.database)
            try:
                await eventually(lambda: len(store.select()) == 2)
                assert sorted(h.user for h in store.select()) == ["ben@example.test"] * 2
            finally:
                store.close()
            services = gateway.server.services
            assert services.policies.overrides.exempt == {
                ("remove-tiktok", "user:ann@example.test")
            }
            await eventually(lambda: services.policies.overrides == Overrides(), within=5.0)
            assert await send(gateway, ann, "ann held again") == HELD
            assert len(upstream.messages) == 2


def test_policy_cli_refuses_an_unknown_policy_and_a_missing_reason(
    tmp_path: Path, issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path, issuer=issuer, upstream_port=1, policies={"ban.toml": tiktok_ban("hold")}
    )
    argv = ["policy", "suspend", "remove-tikt0k", "--for", "1h", "--reason", "x"]
    assert main([*argv, "--config", str(config)]) == 2
    assert "no policy 'remove-tikt0k'" in capsys.readouterr().err
    argv = ["policy", "suspend", "remove-tiktok", "--for", "1h"]
    assert main([*argv, "--config", str(config)]) == 2
    assert "--reason" in capsys.readouterr().err
    argv = ["policy", "suspend", "remove-tiktok", "--for", "soon", "--reason", "x"]
    assert main([*argv, "--config", str(config)]) == 2
    assert "not a duration" in capsys.readouterr().err


@pytest.mark.slow
async def test_admin_api_suspend_resume_exempt_and_refusals(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    from tests.admin.kit import carol, console, hold

    async with console(tmp_path, issuer) as c:
        gateway, upstream = c.gateway, c.upstream
        await hold(carol(issuer), gateway.port, "carol held")
        path = "/policies/remove-tiktok/suspend"
        terms = {"seconds": "3600", "reason": "incident 42"}
        # Refusals first: none of them suspends anything.
        assert (await c.viewer.post(path, **terms))[0] == 403
        status, body = await c.operator.post(path, csrf=False, **terms)
        assert status == 403
        assert "X-Gateway-CSRF" in body["error"]
        assert (await c.operator.post(path, seconds="3600"))[0] == 400  # no reason
        assert (await c.operator.post(path, reason="x"))[0] == 400  # no duration
        assert (await c.operator.post("/policies/no-such/suspend", **terms))[0] == 404
        assert (await c.operator.post("/policies/remove-tiktok/resume"))[0] == 404
        assert (await c.viewer.get("/overrides")) == (200, {"overrides": []})
        assert upstream.messages == []

        status, body = await c.operator.post(path, **terms)
        assert status == 200, body
        # The API change is applied at once: the held mail goes out within 5 s.
        await upstream.wait_for(1, timeout=5.0)
        status, listed = await c.viewer.get("/overrides")
        assert status == 200
        assert [(o["policy_id"], o["kind"], o["actor"]) for o in listed["overrides"]] == [
            ("remove-tiktok", "suspension", "admin:ops")
        ]
        status, devices = await c.viewer.get("/devices", device="carol-phone")
        assert status == 200
        (row,) = devices["devices"]
        assert row["decisions"]["send"]["overridden"] == ["remove-tiktok: suspended"]
        status, body = await c.operator.post("/policies/remove-tiktok/resume")
        assert (status, body["count"]) == (200, 1)
        assert gateway.server.services.policies.overrides == Overrides()
        await hold(carol(issuer), gateway.port, "carol held again")

        exemptions = "/policies/remove-tiktok/exemptions"
        assert (await c.viewer.post(exemptions, user="carol@example.test", **terms))[0] == 403
        assert (await c.operator.post(exemptions, **terms))[0] == 400  # nobody named
        status, body = await c.operator.post(
            exemptions, user="Carol@Example.test", seconds="3600", reason="travel"
        )
        assert status == 200, body
        assert body["subject"] == "user:carol@example.test"
        await upstream.wait_for(2, timeout=5.0)
        status, audit = await c.viewer.get("/audit")
        assert [e["action"] for e in audit["entries"]][:3] == [
            "policy.exempt",
            "policy.resume",
            "policy.suspend",
        ]
