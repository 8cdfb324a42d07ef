"""The test kit's throwaway Dovecot and nginx: started from the shipped deploy/ files,
stopped completely, and loud when a shipped file drifts from what the kit substitutes."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from gateway.testing.dovecot import (
    DEPLOY_DIR,
    DovecotPorts,
    DovecotUnavailable,
    SubstitutionMissing,
    SystemUsers,
    dovecot_binary,
    render_config,
    temporary_dovecot,
)
from gateway.testing.nginx import (
    DEPLOY_FILE,
    NginxUnavailable,
    nginx_binary,
    temporary_nginx,
)
from gateway.testing.nginx import render_config as render_nginx


def _available(check: object) -> bool:
    try:
        check()  # type: ignore[operator]
    except (DovecotUnavailable, NginxUnavailable):
        return False
    return True


def test_the_config_is_the_shipped_file_with_site_values_substituted(tmp_path: Path) -> None:
    ports = DovecotPorts(1143, 1993, 1110, 1995, 1024, 18080)
    users = SystemUsers("nobody", "nogroup", "dovecot", "dovenull")
    files = render_config(
        DEPLOY_DIR, tmp_path, ports, users, gateway_url="http://127.0.0.1:5555", client_secret="s3"
    )
    shipped = (DEPLOY_DIR / "dovecot.conf").read_text()
    conf = files["dovecot.conf"]
    # every shipped setting is there, but for the site values; then test-only settings
    site = (
        "/etc/dovecot/",
        "/var/vmail/",
        "port = ",
        "listen = ",
        "_dir = ",
        "mail_uid",
        "mail_gid",
    )
    lines = conf.splitlines()
    for line in shipped.splitlines():
        if not any(value in line for value in site):
            assert line in lines
    assert conf.index("# --- test settings") > conf.index("service doveadm {")
    assert "port = 1143\n" in conf
    assert f"mail_location = maildir:{tmp_path}/mail/%d/%n/Maildir" in conf
    assert f"args = {tmp_path}/etc/oauth2-refusal.conf.ext" in conf
    for name in ("oauth2-refusal.conf.ext", "oauth2-introspect.conf.ext"):
        assert "introspection_url = http://127.0.0.1:5555/oauth2/" in files[name]
        assert "client_secret = s3\n" in files[name]
        assert "9588" not in files[name]


def test_a_drifted_shipped_file_fails_loudly(tmp_path: Path) -> None:
    drifted = tmp_path / "deploy"
    drifted.mkdir()
    for path in DEPLOY_DIR.glob("*.conf*"):
        (drifted / path.name).write_text(path.read_text().replace("port = 143\n", "port = 1143\n"))
    with pytest.raises(SubstitutionMissing, match="port = 143"):
        render_config(
            drifted,
            tmp_path,
            DovecotPorts.free(),
            SystemUsers.for_this_process(),
            gateway_url="http://127.0.0.1:1",
            client_secret="s",
        )
    text = DEPLOY_FILE.read_text().replace("listen 993 ssl;", "listen 995 ssl;")
    with pytest.raises(SubstitutionMissing, match="listen 993 ssl"):
        render_nginx(text, tmp_path, imaps_port=1, auth_http="127.0.0.1:1/", secret="s")


def _gone(group: int) -> bool:
    """No live process in the process group (a zombie whose parent was the master is
    dead, whether or not init has reaped it yet)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid == group and state != "Z":
            return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _available(dovecot_binary), reason="Dovecot not installed (.ci/run does)")
async def test_dovecot_starts_on_loopback_and_stop_ends_every_process() -> None:
    async with temporary_dovecot(gateway_url="http://127.0.0.1:1/", client_secret="s") as dovecot:
        process = dovecot.process
        assert process is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", dovecot.ports.imap)
        greeting = await asyncio.wait_for(reader.readline(), 10)
        assert greeting.startswith(b"* OK ")
        writer.close()
        root = dovecot.root
    assert process.returncode is not None
    assert _gone(process.pid)  # the process group: master, auth, login and mail processes
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", dovecot.ports.imap)


@pytest.mark.slow
@pytest.mark.skipif(not _available(nginx_binary), reason="nginx not installed (.ci/run does)")
async def test_nginx_starts_on_loopback_and_stop_ends_every_process() -> None:
    async with temporary_nginx(auth_http="127.0.0.1:1/nginx/auth", secret="s") as nginx:
        process = nginx.process
        assert process is not None
        assert "[emerg]" not in nginx.log_text()
    assert process.returncode is not None
    assert process.returncode != -signal.SIGKILL  # a graceful stop
    assert _gone(process.pid)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", nginx.imaps_port)
