"""Admin pages under /admin: server-rendered HTML over the admin API's own handlers.

No JavaScript. Each page calls the same handler the API serves (so a page shows exactly
what /api/v1 answers) and renders its JSON as HTML, every value escaped.

Login: a token, posted once to /admin/login, opens a server-side session; the browser
holds only a random session id in a cookie (HttpOnly, SameSite=Strict, Path=/admin), for
at most SESSION_SECONDS. Every form that changes something carries the session's CSRF
value in a hidden field, and its Origin (when sent) must be this listener's: else 403.
"""

from __future__ import annotations

import html
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

from aiohttp import web

from gateway.admin.api import ADMIN_KEY, AdminApi, ApiError, Handlers, same_origin
from gateway.admin.tokens import Admin, Role, TokensFileError

COOKIE = "gateway_admin"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000
MAX_FORM_BYTES = 1024 * 1024 + 4096  # the impact form carries a policy file

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Session:
    admin: Admin
    csrf: str
    expires: float


class Sessions:
    """Login sessions in memory: a restart logs everyone out, which is fine for admins."""

    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}

    def open(self, admin: Admin) -> str:
        now = time.monotonic()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
        while len(self._by_id) >= MAX_SESSIONS:
            self._by_id.pop(next(iter(self._by_id)))
        session_id = secrets.token_urlsafe(32)
        self._by_id[session_id] = Session(admin, secrets.token_hex(16), now + SESSION_SECONDS)
        return session_id

    def find(self, session_id: str | None) -> Session | None:
        session = self._by_id.get(session_id or "")
        if session is None or session.expires <= time.monotonic():
            return None
        return session

    def close(self, session_id: str | None) -> None:
        self._by_id.pop(session_id or "", None)


_SESSION_KEY = web.RequestKey("admin_session", Session)
_FORM_KEY = web.RequestKey("admin_form", dict)

_STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#222}
nav{background:#234;padding:.6em 1em}nav a{color:#fff;margin-right:1.2em;text-decoration:none}
main{padding:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .5em;
text-align:left;vertical-align:top}th{background:#eee}.error{color:#a00}.ok{color:#070}
form.inline{display:inline}textarea{width:100%;height:16em;font-family:monospace}
.bar{display:inline-block;background:#47a;height:.8em}
pre.diff{background:#f6f6f6;padding:.5em;overflow-x:auto}pre.diff span{display:block}
.add{background:#dfd;color:#050}.del{background:#fdd;color:#800}.hunk{color:#06a}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str, session: Session | None, status: int = 200) -> web.Response:
    nav = ""
    if session is not None:
        links = [("Overview", "/admin/"), ("Held mail", "/admin/held"), ("Devices", "/admin/devices"),
                 ("Policies", "/admin/policies"), ("Policy history", "/admin/history"),
                 ("Impact preview", "/admin/impact"),
                 ("Audit", "/admin/audit")]  # fmt: skip
        nav = "<nav>" + "".join(f'<a href="{href}">{_e(text)}</a>' for text, href in links)
        nav += (
            f'<span style="color:#ccc">{_e(session.admin.name)} ({_e(session.admin.role.value)})'
            f"</span> {_form('/admin/logout', session, 'Log out')}</nav>"
        )
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)} · '
        f"Compliance Gateway</title><style>{_STYLE}</style></head><body>{nav}<main>"
        f"<h1>{_e(title)}</h1>{body}</main></body></html>"
    )
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
            "X-Frame-Options": "DENY",
            "Cache-Control": "no-store",
        },
    )


def _form(
    action: str, session: Session, label: str, fields: Mapping[str, str] | None = None
) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">'
        for k, v in {"csrf": session.csrf, **(fields or {})}.items()
    )
    return (
        f'<form class="inline" method="post" action="{_e(action)}">{hidden}'
        f'<button type="submit">{_e(label)}</button></form>'
    )


def _table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Pages:
    def __init__(self, api: AdminApi, handlers: Handlers) -> None:
        self.api = api
        self.handlers = handlers
        self.sessions = Sessions()

    async def call(self, handler: Handler, request: web.Request) -> Any:
        """One API handler's JSON answer, for a page."""
        response = await handler(request)
        assert isinstance(response, web.Response)
        assert response.body is not None
        body = response.body
        return json.loads(body if isinstance(body, bytes) else b"")

    # --- login -----------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        error = request.query.get("error")
        message = f'<p class="error">{_e(error)}</p>' if error in _LOGIN_ERRORS else ""
        return _page(
            "Log in",
            f'{message}<form method="post" action="/admin/login"><label>Admin token '
            f'<input type="password" name="token" autocomplete="off" size="50"></label> '
            f'<button type="submit">Log in</button></form><p>Tokens come from '
            f"<code>gateway admin token add</code> (docs/admin.md).</p>",
            None,
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            raise web.HTTPForbidden(text="cross-origin request refused\n")
        form = await _read_form(request)
        token = form.get("token", "").strip()
        try:
            admin = self.api.tokens.find(token) if token and self.api.tokens.configured else None
        except TokensFileError:
            admin = None
        if admin is None:
            raise web.HTTPSeeOther("/admin/login?" + urlencode({"error": _LOGIN_ERRORS[0]}))
        response = web.HTTPSeeOther("/admin/")
        response.set_cookie(
            COOKIE, self.sessions.open(admin), path="/admin", httponly=True, samesite="Strict",
            max_age=SESSION_SECONDS,
        )  # fmt: skip
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.close(request.cookies.get(COOKIE))
        response = web.HTTPSeeOther("/admin/login")
        response.del_cookie(COOKIE, path="/admin")
        raise response

    # --- pages -----------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        status = await self.call(self.handlers.status, _without_query(request))
        held = status["held"]
        reload = status.get("last_reload") or {}
        upstreams = "".join(
            f"<li>{_e(u['metric'])} {_e(u['labels'])}: {_e(u['value'])}</li>"
            for u in status.get("upstreams", [])
        )
        body = (
            f"<p>Readiness: <b>{_e(status['readiness'])}</b></p>"
            f"<p>Policy version <code>{_e(status['policy_version'])}</code>; last reload "
            f"{'ok' if reload.get('ok') else 'failed'} ({_e(reload.get('trigger'))}), last success "
            f"{_e(reload.get('last_success_at'))}</p>"
            f"<p>Held: <b>{_e(held['messages'])}</b> message(s), {_e(held['bytes'])} bytes, "
            f"oldest {_e(held['oldest'] or '-')}</p>"
            f"<h2>Upstream</h2><ul>{upstreams or '<li>no figures yet</li>'}</ul>"
        )
        series = await self.call(self.handlers.decisions, _without_query(request))
        body += "<h2>Decisions, last six hours</h2>" + decisions_chart(series)
        return _page("Overview", body, session)

    async def held(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        answer = await self.call(self.handlers.held_list, _filled(request))
        operator = session.admin.role is Role.OPERATOR
        rows = []
        for m in answer["messages"]:
            actions = ""
            if operator:
                base = f"/admin/held/{m['hold_id']}"
                actions = (
                    _form(f"{base}/release", session, "Release")
                    + _form(f"{base}/drop", session, "Drop")
                    + _form(f"{base}/drop", session, "Drop with DSN", {"dsn": "true"})
                )
            rows.append([
                f'<a href="/admin/held/{_e(m["hold_id"])}">{_e(m["hold_id"][:12])}</a>',
                _e(m["received_at"]), _e(m["user"]), _e(m["device_id"]), _e(m["sender"]),
                _e(", ".join(m["recipients"])), _e(", ".join(m["policy_ids"])), _e(m["size"]),
                actions,
            ])  # fmt: skip
        values = {k: request.query.get(k, "") for k in ("user", "device", "policy")}
        inputs = "".join(
            f'<label>{k} <input name="{k}" value="{_e(v)}"></label> ' for k, v in values.items()
        )
        more = ""
        if answer["next"] is not None:
            query = {k: v for k, v in request.query.items() if k != "after"}
            more = f'<p><a href="/admin/held?{_e(urlencode({**query, "after": answer["next"]}))}">Next page</a></p>'
        body = (
            f'<form method="get" action="/admin/held">{inputs}<button>Filter</button></form>'
            + _table(
                [
                    "id",
                    "received",
                    "user",
                    "device",
                    "sender",
                    "recipients",
                    "policies",
                    "bytes",
                    "",
                ],
                rows,
            )
            + more
        )
        return _page("Held mail", body, session)

    async def held_one(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        m = await self.call(self.handlers.held_show, request)
        facts = [[_e(k), _e(v)] for k, v in m.items() if k not in ("headers", "claims")]
        claims = [[_e(k), _e(v)] for k, v in m["claims"].items()]
        headers = [[_e(name), _e(value)] for name, value in m["headers"]]
        body = (
            _table(["", ""], facts)
            + "<h2>Device claims</h2>" + _table(["", ""], claims)
            + "<h2>Headers</h2>" + _table(["name", "value"], headers)
        )  # fmt: skip
        return _page(f"Held message {m['hold_id']}", body, session)

    async def act(self, request: web.Request) -> web.StreamResponse:
        """A release or drop form: the API's handler, then back to the list."""
        action = request.match_info["action"]
        handler = self.handlers.held_release if action == "release" else self.handlers.held_drop
        form = request[_FORM_KEY]
        query = {"dsn": "true"} if action == "drop" and form.get("dsn") == "true" else {}
        await handler(request.clone(rel_url=request.rel_url.with_query(query)))
        raise web.HTTPSeeOther("/admin/held")

    async def devices(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        answer = await self.call(self.handlers.devices, _filled(request))
        rows = []
        for d in answer["devices"]:
            why = []
            for access, decision in d["decisions"].items():
                reasons = "; ".join(
                    f"{m['policy_id']} ({m['phase']}): {m['message']}" for m in decision["matches"]
                )
                why.append(f"<b>{_e(access)}</b>: {_e(decision['action'])}"
                           + (f" — {_e(reasons)}" if reasons else ""))  # fmt: skip
            rows.append([_e(d["user"]), _e(d["device_id"]), _e(d.get("platform")),
                         _e(", ".join(d.get("apps", []))), _e(", ".join(d["seen_for"])),
                         "<br>".join(why)])  # fmt: skip
        inputs = "".join(
            f'<label>{k} <input name="{k}" value="{_e(request.query.get(k, ""))}"></label> '
            for k in ("user", "device")
        )
        body = (
            f'<form method="get" action="/admin/devices">{inputs}<button>Filter</button></form>'
            f"<p>Decisions now, under policy version <code>{_e(answer['policy_version'])}</code>.</p>"
            + _table(["user", "device", "platform", "apps", "seen doing", "decision and why"], rows)
        )
        return _page("Devices", body, session)

    async def policies(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        answer = await self.call(self.handlers.policies, _without_query(request))
        rows = [
            [_e(p["id"]), _e(p["title"]), _e(p["state"]), _e(p["action"]), _e(", ".join(p["access"])),
             _e(p["phase_now"] or "-"),
             _e(" → ".join(x for x in (f"announce {p['announce_at']}" if p["announce_at"] else "",
                                       f"enforce {p['enforce_at']}" if p["enforce_at"] else "",
                                       f"retracted: {p['retracted_reason']}" if p["state"] == "retracted" else "") if x)),
             _e(p["source"])]
            for p in answer["policies"]
        ]  # fmt: skip
        failure = answer.get("last_error")
        problems = ""
        if failure:
            problems = "<h2>Last failed reload</h2><ul>" + "".join(
                f'<li class="error">{_e(p["file"])}:{_e(p["line"])}: {_e(p["key"])} {_e(p["message"])}</li>'
                for p in failure["problems"]
            ) + "</ul>"  # fmt: skip
        body = (
            f"<p>Version in force <code>{_e(answer['version'])}</code>.</p>"
            + _table(
                ["id", "title", "state", "action", "access", "phase now", "timeline", "file"], rows
            )
            + problems
        )
        return _page("Policies", body, session)

    async def history(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        answer = await self.call(self.handlers.history, _filled(request))
        versions = answer["versions"]
        rows = []
        for n, v in enumerate(versions):
            older = versions[n + 1]["version"] if n + 1 < len(versions) else None
            link = ""
            if older is not None:
                query = urlencode({"from": older, "to": v["version"]})
                link = f'<a href="/admin/history/diff?{_e(query)}">diff with previous</a>'
            rows.append([
                f'<a href="/admin/history/{_e(v["version"])}"><code>{_e(v["version"])}</code></a>'
                + (" <b>in force</b>" if v["in_force"] else ""),
                _e(v["loaded_at"]), _e(v["trigger"]), _e(v["loaded_by"]), _e(v["last_loaded_at"]),
                _e(v["policy_count"]), _e(v["file_count"]) + (" (truncated)" if v["truncated"] else ""),
                link,
            ])  # fmt: skip
        pick = ""
        if len(versions) > 1:  # by default the newest and the one before it

            def options(chosen: int) -> str:
                return "".join(
                    f'<option value="{_e(v["version"])}"{" selected" if n == chosen else ""}>'
                    f"{_e(v['version'])} ({_e(v['loaded_at'])})</option>"
                    for n, v in enumerate(versions)
                )

            pick = (
                '<form method="get" action="/admin/history/diff">'
                f'<label>from <select name="from">{options(1)}</select></label> '
                f'<label>to <select name="to">{options(0)}</select></label> '
                "<button>Compare</button></form>"
            )
        more = ""
        if answer["next"] is not None:
            more = f'<p><a href="/admin/history?{_e(urlencode({"before": answer["next"]}))}">Older versions</a></p>'
        body = (
            f"<p>Every policy set put in force, newest first (at most {_e(answer['keep'])} kept). "
            "A set loaded again (a restart, a revert, another gateway) is not stored twice: "
            "its last load moves.</p>"
            + pick
            + _table(
                [
                    "version",
                    "first in force",
                    "trigger",
                    "loaded by",
                    "last loaded",
                    "policies",
                    "files",
                    "",
                ],
                rows,
            )
            + more
        )
        return _page("Policy history", body, session)

    async def history_version(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        v = await self.call(self.handlers.history_show, request)
        facts = [[_e(k), _e(v[k])] for k in ("version", "loaded_at", "trigger", "loaded_by",
                                             "last_loaded_at", "in_force", "truncated")]  # fmt: skip
        policies = "<p>Not recorded (more policies than the history fingerprints).</p>"
        if v["policies"] is not None:
            policies = _table(
                ["id", "state"], [[_e(p["id"]), _e(p["state"])] for p in v["policies"]]
            )
        files = "".join(
            f"<h3>{_e(f['name'])} ({_e(f['size'])} bytes"
            + (", only its beginning is kept" if f["truncated"] else "")
            + f')</h3><pre class="diff">{_e(f["text"])}</pre>'
            for f in v["files"]
        )
        body = (
            _table(["", ""], facts)
            + "<h2>Policies</h2>" + policies
            + "<h2>Files</h2>" + (files or "<p>No file text recorded.</p>")
        )  # fmt: skip
        return _page(f"Policy version {v['version']}", body, session)

    async def history_diff(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        d = await self.call(self.handlers.history_diff, request)
        changes = "<p>Policies not compared (a version has more policies than the history fingerprints).</p>"
        if d["policies"] is not None:
            changes = "<ul>" + "".join(
                f"<li>{_e(kind)}: {_e(', '.join(d['policies'][kind]) or '-')}</li>"
                for kind in ("added", "changed", "retracted", "removed")
            ) + "</ul>"  # fmt: skip
        files = "".join(
            f"<h3>{_e(f['name'])} ({_e(f['status'])}"
            + (", partial: the stored text or the diff was cut" if f["truncated"] else "")
            + f')</h3><pre class="diff">{_diff_lines(f["diff"])}</pre>'
            for f in d["files"]
        )
        body = (
            f"<p>From <a href=\"/admin/history/{_e(d['from']['version'])}\"><code>{_e(d['from']['version'])}</code></a> "
            f"({_e(d['from']['loaded_at'])}) to <a href=\"/admin/history/{_e(d['to']['version'])}\">"
            f"<code>{_e(d['to']['version'])}</code></a> ({_e(d['to']['loaded_at'])}).</p>"
            f"<h2>Policies</h2>{changes}<h2>Files</h2>"
            + (files or "<p>No file differs.</p>")
            + f"<p>{_e(d['unchanged_files'])} file(s) unchanged.</p>"
        )  # fmt: skip
        return _page("Policy diff", body, session)

    async def impact_form(self, request: web.Request) -> web.Response:
        return _page(
            "Impact preview", _impact_form(request[_SESSION_KEY], ""), request[_SESSION_KEY]
        )

    async def impact(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        form = request[_FORM_KEY]
        text = form.get("policy", "")
        mode = "replace" if form.get("mode") == "replace" else "merge"
        outcome = await self.handlers.impact_of(text, mode)
        result = ""
        if isinstance(outcome, tuple):
            answer: Any = None
            result = '<ul class="error">' + "".join(
                f"<li>line {_e(p.line)}: {_e(p.key)} {_e(p.message)}</li>" for p in outcome
            ) + "</ul>"  # fmt: skip
        else:
            answer = outcome
            for title, key in (("Newly warned", "newly_warned"), ("Newly deferred", "newly_deferred"),
                               ("Newly held", "newly_held"), ("Newly rejected", "newly_rejected"),
                               ("Released", "released")):  # fmt: skip
                rows = [[_e(r["user"]), _e(r["device_id"]), _e(", ".join(r["access"])),
                         _e(f"{r['before']} → {r['after']}"), _e(", ".join(r["policy_ids"]))]
                        for r in answer[key]]  # fmt: skip
                result += f"<h2>{_e(title)} ({_e(answer['counts'][key])})</h2>" + _table(
                    ["user", "device", "for", "decision", "policies"], rows
                )
            result += _told_tables(answer)
            guard = answer["guard"]
            result += (
                f'<p class="error">The reload guard would refuse it: {_e(guard["reason"])}</p>'
                if guard["refused"]
                else '<p class="ok">The reload guard would let it through.</p>'
            )
        return _page("Impact preview", _impact_form(session, text) + result, session)

    async def audit(self, request: web.Request) -> web.Response:
        session = request[_SESSION_KEY]
        answer = await self.call(self.handlers.audit_list, _filled(request))
        rows = [
            [_e(e["at"]), _e(e["actor"]), _e(e["role"]), _e(e["action"]),
             _e(json.dumps(e["target"], sort_keys=True)), _e(e["count"])]
            for e in answer["entries"]
        ]  # fmt: skip
        return _page(
            "Audit", _table(["when", "who", "role", "what", "target", "messages"], rows), session
        )


def _told_tables(answer: Any) -> str:
    """Who would be told: the announcement and the "disregard" notice (a preview's
    ``notices``), and the operator overrides the preview counted."""
    told = answer["notices"]
    if not told["enabled"]:
        return "<h2>Would be told</h2><p>Nobody: notices are off ([gateway] notices).</p>"
    html = ""
    for title, key in (("Would be told: announcement", "announced"),
                       ('Would be told: "disregard the earlier notice"', "withdrawn")):  # fmt: skip
        part = told[key]
        rows = [[_e(r["user"]), _e(r["device_id"]), _e(r["policy_id"])] for r in part["rows"]]
        html += (
            f"<h2>{_e(title)} ({_e(part['users'])} users, {_e(part['notices'])} notices)</h2>"
            + _table(["user", "device", "policy"], rows)
        )
    overrides = answer["overrides"]
    if overrides["suspended"] or overrides["exempt"]:
        named = [f"{p} suspended" for p in overrides["suspended"]] + [
            f"{e['policy_id']} exempts {e['subject']}" for e in overrides["exempt"]
        ]
        html += f"<p>Operator overrides in force (counted): {_e(', '.join(named))}.</p>"
    return html


_LOGIN_ERRORS = ("That token is not valid.",)


def _diff_lines(diff: str) -> str:
    """A unified diff, escaped, one span per line: added, removed and hunk lines styled."""
    out = []
    for line in diff.splitlines():
        kind = ""
        if line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+") and not line.startswith("+++"):
            kind = "add"
        elif line.startswith("-") and not line.startswith("---"):
            kind = "del"
        out.append(
            f'<span class="{kind}">{_e(line)}</span>' if kind else f"<span>{_e(line)}</span>"
        )
    return "".join(out)


# Stacked from the bottom, least severe first; colours readable on white.
_CHART_ACTIONS = (("allow", "#6a6"), ("warn", "#d4a017"), ("defer", "#69c"), ("hold", "#d2691e"),
                  ("reject", "#c33"))  # fmt: skip


def decisions_chart(series: Mapping[str, Any]) -> str:
    """GET /api/v1/decisions as an inline SVG bar chart (no script): one stacked bar per
    bucket, a title on each part (a browser shows it on hover), a legend with totals."""
    buckets = series["buckets"]
    width, height, left, bottom = 720, 180, 40, 20
    plot_w, plot_h = width - left - 10, height - bottom - 10
    totals = [sum(b["counts"].values()) for b in buckets]
    top = max([*totals, 1])
    step = plot_w / max(len(buckets), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" '
        f'role="img" aria-label="decisions per {series["bucket_seconds"] // 60} minutes" '
        'class="chart" font-size="11" font-family="sans-serif">',
        f'<line x1="{left}" y1="{10 + plot_h}" x2="{width - 10}" y2="{10 + plot_h}" stroke="#999"/>',
        f'<text x="{left - 4}" y="14" text-anchor="end">{top}</text>',
        f'<text x="{left - 4}" y="{10 + plot_h}" text-anchor="end">0</text>',
    ]
    for n, bucket in enumerate(buckets):
        x = left + n * step
        y = 10 + plot_h
        start = _e(bucket["start"][11:16])
        for action, colour in _CHART_ACTIONS:
            count = bucket["counts"].get(action, 0)
            if not count:
                continue
            h = plot_h * count / top
            y -= h
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(step - 2, 1):.1f}" height="{h:.1f}" '
                f'fill="{colour}" class="bar-{action}"><title>{start} UTC: {count} {action}</title></rect>'
            )
        if n % 6 == 0:
            parts.append(f'<text x="{x:.1f}" y="{height - 4}">{start}</text>')
    sums = {a: sum(b["counts"].get(a, 0) for b in buckets) for a, _ in _CHART_ACTIONS}
    legend_x = left
    for action, colour in _CHART_ACTIONS:
        parts.append(
            f'<rect x="{legend_x}" y="{height + 6}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{legend_x + 14}" y="{height + 15}">{action} {sums[action]}</text>'
        )
        legend_x += 110
    parts.append("</svg>")
    return (
        "".join(parts)
        + "<p>This gateway's submission decisions per ten minutes (UTC), since it started.</p>"
    )


def _impact_form(session: Session, text: str) -> str:
    return (
        '<form method="post" action="/admin/impact">'
        f'<input type="hidden" name="csrf" value="{_e(session.csrf)}">'
        "<p>Paste a candidate policy file (TOML). Its policies replace the live ones with "
        "the same id (merge), or stand alone (replace).</p>"
        f'<textarea name="policy">{_e(text)}</textarea>'
        '<p><label><input type="radio" name="mode" value="merge" checked> merge</label> '
        '<label><input type="radio" name="mode" value="replace"> replace</label> '
        '<button type="submit">Preview</button></p></form>'
    )


def _filled(request: web.Request) -> web.Request:
    """The request without the empty fields a filter form submits (``?user=&device=``):
    an empty field means no filter, where the API would refuse an empty value."""
    return request.clone(
        rel_url=request.rel_url.with_query({k: v for k, v in request.query.items() if v})
    )


def _without_query(request: web.Request) -> web.Request:
    return request.clone(rel_url=request.rel_url.with_query({}))


async def _read_form(request: web.Request) -> dict[str, str]:
    raw = await request.content.read(MAX_FORM_BYTES + 1)
    if len(raw) > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM_BYTES, actual_size=len(raw))
    try:
        parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as exc:
        raise web.HTTPBadRequest(text="bad form\n") from exc
    return {k: v[0] for k, v in parsed.items()}


def _guard(pages: Pages) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/admin/login":
            return await handler(request)
        session = pages.sessions.find(request.cookies.get(COOKIE))
        if session is None:
            if request.method in ("GET", "HEAD"):
                raise web.HTTPSeeOther("/admin/login")
            raise web.HTTPUnauthorized(text="log in first\n")
        if request.method not in ("GET", "HEAD"):
            if not same_origin(request):
                raise web.HTTPForbidden(text="cross-origin request refused\n")
            form = await _read_form(request)
            if not secrets.compare_digest(form.get("csrf", ""), session.csrf):
                raise web.HTTPForbidden(text="missing or wrong CSRF value: reload the page\n")
            needs_operator = request.path.startswith("/admin/held/")
            if needs_operator and session.admin.role is not Role.OPERATOR:
                raise web.HTTPForbidden(text="this needs the operator role\n")
            request[_FORM_KEY] = form
        request[_SESSION_KEY] = session
        request[ADMIN_KEY] = session.admin
        try:
            return await handler(request)
        except ApiError as exc:
            return _page("Error", f'<p class="error">{_e(exc.message)}</p>', session, exc.status)

    return guard


def admin_pages(api: AdminApi, handlers: Handlers) -> web.Application:
    """The /admin application (mounted on the admin listener by the server)."""
    pages = Pages(api, handlers)
    app = web.Application(middlewares=[_guard(pages)])
    app.router.add_get("/login", pages.login_form)
    app.router.add_post("/login", pages.login)
    app.router.add_post("/logout", pages.logout)
    app.router.add_get("/", pages.overview)
    app.router.add_get("/held", pages.held)
    app.router.add_get("/held/{hold_id}", pages.held_one)
    app.router.add_post("/held/{hold_id}/{action:release|drop}", pages.act)
    app.router.add_get("/devices", pages.devices)
    app.router.add_get("/policies", pages.policies)
    app.router.add_get("/history", pages.history)
    app.router.add_get("/history/diff", pages.history_diff)  # before {version}
    app.router.add_get("/history/{version}", pages.history_version)
    app.router.add_get("/impact", pages.impact_form)
    app.router.add_post("/impact", pages.impact)
    app.router.add_get("/audit", pages.audit)
    return app
