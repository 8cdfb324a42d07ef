"""The Dockerfile's install steps, performed in a fresh virtual environment (no Docker
engine runs here), and the server started from the result as the container would."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config.settings import load_settings
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from tests.deploy.test_manifests import container_config_dir

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


def dockerfile_runtime() -> dict[str, Any]:
    """What the final stage of the Dockerfile says about running: ENV, USER, WORKDIR,
    VOLUME, the directories it chowns, and ENTRYPOINT + CMD."""
    text = (REPO / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            for name, value in re.findall(r'([A-Z_]+)=("[^"]*"|\S+)', line[4:]):
                env[name] = value.strip('"')
    user = re.search(r"^USER (\d+):(\d+)$", final, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", final, re.M)
    volume = re.search(r"^VOLUME \[\"([^\"]+)\"\]$", final, re.M)
    chowned = re.search(r"chown (\d+):(\d+) (\S+)", final)
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M)
    command = re.search(r"^CMD (\[.*\])$", final, re.M)
    assert user
    assert workdir
    assert volume
    assert chowned
    assert entrypoint
    assert command
    return {
        "env": env,
        "uid": int(user.group(1)),
        "gid": int(user.group(2)),
        "workdir": workdir.group(1),
        "volume": volume.group(1),
        "chowned": (int(chowned.group(1)), chowned.group(3)),
        "argv": json.loads(entrypoint.group(1)) + json.loads(command.group(1)),
    }


@pytest.mark.slow
def test_the_documented_docker_run_line_works_as_written() -> None:
    """`docker run ... -v /srv/gateway:/etc/gateway:ro -v gw-data:/var/lib/gateway` with a
    configuration directory made from deploy/docker/gateway.toml: with the image's
    environment the gateway listens on 0.0.0.0 with AUTH over TLS only, keeps held mail in
    the volume its user owns, and the entry command starts as that user (no Docker engine
    here: the image's directories are stand-ins, ports are free loopback ones)."""
    image = dockerfile_runtime()
    env = image["env"]
    assert image["chowned"] == (image["uid"], image["volume"])  # the volume is the user's
    assert image["workdir"] == image["volume"]
    assert Path(env["GATEWAY_HOLD__DATABASE"]).parent == Path(image["volume"])
    assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.toml"
    documented = re.search(r"^# Run: +(docker run .*)$", (REPO / "Dockerfile").read_text(), re.M)
    assert documented is not None
    assert f":{image['volume']}" in documented.group(1)
    assert ":/etc/gateway:ro" in documented.group(1)

    root = Path(tempfile.mkdtemp(prefix="gateway-image-"))  # readable by the image's user
    try:
        root.chmod(0o755)
        config = container_config_dir(root / "etc-gateway")
        data = root / "var-lib-gateway"
        data.mkdir()
        as_root = os.geteuid() == 0
        if as_root:
            os.chown(data, image["uid"], image["gid"])

        def remap(value: str) -> str:
            return value.replace("/etc/gateway", str(config.parent)).replace(
                image["volume"], str(data)
            )

        environ = {name: remap(value) for name, value in env.items() if name != "PATH"}
        settings = load_settings(Path(environ["GATEWAY_CONFIG"]), environ)
        assert str(settings.smtp.listen) == "0.0.0.0:2587"  # what -p 587:2587 reaches
        assert settings.smtp.tls_enabled
        assert not settings.smtp.allow_plaintext_auth
        assert str(settings.admin_listen) == "0.0.0.0:9587"  # the HEALTHCHECK's /livez
        assert settings.hold.database == data / "hold.db"

        # The entry command, as the image's user; loopback ports for the test.
        environ |= {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "GATEWAY_SMTP__LISTEN": "127.0.0.1:0",
            "GATEWAY_SMTP__IMPLICIT_TLS_LISTEN": "127.0.0.1:0",
            "GATEWAY_ADMIN__LISTEN": "127.0.0.1:0",
        }
        argv = [str(Path(sys.executable).parent / image["argv"][0]), *image["argv"][1:]]
        # util-linux's setpriv: the image's uid and gid, no supplementary groups. Only when
        # this machine's interpreter is usable by that user (a Python under /root is not):
        # else as ourselves, which still checks everything but the file's owner.
        ids = [f"--reuid={image['uid']}", f"--regid={image['gid']}", "--clear-groups"]
        as_user = (
            as_root
            and shutil.which("setpriv") is not None
            and subprocess.run(
                ["setpriv", *ids, argv[0], "--version"],
                capture_output=True, timeout=60, check=False,
            ).returncode == 0
        )  # fmt: skip
        if as_user:
            argv = ["setpriv", *ids, *argv]
        process = subprocess.Popen(argv, env=environ, cwd=data, stderr=subprocess.PIPE, text=True)
        try:
            assert process.stderr is not None
            started = None
            deadline = time.monotonic() + 30
            while started is None and time.monotonic() < deadline:
                line = process.stderr.readline()
                assert line, "server exited early"
                event = json.loads(line)
                started = event if event["event"] == "listening" else None
            assert started is not None
            port = int(str(started["submission"]).rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                assert connection.recv(64).startswith(b"220 smtp-gateway.example.com")
                connection.sendall(b"EHLO phone\r\n")
                time.sleep(0.2)
                ehlo = connection.recv(4096)
                assert b"STARTTLS" in ehlo
                assert b"AUTH" not in ehlo  # AUTH only after STARTTLS
            held = data / "hold.db"
            assert held.exists()
            if as_user:
                assert held.stat().st_uid == image["uid"]
            process.terminate()
            assert process.wait(timeout=40) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
