"""`gateway status` asks a running gateway over its admin port (GET /status)."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.stories import TIKTOK, tiktok_ban


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_of_a_running_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issuer = TestIssuer.generate("k1")
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": tiktok_ban("hold")}) as (
        gateway,
        _upstream,
    ):
        phone = FakeDevice(issuer, apps={TIKTOK})
        assert (await phone.send(gateway.port)).data == (250, "2.6.0 held: Remove TikTok.")
        await asyncio.sleep(0.5)  # the release tick (0.2 s here) counts what is held
        admin = f"127.0.0.1:{gateway.admin_port}"
        version = gateway.server.services.policies.current.version
        capsys.readouterr()  # the gateway's own log lines
        code, out, err = await asyncio.to_thread(
            run, capsys, "status", "--admin", admin, "--json", "--config", str(gateway.config_path)
        )
        assert code == 0, err
        status = json.loads(out)
        assert status["schema"] == 1
        assert status["ready"] is True
        assert status["policy_version"] == version
        assert status["last_reload"]["ok"] is True
        assert status["last_reload"]["trigger"] == "startup"
        assert status["held_messages"] == 1
        assert status["admin"] == admin
        code, out, _ = await asyncio.to_thread(
            run, capsys, "status", "--admin", admin, "--config", str(gateway.config_path)
        )
        assert code == 0
        assert f"at {admin}: ready {version}" in out
        assert "held:      1 message(s)" in out
        assert f"policies:  version {version}; last reload ok (startup)" in out


def test_status_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:  # a free port, closed again: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = run(capsys, "status", "--admin", f"127.0.0.1:{port}", "--timeout", "2")
    assert code == 1
    assert out == ""
    assert f"gateway: status: no gateway answers at 127.0.0.1:{port}" in err


def test_status_needs_an_admin_port(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    source = (Path(__file__).resolve().parent.parent / "config" / "gateway.toml").read_text()
    start = source.index("[admin]")
    config.write_text(source[:start] + source[source.index("[hold]") :])
    (tmp_path / "keys").symlink_to(Path(__file__).resolve().parent.parent / "config" / "keys")
    code, _, err = run(capsys, "status", "--config", str(config))
    assert code == 2
    assert "no [admin] listen in the configuration" in err
