"""The admin pages over real HTTP (no browser here): log in, find Carol's held mail,
see why her phone is held, release one, drop one with a DSN, preview a retraction, read
the audit; refusals for CSRF, cross-origin and role; every value escaped."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest

from gateway.testing.device import FakeDevice
from gateway.testing.issuer import TestIssuer
from tests.admin.kit import Console, carol, console, hold
from tests.stories import TIKTOK, tiktok_ban


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page[:500]
    return found.group(1)


async def _login(c: Console, token: str) -> tuple[aiohttp.ClientSession, str]:
    """A browser-like client (its own cookie jar) logged in; returns it and the site root."""
    root = c.base.removesuffix("/api/v1")
    browser = aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=20)
    )
    async with browser.post(root + "/admin/login", data={"token": token}) as r:
        assert r.status == 200
        assert "Overview" in await r.text()
    return browser, root


async def test_pages_walkthrough(tmp_path: Path, issuer: TestIssuer) -> None:
    async with console(tmp_path, issuer) as c:
        root = c.base.removesuffix("/api/v1")
        async with c.http.get(root + "/admin/held", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/admin/login")
        async with c.http.post(root + "/admin/login", data={"token": "wrong"}) as r:
            assert "That token is not valid." in await r.text()

        phone = carol(c.issuer)
        for n in range(2):
            await hold(phone, c.gateway.port, f"carol #{n} <script>alert(1)</script>")
        dave = FakeDevice(c.issuer, user="dave@example.test", device_id="dave-phone", apps={TIKTOK})
        await hold(dave, c.gateway.port, "dave #0")

        browser, root = await _login(c, c.operator.token)
        async with browser:
            # As the filter form submits it: empty fields mean no filter.
            filters = {"user": "carol@example.test", "device": "", "policy": ""}
            async with browser.get(root + "/admin/held", params=filters) as r:
                page = await r.text()
            ids = re.findall(r'action="/admin/held/([0-9a-f]{32})/release"', page)
            assert len(ids) == 2
            assert "dave-phone" not in page
            csrf = _csrf(page)

            async with browser.get(root + f"/admin/held/{ids[0]}") as r:
                page = await r.text()
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
            assert "<script>" not in page
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")

            async with browser.get(
                root + "/admin/devices", params={"user": "carol@example.test"}
            ) as r:
                page = await r.text()
            assert "carol-phone" in page
            assert "remove-tiktok (enforce): Remove TikTok." in page  # the why column

            async with browser.post(
                root + f"/admin/held/{ids[0]}/release", data={"csrf": csrf}
            ) as r:
                assert r.status == 200  # after the redirect back to the list
            (released,) = await c.upstream.wait_for(1, timeout=10)
            assert "carol #0" in released.headers

            async with browser.post(
                root + f"/admin/held/{ids[1]}/drop", data={"csrf": csrf, "dsn": "true"}
            ) as r:
                assert r.status == 200
            bounce = (await c.upstream.wait_for(2, timeout=10))[1]
            assert bounce.recipients == ("carol@example.test",)
            assert b"dropped by an administrator" in bounce.content

            retraction = tiktok_ban(
                "hold", state="retracted", extra='retracted_reason = "sent in error"\n'
            )
            async with browser.post(
                root + "/admin/impact", data={"csrf": csrf, "policy": retraction}
            ) as r:
                page = await r.text()
            assert "Released (2)" in page  # the two phones it would release
            assert "<td>carol-phone</td>" in page
            assert "<td>dave-phone</td>" in page
            assert "The reload guard would let it through." in page

            async with browser.get(root + "/admin/policies") as r:
                page = await r.text()
            assert "remove-tiktok" in page
            assert "enforce" in page
            async with browser.get(root + "/admin/audit") as r:
                page = await r.text()
            assert page.count("<td>ops</td>") == 2
            assert "hold.release" in page
            assert "hold.drop" in page
            async with browser.get(root + "/admin/") as r:
                page = await r.text()
            assert "Held: <b>1</b> message(s)" in page

            # Refusals: no CSRF value, a cross-origin form, then a logged-out session.
            (left,) = re.findall(
                r"/admin/held/([0-9a-f]{32})/release",
                await (await browser.get(root + "/admin/held")).text(),
            )
            async with browser.post(root + f"/admin/held/{left}/drop", data={}) as r:
                assert r.status == 403
            async with browser.post(
                root + f"/admin/held/{left}/drop",
                data={"csrf": csrf},
                headers={"Origin": "https://evil.example"},
            ) as r:
                assert r.status == 403
            async with browser.post(root + "/admin/logout", data={"csrf": csrf}) as r:
                assert "Log in" in await r.text()
            async with browser.post(root + f"/admin/held/{left}/drop", data={"csrf": csrf}) as r:
                assert r.status == 401
        assert len(c.upstream.messages) == 2
        assert len((await c.viewer.get("/held"))[1]["messages"]) == 1


async def test_a_viewer_sees_no_buttons_and_cannot_post_them(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with console(tmp_path, issuer) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        (held,) = (await c.viewer.get("/held"))[1]["messages"]
        browser, root = await _login(c, c.viewer.token)
        async with browser:
            async with browser.get(root + "/admin/held") as r:
                page = await r.text()
            assert held["device_id"] in page
            assert "/release" not in page
            csrf = _csrf(page)  # the log-out form's
            async with browser.post(
                root + f"/admin/held/{held['hold_id']}/release", data={"csrf": csrf}
            ) as r:
                assert r.status == 403
        assert (await c.viewer.get("/audit"))[1]["entries"] == []


async def test_impact_page_shows_who_would_be_told(tmp_path: Path, issuer: TestIssuer) -> None:
    """The impact page lists the users a retraction would tell to disregard their notice
    (Carol, whose phone had the hold notice), escaped, with the overrides it counted."""
    async with console(tmp_path, issuer, notices=True) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        await c.upstream.wait_for(1, timeout=10)  # the hold notice
        status, _ = await c.operator.post(
            "/policies/remove-tiktok/suspend", seconds="3600", reason="INC-7"
        )
        assert status == 200
        browser, root = await _login(c, c.viewer.token)
        async with browser:
            async with browser.get(root + "/admin/impact") as r:
                csrf = _csrf(await r.text())
            retraction = tiktok_ban("hold", state="retracted")
            async with browser.post(
                root + "/admin/impact", data={"csrf": csrf, "policy": retraction}
            ) as r:
                page = await r.text()
    assert "<h2>Would be told: announcement (0 users, 0 notices)</h2><p>None.</p>" in page
    assert (
        "<h2>Would be told: &quot;disregard the earlier notice&quot; (1 users, 1 notices)</h2>"
        "<table><tr><th>user</th><th>device</th><th>policy</th></tr>"
        "<tr><td>carol@example.test</td><td>carol-phone</td><td>remove-tiktok</td></tr></table>"
    ) in page
    assert "Operator overrides in force (counted): remove-tiktok suspended." in page
    assert "Released (0)" in page  # suspended: the retraction releases nobody


async def test_policy_history_diff_and_decisions_chart_for_a_viewer(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """A viewer's overview charts the decisions (inline SVG, no script); the history page
    lists both versions after a reload, linked from the nav; its diff link shows the
    change line by line, escaped, removed and added lines styled; a version's page shows
    its files; an unknown version is a 404 page."""
    async with console(tmp_path, issuer) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        v1 = c.gateway.server.services.policies.current.version
        (c.gateway.policy_dir / "ban.toml").write_text(
            tiktok_ban("reject").replace("Remove TikTok.", "Remove <b>TikTok</b> now.")
        )
        v2 = (await c.gateway.server.reload("sighup")).version
        browser, root = await _login(c, c.viewer.token)
        async with browser:
            async with browser.get(root + "/admin/") as r:
                page = await r.text()
            svg = page[page.index("<svg") : page.index("</svg>")]
            assert svg.count('class="bar-hold"') == 1
            assert "<title>" in svg
            assert " UTC: 1 hold</title>" in svg
            assert "hold 1</text>" in svg
            assert "<script" not in page
            assert '<a href="/admin/history">Policy history</a>' in page

            async with browser.get(root + "/admin/history") as r:
                page = await r.text()
            assert page.index(v2) < page.index(v1)  # newest first
            assert "<b>in force</b>" in page
            (link,) = re.findall(r'href="(/admin/history/diff\?[^"]+)"', page)
            assert link == f"/admin/history/diff?from={v1}&amp;to={v2}"

            async with browser.get(root + link.replace("&amp;", "&")) as r:
                assert r.status == 200
                page = await r.text()
            assert '<span class="del">-action = &quot;hold&quot;</span>' in page
            assert '<span class="add">+action = &quot;reject&quot;</span>' in page
            assert (
                '<span class="add">+message = &quot;Remove &lt;b&gt;TikTok&lt;/b&gt; now.&quot;'
                in page
            )
            assert "<b>TikTok</b>" not in page
            assert '<span class="hunk">@@' in page
            assert "<li>changed: remove-tiktok</li>" in page

            async with browser.get(root + f"/admin/history/{v1}") as r:
                page = await r.text()
            assert "<h3>ban.toml (" in page
            assert "action = &quot;hold&quot;" in page

            async with browser.get(
                root + "/admin/history/diff", params={"from": "0123456789ab", "to": v2}
            ) as r:
                assert r.status == 404
                assert "no such policy version" in await r.text()
            async with browser.get(root + "/admin/history/diff", params={"from": v1}) as r:
                assert r.status == 400
                assert "to is required" in await r.text()
