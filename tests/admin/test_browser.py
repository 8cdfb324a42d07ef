"""The admin pages driven by Playwright in Debian's Chromium, headless, against a running
gateway with mail held over SMTP. Screenshots of each page are saved with the test's
files (``$GATEWAY_TEST_ARTEFACTS`` if set, else the test's tmp_path/screenshots)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.issuer import TestIssuer
from tests.admin.kit import carol, console, hold
from tests.stories import TIKTOK, tiktok_ban

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.async_api", reason="pip install playwright")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("GATEWAY_TEST_ARTEFACTS") or tmp_path / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _saved(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.png"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package is not installed")
async def test_admin_pages_in_chromium(tmp_path: Path, shots: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with console(tmp_path, issuer) as c, playwright.async_playwright() as pw:
        phone = carol(issuer)
        for n in range(2):
            await hold(phone, c.gateway.port, f"carol #{n}")
        dave = FakeDevice(issuer, user="dave@example.test", device_id="dave-phone", apps={TIKTOK})
        await hold(dave, c.gateway.port, "dave #0")
        root = c.base.removesuffix("/api/v1")

        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(15_000)
            await page.goto(root + "/admin/")
            assert page.url.endswith("/admin/login")
            await page.screenshot(path=shots / "login.png")
            await page.fill("input[name=token]", c.operator.token)
            await page.click("button:has-text('Log in')")
            await page.wait_for_selector("h1:has-text('Overview')")
            await page.screenshot(path=shots / "overview.png")

            await page.goto(root + "/admin/held")
            await page.fill("input[name=user]", "carol@example.test")
            await page.click("button:has-text('Filter')")
            await page.wait_for_selector("text=carol-phone")
            assert await page.locator("text=dave-phone").count() == 0
            await page.screenshot(path=shots / "held.png")

            await page.goto(root + "/admin/devices")
            await page.fill("input[name=user]", "carol@example.test")
            await page.click("button:has-text('Filter')")
            await page.wait_for_selector("text=remove-tiktok (enforce): Remove TikTok.")
            await page.screenshot(path=shots / "devices.png")

            await page.goto(root + "/admin/held?user=carol%40example.test")
            await page.locator("button:has-text('Release')").first.click()
            await page.wait_for_selector("h1:has-text('Held mail')")
            (released,) = await c.upstream.wait_for(1, timeout=10)
            assert "carol #0" in released.headers
            await page.goto(root + "/admin/held?user=carol%40example.test")
            await page.locator("button:has-text('Drop with DSN')").first.click()
            await page.wait_for_selector("h1:has-text('Held mail')")
            bounce = (await c.upstream.wait_for(2, timeout=10))[1]
            assert bounce.recipients == ("carol@example.test",)
            assert b"dropped by an administrator" in bounce.content

            await page.goto(root + "/admin/impact")
            await page.fill(
                "textarea[name=policy]",
                tiktok_ban("hold", state="retracted", extra='retracted_reason = "sent in error"\n'),
            )
            await page.click("button:has-text('Preview')")
            await page.wait_for_selector("h2:has-text('Released (2)')")
            assert await page.locator("td:text-is('carol-phone')").count() == 1
            assert await page.locator("td:text-is('dave-phone')").count() == 1
            await page.screenshot(path=shots / "impact.png", full_page=True)

            await page.goto(root + "/admin/policies")
            await page.wait_for_selector("td:text-is('remove-tiktok')")
            await page.screenshot(path=shots / "policies.png")
            await page.goto(root + "/admin/audit")
            await page.wait_for_selector("td:text-is('hold.release')")
            assert await page.locator("td:text-is('hold.drop')").count() == 1
            await page.screenshot(path=shots / "audit.png")

            # The policy history after a reload that changed the ban: the list, then the
            # diff with the previous version through its link.
            (c.gateway.policy_dir / "ban.toml").write_text(tiktok_ban("reject"))
            await c.gateway.server.reload("sighup")
            await page.goto(root + "/admin/")
            assert await page.locator("svg.chart rect.bar-hold").count() in (1, 2)  # a boundary
            await page.click("nav a:has-text('Policy history')")
            await page.wait_for_selector("h1:has-text('Policy history')")
            assert await page.locator("table tr").count() == 3  # a header and two versions
            await page.screenshot(path=shots / "history.png")
            await page.click("a:has-text('diff with previous')")
            await page.wait_for_selector("h1:has-text('Policy diff')")
            removed = page.locator("pre.diff span.del")
            assert await removed.all_inner_texts() == ['-action = "hold"']
            added = page.locator("pre.diff span.add")
            assert await added.all_inner_texts() == ['+action = "reject"']
            colour = await added.evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour == "rgb(221, 255, 221)"  # styled as an addition
            await page.screenshot(path=shots / "history-diff.png", full_page=True)
        finally:
            await browser.close()
    assert _saved(shots) == [
        "audit.png", "devices.png", "held.png", "history-diff.png", "history.png", "impact.png",
        "login.png", "overview.png", "policies.png",
    ]  # fmt: skip
