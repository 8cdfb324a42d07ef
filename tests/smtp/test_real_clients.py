"""The story through SMTP clients nobody here wrote: swaks and Python's smtplib."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer

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


def swaks(port: int, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{port}", "--ehlo", "swaks.test",
            "--auth", "PLAIN", "--auth-user", "alice@example.test", "--auth-password", token,
            "--from", "alice@example.test", "--to", "bob@example.test",
            "--header", "Subject: via swaks", "--body", "sent by swaks", "--timeout", "10", *extra,
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.external
@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks not installed (.ci/run installs it)"
)
async def test_swaks_auth_plain_with_the_token(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": BAN}) as (gw, upstream):
        phone = FakeDevice(issuer, user="alice@example.test")
        allowed = await asyncio.to_thread(swaks, gw.port, phone.token())
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert "<-  235 2.7.0 Authentication successful" in allowed.stdout
        assert "<-  250 2.0.0 Message accepted for delivery" in allowed.stdout
        phone.install(TIKTOK)
        banned = await asyncio.to_thread(swaks, gw.port, phone.token())
        assert "<** 550 5.7.1 Remove TikTok from this device" in banned.stdout
        bad = await asyncio.to_thread(swaks, gw.port, "not-a-token")
        assert "<** 535 5.7.8 Device token refused (malformed)" in bad.stdout
    assert len(upstream.messages) == 1
    assert b"Subject: via swaks" in upstream.messages[0].content


def smtplib_xoauth2(port: int, token: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("python.test")
        client.auth(
            "XOAUTH2",
            lambda challenge=None: f"user=alice@example.test\x01auth=Bearer {token}\x01\x01",
        )
        refused = client.sendmail(
            "alice@example.test", ["bob@example.test"], b"Subject: via smtplib\r\n\r\nhello\r\n"
        )
        assert refused == {}
        return client.noop()


async def test_python_smtplib_xoauth2(tmp_path: Path, issuer: TestIssuer) -> None:
    async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": BAN}) as (gw, upstream):
        phone = FakeDevice(issuer, user="alice@example.test")
        code, _ = await asyncio.to_thread(smtplib_xoauth2, gw.port, phone.token())
        assert code == 250
        phone.install(TIKTOK)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            await asyncio.to_thread(smtplib_xoauth2, gw.port, phone.token())
        assert refused.value.smtp_code == 550
    assert [m.content.count(b"Subject: via smtplib") for m in upstream.messages] == [1]
