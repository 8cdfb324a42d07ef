"""Secure defaults and first deploys: what an operator meets on the first start."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer

REPO = Path(__file__).resolve().parent.parent


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, issuer=TestIssuer.generate("k1"), upstream_port=9)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            env={"PATH": "/usr/bin:/bin", "GATEWAY_SMTP__LISTEN": f"127.0.0.1:{port}"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    plain = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert plain == [
        f"gateway: error: cannot listen on 127.0.0.1:{port} ([smtp] listen): address already in use"
    ]
    for line in done.stderr.splitlines():  # the rest is the usual log stream
        if line.startswith("{"):
            assert json.loads(line)["event"]


async def test_no_admin_section_is_a_warning_at_start(tmp_path: Path) -> None:
    config = write_config(tmp_path, issuer=TestIssuer.generate("k1"), upstream_port=9)
    text = config.read_text()
    config.write_text(text.replace('[admin]\nlisten = "127.0.0.1:0"\n', ""))
    with capture_logs() as logs:
        async with running_gateway(config) as gateway:
            assert gateway.admin_port is None
    warnings = [e for e in logs if e["event"] == "admin_disabled"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "no /livez or /readyz probes, no /metrics" in warnings[0]["note"]
    with capture_logs() as logs:
        async with running_gateway(
            write_config(tmp_path / "b", issuer=TestIssuer.generate("k1"), upstream_port=9)
        ):
            pass
    assert not [e for e in logs if e["event"] == "admin_disabled"]


@pytest.mark.parametrize(
    "path", ["config/gateway.toml", "deploy/docker/gateway.toml", "deploy/kubernetes/config.yaml"]
)
def test_every_example_config_has_an_admin_listener(path: str) -> None:
    """Without [admin] there are no probes and no metrics: the Docker health check and the
    Kubernetes probes would fail."""
    import tomllib

    text = (REPO / path).read_text()
    if path.endswith(".yaml"):
        import yaml

        text = yaml.safe_load(text)["data"]["gateway.toml"]
    assert tomllib.loads(text)["admin"]["listen"]
