"""The admin API over real HTTP against a running gateway with mail held over SMTP."""

from __future__ import annotations

import asyncio
import os
import stat
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.admin import api as api_module
from gateway.admin.api import IMPACT_NICENESS, Handlers, impact_pool
from gateway.cli import main
from gateway.domain import utc_now
from gateway.hold.store import HoldFilter, Settlement
from gateway.testing.device import FakeDevice
from gateway.testing.issuer import TestIssuer
from tests.admin.kit import CSRF, carol, console, hold
from tests.stories import TIKTOK, tiktok_ban


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def test_list_show_release_and_drop_with_dsn(tmp_path: Path, issuer: TestIssuer) -> None:
    """Carol's held mail: listed (filters, paging by seq), shown with headers and
    recipients, one released (it reaches the upstream), one dropped with a DSN (the
    bounce reaches her), one dropped silently; each action is in the audit trail."""
    async with console(tmp_path, issuer) as c:
        phone = carol(c.issuer)
        for n in range(3):
            await hold(phone, c.gateway.port, f"carol #{n}")
        dave = FakeDevice(c.issuer, user="dave@example.test", device_id="dave-phone", apps={TIKTOK})
        await hold(dave, c.gateway.port, "dave #0")

        status, page = await c.viewer.get("/held", user="carol@example.test", limit=2)
        assert status == 200
        assert [m["user"] for m in page["messages"]] == ["carol@example.test"] * 2
        assert page["next"] == page["messages"][-1]["seq"]
        status, rest = await c.viewer.get("/held", user="carol@example.test", after=page["next"])
        assert (status, len(rest["messages"]), rest["next"]) == (200, 1, None)
        ids = [m["hold_id"] for m in page["messages"] + rest["messages"]]
        assert len((await c.viewer.get("/held", policy="remove-tiktok"))[1]["messages"]) == 4
        assert len((await c.viewer.get("/held", device="dave-phone"))[1]["messages"]) == 1

        status, shown = await c.viewer.get(f"/held/{ids[0]}")
        assert status == 200
        assert shown["recipients"] == ["bob@example.test"]
        assert ["Subject", "carol #0"] in shown["headers"]
        assert shown["policy_ids"] == ["remove-tiktok"]
        assert shown["claims"]["device_id"] == "carol-phone"

        assert await c.operator.post(f"/held/{ids[0]}/release") == (
            200,
            {"action": "release", "count": 1},
        )
        (released,) = await c.upstream.wait_for(1, timeout=10)
        assert "Subject: carol #0" in released.headers

        status, dropped = await c.operator.post(f"/held/{ids[1]}/drop", dsn="true")
        assert (status, dropped) == (200, {"action": "drop", "count": 1, "bounces": 1})
        messages = await c.upstream.wait_for(2, timeout=10)
        bounce = messages[1]
        assert bounce.recipients == ("carol@example.test",)
        assert bounce.sender == ""
        assert b"dropped by an administrator" in bounce.content
        assert b"Subject: carol #1" in bounce.content  # the original's headers

        assert await c.operator.post(f"/held/{ids[2]}/drop") == (
            200,
            {"action": "drop", "count": 1, "bounces": 0},
        )
        status, left = await c.viewer.get("/held")
        assert [m["user"] for m in left["messages"]] == ["dave@example.test"]

        status, audit = await c.viewer.get("/audit")
        assert status == 200
        assert [(e["actor"], e["role"], e["action"], e["count"]) for e in audit["entries"]] == [
            ("ops", "operator", "hold.drop", 1),
            ("ops", "operator", "hold.drop", 1),
            ("ops", "operator", "hold.release", 1),
        ]
        assert audit["entries"][1]["target"] == {"hold_ids": [ids[1]], "dsn": True}
        await asyncio.sleep(0.3)
        assert len(c.upstream.messages) == 2  # the silent drop sent nothing


async def test_refusals(tmp_path: Path, issuer: TestIssuer) -> None:
    """No credentials 401, a wrong token 401, a viewer releasing 403, no CSRF header 403,
    a cross-origin POST 403, unknown ids 404, bad filters 400 with a message; the probes
    stay open without a login."""
    async with console(tmp_path, issuer) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        (held,) = (await c.viewer.get("/held"))[1]["messages"]
        hold_id = held["hold_id"]

        async with c.http.get(c.base + "/held") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in (await r.json())["error"]
        async with c.http.post(c.base + f"/held/{hold_id}/release") as r:
            assert r.status == 401
        async with c.http.get(c.base + "/held", headers={"Authorization": "Bearer nope"}) as r:
            assert (r.status, await r.json()) == (401, {"error": "unknown token"})

        status, body = await c.viewer.post(f"/held/{hold_id}/release")
        assert status == 403
        assert "needs operator" in body["error"]
        status, body = await c.operator.post(f"/held/{hold_id}/release", csrf=False)
        assert status == 403
        assert CSRF in body["error"]
        headers = {**c.operator.headers(), CSRF: c.viewer.csrf}  # another session's value
        async with c.http.post(c.base + f"/held/{hold_id}/drop", headers=headers) as r:
            assert r.status == 403
        headers = {**c.operator.headers(), "Origin": "https://evil.example"}
        async with c.http.post(c.base + f"/held/{hold_id}/drop", headers=headers) as r:
            assert r.status == 403
            assert "cross-origin" in (await r.json())["error"]

        for path in (f"/held/{'0' * 32}", "/held/not-an-id"):
            status, body = await c.viewer.get(path)
            assert status == 404
            assert "no such held message" in body["error"]
        assert (await c.operator.post(f"/held/{'0' * 32}/release"))[0] == 404
        assert (await c.operator.post(f"/held/{'0' * 32}/drop", dsn="true"))[0] == 404

        for params, says in (
            ({"limit": "501"}, "limit must be an integer from 1 to 500"),
            ({"after": "-1"}, "after must be an integer"),
            ({"user": ""}, "bad filter: user"),
            ({"colour": "red"}, "unknown parameter 'colour'"),
        ):
            status, body = await c.viewer.get("/held", **params)
            assert status == 400, params
            assert says in body["error"]
        status, body = await c.operator.post("/held/drop")
        assert (status, "needs policy or device" in body["error"]) == (400, True)
        status, body = await c.operator.post(f"/held/{hold_id}/drop", dsn="maybe")
        assert (status, "dsn must be true or false" in body["error"]) == (400, True)

        # Nothing above changed anything.
        assert [m["hold_id"] for m in (await c.viewer.get("/held"))[1]["messages"]] == [hold_id]
        assert (await c.viewer.get("/audit"))[1]["entries"] == []

        base = c.base.removesuffix("/api/v1")
        for path in ("/livez", "/readyz", "/metrics", "/status", "/api/v1/openapi.json"):
            async with c.http.get(base + path) as r:
                assert r.status == 200, path


async def test_without_a_tokens_file_the_api_is_closed(tmp_path: Path, issuer: TestIssuer) -> None:
    async with console(tmp_path, issuer, tokens=False) as c:
        for admin in (c.operator, c.viewer):
            status, body = await admin.get("/status")
            assert status == 401
            assert "[admin] tokens_file" in body["error"]


async def test_bulk_release_by_device_and_drop_by_policy(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    async with console(tmp_path, issuer) as c:
        phone = carol(c.issuer)
        dave = FakeDevice(c.issuer, user="dave@example.test", device_id="dave-phone", apps={TIKTOK})
        for n in range(2):
            await hold(phone, c.gateway.port, f"carol #{n}")
        for n in range(2):
            await hold(dave, c.gateway.port, f"dave #{n}")
        status, body = await c.operator.post("/held/release", device="carol-phone")
        assert (status, body) == (200, {"action": "release", "count": 2, "bounces": 0})
        got = await c.upstream.wait_for(2, timeout=10)
        assert sorted(m.sender for m in got) == ["carol@example.test"] * 2
        status, body = await c.operator.post("/held/drop", policy="remove-tiktok", dsn="true")
        assert (status, body) == (200, {"action": "drop", "count": 2, "bounces": 2})
        got = await c.upstream.wait_for(4, timeout=10)
        assert [m.recipients for m in got[2:]] == [("dave@example.test",)] * 2
        entries = (await c.viewer.get("/audit"))[1]["entries"]
        assert [(e["action"], e["target"], e["count"]) for e in entries] == [
            ("hold.bulk_drop", {"policy": "remove-tiktok", "dsn": True}, 2),
            ("hold.bulk_release", {"device": "carol-phone", "dsn": False}, 2),
        ]


async def test_devices_policies_status_and_session(tmp_path: Path, issuer: TestIssuer) -> None:
    """The inventory with each device's decision for send and sync and why; the policies
    in force with their state; status with the held figures; the token's session."""
    async with console(tmp_path, issuer) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        laptop = FakeDevice(c.issuer, user="erin@example.test", device_id="erin-laptop")
        assert (await laptop.send(c.gateway.port)).accepted

        status, body = await c.viewer.get("/devices")
        assert status == 200
        devices = {d["device_id"]: d for d in body["devices"]}
        assert set(devices) == {"carol-phone", "erin-laptop"}
        why = devices["carol-phone"]["decisions"]["send"]
        assert (why["action"], why["phase"], why["policy_ids"]) == (
            "hold",
            "enforce",
            ["remove-tiktok"],
        )
        assert why["message"] == "Remove TikTok."
        assert devices["carol-phone"]["decisions"]["sync"]["action"] == "hold"
        assert devices["erin-laptop"]["decisions"]["send"]["action"] == "allow"
        status, body = await c.viewer.get("/devices", user="CAROL@example.test")
        assert [d["device_id"] for d in body["devices"]] == ["carol-phone"]

        status, body = await c.viewer.get("/policies")
        assert status == 200
        (policy,) = body["policies"]
        assert (policy["id"], policy["state"], policy["action"], policy["phase_now"]) == (
            "remove-tiktok",
            "enforce",
            "hold",
            "enforce",
        )
        assert policy["source"].endswith("ban.toml:2")
        assert body["reload"]["ok"] is True
        assert body["version"] == c.gateway.server.services.policies.current.version

        (c.gateway.policy_dir / "broken.toml").write_text("[[policy]]\nid = 3\n")
        await c.gateway.server.reload("test")
        status, body = await c.viewer.get("/policies")
        assert body["reload"]["ok"] is False
        assert any(
            p["file"].endswith("broken.toml") and p["line"] for p in body["reload"]["problems"]
        )
        (c.gateway.policy_dir / "broken.toml").unlink()
        await c.gateway.server.reload("test")
        status, body = await c.viewer.get("/policies")
        assert body["reload"]["ok"] is True
        problems = body["last_error"]["problems"]  # the last failure stays visible
        assert all(p["file"].endswith("broken.toml") for p in problems)
        assert 2 in [p["line"] for p in problems]

        status, body = await c.viewer.get("/status")
        assert status == 200
        assert body["ready"] is True
        assert body["held"]["messages"] == 1

        assert (await c.operator.get("/session"))[1]["role"] == "operator"
        status, session = await c.viewer.get("/session")
        assert (session["name"], session["role"], session["csrf_header"]) == (
            "audrey",
            "viewer",
            CSRF,
        )


async def test_impact_preview_of_an_uploaded_retraction(tmp_path: Path, issuer: TestIssuer) -> None:
    """A retraction uploaded as TOML text: the two phones it would release are listed,
    computed in a worker process over the store's inventory (flushed first: these phones
    were seen after the last release tick); a broken file gets its problems by line."""
    async with console(tmp_path, issuer) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        dave = FakeDevice(c.issuer, user="dave@example.test", device_id="dave-phone", apps={TIKTOK})
        await hold(dave, c.gateway.port, "dave #0")
        retraction = tiktok_ban(
            "hold", state="retracted", extra='retracted_reason = "sent in error"\n'
        )
        status, report = await c.viewer.post("/impact", data=retraction)
        assert status == 200, report
        assert sorted(r["device_id"] for r in report["released"]) == ["carol-phone", "dave-phone"]
        assert report["diff"]["retracted"] == ["remove-tiktok"]
        assert report["newly_held"] == []
        assert report["guard"]["refused"] is False

        status, body = await c.viewer.post("/impact", data="[[policy]]\nid = \n")
        assert status == 400
        assert body["problems"][0]["file"] == "candidate.toml"
        assert body["problems"][0]["line"] == 2
        status, body = await c.viewer.post("/impact", data="x", mode="sideways")
        assert status == 400


def test_the_impact_preview_worker_runs_at_the_lowest_cpu_priority() -> None:
    """The preview is minutes of CPU over a large inventory: on a busy machine it must be
    the one that waits, not SMTP (docs/admin.md)."""
    with impact_pool() as pool:
        niceness = pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(timeout=60)
        policy = pool.submit(os.sched_getscheduler, 0).result(timeout=60)
    assert niceness == IMPACT_NICENESS == 19
    assert policy == os.SCHED_IDLE  # Linux: only cores nothing else wants


def desktop_ban_announced_now() -> str:
    """A second ban, for laptops with the app, in its announce phase now."""
    now = datetime.now(UTC)
    return (
        "[[policy]]\n"
        'id = "remove-tiktok-desktop"\n'
        f'match.apps_any = ["{TIKTOK}"]\n'
        'scope.device_class = ["desktop"]\n'
        f"announce_at = {(now - timedelta(hours=1)).isoformat()}\n"
        f"enforce_at = {(now + timedelta(days=1)).isoformat()}\n"
        'action = "hold"\nmessage = "Remove TikTok from your laptop."\nstate = "enforce"\n'
    )


async def test_impact_preview_names_who_would_be_told(tmp_path: Path, issuer: TestIssuer) -> None:
    """With notices on, Carol's and Dave's phones were sent the hold notice: a retraction's
    preview lists exactly them for the "disregard" notice; a new ban in its announce
    phase lists the laptop it would warn, not the phones; a suspension is counted (the
    retraction then releases nobody, and still withdraws the notices sent)."""
    async with console(tmp_path, issuer, notices=True) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        dave = FakeDevice(c.issuer, user="dave@example.test", device_id="dave-phone", apps={TIKTOK})
        await hold(dave, c.gateway.port, "dave #0")
        erin = FakeDevice(
            c.issuer, user="erin@example.test", device_id="erin-laptop", device_class="desktop",
            platform="macos", apps={TIKTOK},
        )  # fmt: skip
        assert (await erin.send(c.gateway.port)).accepted  # the ban is for phones
        # Erin's mail and the two hold notices.
        await c.upstream.wait_for(3, timeout=10)
        retraction = tiktok_ban(
            "hold", state="retracted", extra='retracted_reason = "sent in error"\n'
        )
        status, report = await c.viewer.post("/impact", data=retraction)
        assert status == 200, report
        assert report["notices"]["enabled"] is True
        assert report["notices"]["withdrawn"] == {
            "notices": 2,
            "users": 2,
            "devices": 2,
            "rows": [
                {"user": "carol@example.test", "device_id": "carol-phone",
                 "policy_id": "remove-tiktok"},
                {"user": "dave@example.test", "device_id": "dave-phone",
                 "policy_id": "remove-tiktok"},
            ],
        }  # fmt: skip
        assert report["notices"]["announced"]["notices"] == 0

        status, report = await c.viewer.post("/impact", data=desktop_ban_announced_now())
        assert status == 200, report
        assert report["notices"]["announced"]["rows"] == [
            {"user": "erin@example.test", "device_id": "erin-laptop",
             "policy_id": "remove-tiktok-desktop"},
        ]  # fmt: skip
        assert report["notices"]["withdrawn"]["notices"] == 0

        status, body = await c.operator.post(
            "/policies/remove-tiktok/suspend", seconds="3600", reason="INC-7"
        )
        assert status == 200, body
        status, report = await c.viewer.post("/impact", data=retraction)
        assert status == 200, report
        assert report["overrides"] == {"suspended": ["remove-tiktok"], "exempt": []}
        assert report["released"] == []  # suspended: it blocks nobody before or after
        assert report["notices"]["withdrawn"]["notices"] == 2


def test_token_add_prints_the_token_once_and_stores_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.admin.tokens import TokensFile, token_hash

    path = tmp_path / "tokens"
    assert main(["admin", "token", "add", "ann", "--role", "viewer", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    text = path.read_text()
    assert token not in text
    assert text == f"ann viewer {token_hash(token)}\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    found = TokensFile(path).find(token)
    assert found is not None
    assert found.name == "ann"
    assert main(["admin", "token", "add", "ann", "--role", "operator", "--file", str(path)]) == 2
    assert "already has a token named 'ann'" in capsys.readouterr().err


async def test_an_impact_preview_that_does_not_finish_in_time_is_a_503_with_a_reason(
    tmp_path: Path, issuer: TestIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker runs only on CPU nothing else wants: when it cannot finish in time, the
    admin gets a 503 saying why instead of a request that never ends."""
    monkeypatch.setattr(api_module, "IMPACT_TIMEOUT", 0.01)  # a spawned worker takes longer
    async with console(tmp_path, issuer) as c:
        status, body = await c.viewer.post("/impact", data=tiktok_ban("warn"))
    assert status == 503
    assert "did not finish within 0 s" in body["error"]
    assert "try again later" in body["error"]


async def test_a_drop_with_dsn_of_mail_another_gateway_settled_counts_and_bounces_nothing(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """On a fleet another gateway may release a message between the admin's selection and
    the drop: the drop then writes no DSN, and counts (and audits) nothing for it."""
    async with console(tmp_path, issuer) as c:
        await hold(carol(issuer), c.gateway.port, "settled elsewhere")
        store = c.gateway.server.services.hold_store
        selected = await store.select(HoldFilter(), 10)
        assert len(selected) == 1
        now = datetime.now(UTC)
        assert await store.settle(Settlement(selected[0].hold_id, now))  # the other gateway
        handlers = Handlers(c.gateway.server._admin_api(utc_now))
        assert await handlers._drop(selected, dsn=True) == (0, 0)
        assert await store.select(HoldFilter(), 10) == []  # no DSN row was written


async def test_policy_history_on_start_and_reload_with_diffs(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Every set put in force is in the history, once: at start, after a reload that
    changed something (not after one that did not), and a revert moves the old version's
    last load instead of storing it again. A viewer reads the list (newest first, paged),
    one version with its files' text, and the diff between any two: a unified diff per
    file and the policies added, changed and removed. Unknown versions 404, bad
    parameters 400 with a message (docs/admin.md, "Policy history")."""
    async with console(tmp_path, issuer) as c:
        policies = c.gateway.policy_dir
        status, body = await c.viewer.get("/policies/history")
        assert status == 200
        (first,) = body["versions"]
        v1 = first["version"]
        assert v1 == body["in_force"] == c.gateway.server.services.policies.current.version
        assert (first["trigger"], first["in_force"], first["policy_count"]) == ("startup", True, 1)
        assert first["loaded_by"].endswith(f"pid {os.getpid()}")  # the gateway runs in-process

        assert (await c.gateway.server.reload("test")).version == v1  # nothing changed
        assert len((await c.viewer.get("/policies/history"))[1]["versions"]) == 1

        (policies / "ban.toml").write_text(tiktok_ban("reject"))
        (policies / "extra.toml").write_text(
            tiktok_ban("warn").replace("remove-tiktok", "warn-tiktok")
        )
        v2 = (await c.gateway.server.reload("sighup")).version
        status, body = await c.viewer.get("/policies/history")
        assert [(v["version"], v["trigger"], v["in_force"]) for v in body["versions"]] == [
            (v2, "sighup", True),
            (v1, "startup", False),
        ]

        status, shown = await c.viewer.get(f"/policies/history/{v2}")
        assert status == 200
        files = {f["name"]: f for f in shown["files"]}
        assert files["ban.toml"]["text"] == tiktok_ban("reject")
        assert files["ban.toml"]["truncated"] is False
        assert [p["id"] for p in shown["policies"]] == ["remove-tiktok", "warn-tiktok"]

        status, diff = await c.viewer.get("/policies/history/diff", **{"from": v1, "to": v2})
        assert status == 200
        assert (diff["from"]["version"], diff["to"]["version"]) == (v1, v2)
        changed = {f["name"]: f for f in diff["files"]}
        assert (changed["ban.toml"]["status"], changed["extra.toml"]["status"]) == (
            "changed",
            "added",
        )
        lines = changed["ban.toml"]["diff"].splitlines()
        assert lines[:2] == [f"--- {v1}/ban.toml", f"+++ {v2}/ban.toml"]
        assert '-action = "hold"' in lines
        assert '+action = "reject"' in lines
        assert diff["policies"] == {
            "added": ["warn-tiktok"],
            "changed": ["remove-tiktok"],
            "retracted": [],
            "removed": [],
        }

        # A revert to the first set: not stored again, its last load moves, it is in force.
        (policies / "ban.toml").write_text(tiktok_ban("hold"))
        (policies / "extra.toml").unlink()
        assert (await c.gateway.server.reload("watch")).version == v1
        status, body = await c.viewer.get("/policies/history", limit=1)
        (newest,) = body["versions"]
        assert (newest["version"], body["next"]) == (v2, newest["seq"])
        (older,) = (await c.viewer.get("/policies/history", before=body["next"]))[1]["versions"]
        assert (older["version"], older["in_force"], older["trigger"]) == (v1, True, "startup")
        assert datetime.fromisoformat(older["last_loaded_at"]) > datetime.fromisoformat(
            older["loaded_at"]
        )
        status, back = await c.viewer.get("/policies/history/diff", **{"from": v2, "to": v1})
        assert back["policies"]["removed"] == ["warn-tiktok"]
        assert [f["status"] for f in back["files"]] == ["changed", "removed"]

        for path in ("/policies/history/0123456789ab", "/policies/history/not-a-version"):
            status, body = await c.viewer.get(path)
            assert status == 404, path
            assert "no such policy version" in body["error"]
        status, body = await c.viewer.get(
            "/policies/history/diff", **{"from": "0123456789ab", "to": v1}
        )
        assert (status, "no such policy version" in body["error"]) == (404, True)
        for params, says in (
            ({"from": v1}, "to is required"),
            ({"from": "v1", "to": v1}, "from must be a policy version"),
            ({"from": v1, "to": v1 + "\n"}, "to must be a policy version"),
            ({"from": v1, "to": v1, "colour": "red"}, "unknown parameter 'colour'"),
        ):
            status, body = await c.viewer.get("/policies/history/diff", **params)
            assert status == 400, params
            assert says in body["error"]
        status, body = await c.viewer.get("/policies/history", limit="0")
        assert (status, "limit must be an integer" in body["error"]) == (400, True)


async def test_decisions_per_ten_minutes(tmp_path: Path, issuer: TestIssuer) -> None:
    """GET /decisions: this gateway's submission decisions per action in the current
    ten-minute bucket, six hours of buckets (the overview's chart)."""
    async with console(tmp_path, issuer) as c:
        await hold(carol(c.issuer), c.gateway.port, "carol #0")
        laptop = FakeDevice(c.issuer, user="erin@example.test", device_id="erin-laptop")
        assert (await laptop.send(c.gateway.port)).accepted
        assert (await laptop.send(c.gateway.port)).accepted
        status, body = await c.viewer.get("/decisions")
        assert status == 200
        assert (body["bucket_seconds"], len(body["buckets"])) == (600, 36)
        totals = Counter[str]()
        for bucket in body["buckets"]:
            totals.update(bucket["counts"])
        assert totals == {"allow": 2, "hold": 1}
        # in the current bucket (or, across a boundary, the one before)
        assert all(b["counts"] == {} for b in body["buckets"][:-2])
