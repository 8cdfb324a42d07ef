"""Policy text with control characters or past the reply-line bound, end to end: `gateway
check` refuses the file, and a running gateway's reload keeps the last good set."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.stories import TIKTOK

GOOD = (
    f'[[policy]]\nid = "remove-tiktok"\nmatch.apps_any = ["{TIKTOK}"]\n'
    'action = "reject"\nmessage = "Remove TikTok."\n'
)
# NUL, BEL and ESC in the message; before the fix they reached the SMTP reply.
HOSTILE = GOOD.replace("Remove TikTok.", "Remove\\u0000\\u0007 \\u001b[2JTikTok.")


async def test_check_refuses_and_reload_keeps_the_last_good_set(
    tmp_path: Path, test_issuer: TestIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with gateway_with_upstream(tmp_path, test_issuer, {"ban.toml": GOOD}) as (gateway, _):
        version = gateway.server.services.policies.current.version
        ban = gateway.policy_dir / "ban.toml"
        ban.write_text(HOSTILE)

        code = main(["check", "--config", str(gateway.config_path)])
        out, _ = capsys.readouterr()
        assert code == 1
        assert f"{ban}:5: policy[0].message: contains a control character (U+0000)" in out

        result = await gateway.server.reload("test")
        assert not result.ok
        assert gateway.server.services.policies.current.version == version
        phone = FakeDevice(test_issuer, apps={TIKTOK})
        reply = (await phone.send(gateway.port)).mail
        assert reply[0] == 550
        assert "Remove TikTok." in reply[1]

        ban.write_text(GOOD.replace("Remove TikTok.", "x" * 3000))
        assert not (await gateway.server.reload("test")).ok
        assert "Remove TikTok." in (await phone.send(gateway.port)).mail[1]
