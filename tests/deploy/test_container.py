"""The Dockerfile's install steps, performed in a fresh virtual environment (no Docker
engine runs here), and the server started from the result as the container would."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer

REPO = Path(__file__).resolve().parents[2]


def dockerfile_install_command() -> str:
    text = (REPO / "Dockerfile").read_text()
    found = re.search(r"/opt/gateway/bin/pip install --no-cache-dir '(\.\[[a-z,]+\])'", text)
    assert found, "the Dockerfile's pip install step changed: update this test"
    return found.group(1)


@pytest.mark.slow
def test_dockerfile_install_steps_produce_a_working_server(tmp_path: Path) -> None:
    venv = tmp_path / "opt-gateway"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    target = dockerfile_install_command().replace(".", str(REPO), 1)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir", target],
        check=True,
        timeout=600,
    )
    config = write_config(
        tmp_path / "etc-gateway", issuer=TestIssuer.generate("k1"), upstream_port=9
    )
    process = subprocess.Popen(
        [str(venv / "bin" / "gateway"), "serve", "--config", str(config), "--grace", "1"],
        stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line, "server exited early"
            found = re.search(r'"submission": "127\.0\.0\.1:(\d+)"', line)
            port = int(found.group(1)) if found else None
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            assert connection.recv(64).startswith(b"220 gateway.test")
        process.terminate()  # SIGTERM: drain and exit 0
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
