"""The admin API under /api/v1 (docs/admin.md): held mail, devices and why, policies,
impact preview, the audit trail. JSON in and out; described by /api/v1/openapi.json.

Access control, in one middleware (:func:`_guard`), before any handler runs:

authentication  ``Authorization: Bearer <token>``, checked against the hashed tokens
                file; none configured, none given or none matching: 401 (whatever the
                listener's address, so the API is never open to whoever can reach it)
roles           viewer: GET and the impact preview; operator: also release and drop, and
                suspend, resume and exempt from policies: 403
CSRF            every POST carries ``X-Gateway-CSRF`` equal to the value GET /session
                returns for that token (an HMAC of the token's hash under a per-process
                key), and an ``Origin``, when sent, must be this listener's: else 403.
                A page on another site cannot set the header without a CORS preflight,
                which this API never grants.
audit           every release, drop and policy override is written to the store's audit table (who,
                what, when, how many), readable at GET /audit
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import multiprocessing
import os
import re
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from gateway.admin.openapi import OPENAPI
from gateway.admin.tokens import Admin, Role, TokensFile, TokensFileError
from gateway.config.settings import Settings, StoreSettings
from gateway.devices.inventory import Inventory
from gateway.domain import Access, Clock, DeviceClaims, Overrides
from gateway.errors import HoldStoreError, PolicyLoadError, Problem
from gateway.hold.backend import open_store_at, read_preview_inputs
from gateway.hold.dsn import admin_drop_report
from gateway.hold.release import Releaser, Spawn
from gateway.hold.store import AsyncStore, HeldMessage, HoldFilter, Settlement
from gateway.ops.logs import printable
from gateway.ops.timeline import DecisionTimeline
from gateway.policy.engine import CompiledPolicySet, compile_policy_set, decide
from gateway.policy.history import KEEP_VERSIONS, VERSION_PATTERN, PolicyVersion, compare
from gateway.policy.impact import LISTED_ROWS, PreviewInputs, preview_change
from gateway.policy.loader import load_policy_dir
from gateway.policy.model import PolicySet
from gateway.policy.store import PolicyStore, ReloadResult

log = structlog.get_logger("gateway.admin")

CSRF_HEADER = "X-Gateway-CSRF"
MAX_PAGE = 500  # held messages per page
MAX_POLICY_BYTES = 1024 * 1024  # an uploaded candidate policy file
MAX_HEADERS = 200  # header fields shown for one held message
MAX_HEADER_VALUE = 2000  # characters of one header value shown
MAX_BULK = 10_000  # messages one bulk drop with DSN settles
MAX_FILTER = 320  # characters of a filter value (an address's longest)
_HOLD_ID = re.compile(r"^[0-9a-f]{32}$")
_VERSION = re.compile(VERSION_PATTERN)
ADMIN_KEY = web.RequestKey("admin", Admin)


class ApiError(Exception):
    """A refusal with its status and a message for the admin."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class AdminApi:
    """What the admin API reads and acts on (the server passes its services' parts)."""

    hold_store: AsyncStore
    settings: Settings  # where the store is, for the preview's worker process
    inventory: Inventory
    policies: PolicyStore
    releaser: Releaser
    clock: Clock
    hostname: str
    tokens: TokensFile
    status: Callable[[], Mapping[str, object]]
    spawn: Spawn
    blast_radius_limit: int | None = None
    csrf_key: bytes = b""
    # Called after an override changed: the services read the overrides again and act
    # on them at once (release pass, sync kicks), as after a reload.
    overrides_changed: Callable[[], Awaitable[object]] | None = None
    # This process's decisions per ten minutes (the overview's chart): Metrics.timeline.
    timeline: DecisionTimeline = field(default_factory=DecisionTimeline)

    def csrf_for(self, admin: Admin) -> str:
        return hmac.new(self.csrf_key, admin.token_hash.encode(), hashlib.sha256).hexdigest()[:32]


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _error(status: int, message: str) -> web.Response:
    response = _json({"error": message}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-admin"'
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _authenticate(api: AdminApi, request: web.Request) -> Admin:
    if not api.tokens.configured:
        raise ApiError(401, "no admin tokens are configured ([admin] tokens_file, docs/admin.md)")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "authentication required: send Authorization: Bearer <token>")
    try:
        admin = api.tokens.find(token.strip())
    except TokensFileError as exc:
        log.error("admin_tokens_unreadable", error=str(exc))
        raise ApiError(503, "the admin tokens file cannot be read; see the gateway's log") from exc
    if admin is None:
        raise ApiError(401, "unknown token")
    return admin


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.netloc.lower() == request.host.lower()


def _guard(api: AdminApi, needs: Mapping[tuple[str, str], Role]) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if request.path == "/api/v1/openapi.json":
                return await handler(request)
            admin = _authenticate(api, request)
            if request.method not in ("GET", "HEAD"):
                needed = needs.get((request.method, request.path), Role.OPERATOR)
                if not admin.role.may(needed):
                    raise ApiError(
                        403, f"role {admin.role.value} may not do this; it needs {needed.value}"
                    )
                if not same_origin(request):
                    raise ApiError(403, "cross-origin request refused")
                sent = request.headers.get(CSRF_HEADER, "")
                if not hmac.compare_digest(sent.encode(), api.csrf_for(admin).encode()):
                    raise ApiError(
                        403, f"missing or wrong {CSRF_HEADER} header (GET /api/v1/session gives it)"
                    )
            request[ADMIN_KEY] = admin
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.message)
        except HoldStoreError as exc:
            log.error("admin_store_failed", path=request.path, error=str(exc))
            return _error(
                503, "the hold store cannot be read or written now; see the gateway's log"
            )

    return guard


# --- parameters ----------------------------------------------------------------------------


def _params(request: web.Request, known: set[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in known:
            raise ApiError(
                400, f"unknown parameter {printable(key, 40)!r}; known: {', '.join(sorted(known))}"
            )
        if key in values:
            raise ApiError(400, f"parameter {key!r} given twice")
        values[key] = value
    return values


def _text(values: Mapping[str, str], key: str) -> str | None:
    value = values.get(key)
    if value is None:
        return None
    if not value or len(value) > MAX_FILTER or not value.isprintable():
        raise ApiError(400, f"bad filter: {key} must be 1 to {MAX_FILTER} printable characters")
    return value


def _integer(values: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    value = values.get(key)
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or not low <= int(value) <= high:
        raise ApiError(400, f"bad parameter: {key} must be an integer from {low} to {high}")
    return int(value)


def _flag(values: Mapping[str, str], key: str) -> bool:
    value = values.get(key, "false")
    if value not in ("true", "false"):
        raise ApiError(400, f"bad parameter: {key} must be true or false")
    return value == "true"


def _filter(values: Mapping[str, str]) -> HoldFilter:
    return HoldFilter(
        user=_text(values, "user"),
        device_id=_text(values, "device"),
        policy_id=_text(values, "policy"),
    )


MAX_OVERRIDE_SECONDS = 366 * 86400  # the longest suspension or exemption


def _policy_id(api: AdminApi, request: web.Request) -> str:
    policy_id = request.match_info["policy_id"]
    if policy_id not in {p.id for p in api.policies.current.source.policies}:
        raise ApiError(404, "no such policy in the set in force (GET /api/v1/policies lists them)")
    return policy_id


def _override_terms(values: Mapping[str, str], now: datetime) -> tuple[datetime, str]:
    """Until when (``seconds`` from now, or ``until``) and why (``reason``) of an override."""
    reason = values.get("reason", "")
    if not reason.strip() or len(reason) > 500 or not reason.isprintable():
        raise ApiError(400, "bad parameter: reason must be 1 to 500 printable characters")
    if ("seconds" in values) == ("until" in values):
        raise ApiError(400, "bad parameter: give seconds or until (one of them)")
    if "seconds" in values:
        seconds = _integer(values, "seconds", 0, 1, MAX_OVERRIDE_SECONDS)
        return now + timedelta(seconds=seconds), reason
    try:
        until = datetime.fromisoformat(values["until"].replace("Z", "+00:00"))
    except ValueError:
        until = None
    if until is None or until.tzinfo is None or not now < until:
        raise ApiError(400, "bad parameter: until must be a future ISO 8601 time with an offset")
    if until > now + timedelta(seconds=MAX_OVERRIDE_SECONDS):
        raise ApiError(400, "bad parameter: until is more than 366 days ahead")
    return until, reason


def _hold_id(request: web.Request) -> str:
    hold_id = request.match_info["hold_id"]
    if not _HOLD_ID.match(hold_id):
        raise ApiError(
            404, "no such held message (ids are 32 hex digits; GET /api/v1/held lists them)"
        )
    return hold_id


# --- handlers ------------------------------------------------------------------------------


class Handlers:
    def __init__(self, api: AdminApi) -> None:
        self.api = api
        self._pool: ProcessPoolExecutor | None = None  # impact previews, started on first use

    async def audit(
        self, request: web.Request, action: str, target: dict[str, object], count: int
    ) -> None:
        admin = request[ADMIN_KEY]
        await self.api.hold_store.record_admin_action(
            time.time(), admin.name, admin.role.value, action, target, count
        )
        log.info("admin_action", actor=admin.name, role=admin.role.value, action=action,
                 target=target, count=count, audit=True)  # fmt: skip

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(OPENAPI)

    async def session(self, request: web.Request) -> web.Response:
        _params(request, set())
        admin = request[ADMIN_KEY]
        return _json({"name": admin.name, "role": admin.role.value, "csrf": self.api.csrf_for(admin),
                      "csrf_header": CSRF_HEADER})  # fmt: skip

    async def status(self, request: web.Request) -> web.Response:
        _params(request, set())
        stats = await self.api.hold_store.stats()
        body = dict(self.api.status())
        body["held"] = {
            "messages": stats.messages,
            "bytes": stats.bytes,
            "oldest": stats.oldest.isoformat() if stats.oldest else None,
        }
        return _json(body)

    async def held_list(self, request: web.Request) -> web.Response:
        values = _params(request, {"user", "device", "policy", "after", "limit"})
        where = _filter(values)
        limit = _integer(values, "limit", 100, 1, MAX_PAGE)
        after = _integer(values, "after", 0, 0, 2**62)
        messages = await self.api.hold_store.select(where, limit, after)
        return _json(
            {
                "messages": [{"seq": m.seq, **m.summary()} for m in messages],
                "next": messages[-1].seq if len(messages) == limit else None,
            }
        )

    async def held_show(self, request: web.Request) -> web.Response:
        _params(request, set())
        hold_id = _hold_id(request)
        held = await self.api.hold_store.get(hold_id, with_content=False)
        if held is None:
            raise ApiError(404, "no such held message (released or dropped, or never held)")
        header_block = await self.api.hold_store.headers(hold_id)
        headers, truncated = _headers(header_block)
        return _json(
            {
                "seq": held.seq,
                **held.summary(),
                "claims": held.claims.summary(),
                "headers": headers,
                "headers_truncated": truncated,
            }
        )

    async def held_release(self, request: web.Request) -> web.Response:
        _params(request, set())
        hold_id = _hold_id(request)
        count = await self.api.hold_store.request_release(HoldFilter(), [hold_id])
        if count == 0:
            raise ApiError(404, "no such held message (released or dropped, or never held)")
        await self.audit(request, "hold.release", {"hold_ids": [hold_id]}, count)
        self.api.spawn(self.api.releaser.run(), "admin-release")
        return _json({"action": "release", "count": count})

    async def held_drop(self, request: web.Request) -> web.Response:
        values = _params(request, {"dsn"})
        dsn = _flag(values, "dsn")
        hold_id = _hold_id(request)
        store = self.api.hold_store
        async with self.api.releaser.paused():
            held = await store.get(hold_id, with_content=False)
            if held is None:
                raise ApiError(404, "no such held message (released or dropped, or never held)")
            count, bounces = await self._drop([held], dsn)
        if bounces:
            self.api.spawn(self.api.releaser.run(), "admin-drop-bounces")
        await self.audit(request, "hold.drop", {"hold_ids": [hold_id], "dsn": dsn}, count)
        return _json({"action": "drop", "count": count, "bounces": bounces})

    async def _drop(self, messages: list[HeldMessage], dsn: bool) -> tuple[int, int]:
        """Drop these messages (called with release paused); with ``dsn``, each (but a
        bounce, or mail from the null sender: RFC 5321 s 4.5.5) is settled with a report
        to its sender, stored as a bounce row in the same transaction as the delete and
        released like any held message (RFC 3464)."""
        store = self.api.hold_store
        if not dsn:
            return await store.drop(HoldFilter(), [m.hold_id for m in messages]), 0
        count = bounces = 0
        now = self.api.clock()
        for held in messages:
            if held.is_bounce or not held.sender:
                count += await store.drop(HoldFilter(), [held.hold_id])
                continue
            headers = await store.headers(held.hold_id)
            report = admin_drop_report(held, headers, self.api.hostname, now)
            if await store.settle(
                Settlement(held.hold_id, now, bounce=report, unless_claimed=True)
            ):
                count += 1  # not when another gateway settled it first: nothing was written
                bounces += 1
        return count, bounces

    async def bulk(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        values = _params(request, {"user", "device", "policy", "dsn"})
        where = _filter(values)
        if where.policy_id is None and where.device_id is None:
            raise ApiError(
                400, "bad filter: a bulk action needs policy or device (and may add user)"
            )
        dsn = _flag(values, "dsn")
        if action == "release" and "dsn" in values:
            raise ApiError(400, "bad parameter: dsn is for drop only")
        target: dict[str, object] = {
            k: v for k, v in (("user", where.user), ("device", where.device_id),
                              ("policy", where.policy_id)) if v is not None
        }  # fmt: skip
        store = self.api.hold_store
        bounces = 0
        if action == "release":
            count = await store.request_release(where)
            self.api.spawn(self.api.releaser.run(), "admin-release")
        else:
            async with self.api.releaser.paused():
                if dsn:
                    count, bounces = await self._drop(await store.select(where, MAX_BULK), True)
                else:
                    count = await store.drop(where)
            if bounces:
                self.api.spawn(self.api.releaser.run(), "admin-drop-bounces")
        target["dsn"] = dsn
        await self.audit(request, f"hold.bulk_{action}", target, count)
        return _json({"action": action, "count": count, "bounces": bounces})

    async def devices(self, request: web.Request) -> web.Response:
        values = _params(request, {"user", "device"})
        user = _text(values, "user")
        device = _text(values, "device")
        live, overrides = self.api.policies.current, self.api.policies.overrides
        now = self.api.clock()
        inventory = self.api.inventory
        chosen = [  # a snapshot, on the loop; deciding them all is a worker thread's job
            (claims, inventory.accesses_of(claims))
            for claims in inventory.devices()
            if (user is None or claims.user == user.casefold())
            and (device is None or claims.device.id == device)
        ]
        chosen.sort(key=lambda pair: (pair[0].user, pair[0].device.id))
        rows = await asyncio.to_thread(
            lambda: [_device_row(live, claims, now, used, overrides) for claims, used in chosen]
        )
        return _json({"policy_version": live.version, "at": now.isoformat(), "devices": rows})

    async def policies(self, request: web.Request) -> web.Response:
        _params(request, set())
        store = self.api.policies
        live = store.current
        now = self.api.clock()
        return _json(
            {
                "version": live.version,
                "policies": [_policy_row(p, now) for p in live.source.policies],
                "reload": _reload(store.last_result),
                "last_error": _reload(store.last_failure),
            }
        )

    async def impact(self, request: web.Request) -> web.Response:
        values = _params(request, {"mode"})
        mode = values.get("mode", "merge")
        if mode not in ("merge", "replace"):
            raise ApiError(400, "bad parameter: mode must be merge or replace")
        raw = await request.content.read(MAX_POLICY_BYTES + 1)
        if len(raw) > MAX_POLICY_BYTES:
            raise ApiError(
                413, f"the candidate policy file is larger than {MAX_POLICY_BYTES} bytes"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, "the candidate policy file must be UTF-8 TOML text") from exc
        outcome = await self.impact_of(text, mode)
        if isinstance(outcome, tuple):
            return _json(
                {"error": "the candidate policy file has problems",
                 "problems": [_problem(p) for p in outcome]}, 400
            )  # fmt: skip
        return _json(outcome)

    async def impact_of(self, text: str, mode: str) -> dict[str, object] | tuple[Problem, ...]:
        """:func:`preview_from_store` in a worker process: deciding every inventory device
        twice is pure CPU, and in a thread of this process it would take the GIL from the
        event loop for as long (SMTP latency would move). The inventory is flushed to the
        store first, so the worker reads what this process has seen."""
        await self.api.inventory.flush()
        now = self.api.clock()
        since = now - self.api.inventory.retention
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = impact_pool()
        try:
            async with asyncio.timeout(IMPACT_TIMEOUT):
                return await loop.run_in_executor(
                    self._pool,
                    preview_from_store,
                    _picklable(self.api.policies.current.source),
                    text,
                    mode,
                    self.api.settings.hold.database,
                    self.api.settings.store,
                    since,
                    now,
                    self.api.blast_radius_limit,
                    self.api.settings.notices,
                )
        except TimeoutError as exc:
            # The worker runs only on CPU nothing else wants: on a machine SMTP keeps busy
            # it may not finish. Its work is bounded; the admin is told, not kept waiting.
            raise ApiError(
                503,
                f"the impact preview did not finish within {IMPACT_TIMEOUT:.0f} s: the "
                "gateway's CPU is busy serving mail; try again later",
            ) from exc
        except BrokenProcessPool as exc:
            self._pool = None
            log.error("impact_preview_worker_failed", error=type(exc).__name__)
            raise ApiError(
                503, "the impact preview's worker process failed; see the gateway's log"
            ) from exc

    async def close(self, app: web.Application) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)

    async def overrides(self, request: web.Request) -> web.Response:
        _params(request, set())
        rows = await self.api.hold_store.policy_overrides(self.api.clock())
        return _json({"overrides": [r.as_dict() for r in rows]})

    async def _overrides_changed(self) -> None:
        if self.api.overrides_changed is not None:
            await self.api.overrides_changed()

    async def suspend(self, request: web.Request) -> web.Response:
        values = _params(request, {"seconds", "until", "reason"})
        policy_id = _policy_id(self.api, request)
        now = self.api.clock()
        until, reason = _override_terms(values, now)
        actor = f"admin:{request[ADMIN_KEY].name}"
        await self.api.hold_store.suspend_policy(policy_id, until, reason, actor, now)
        target: dict[str, object] = {"policy_id": policy_id, "until": until.isoformat(),
                                     "reason": reason}  # fmt: skip
        await self.audit(request, "policy.suspend", target, 1)
        await self._overrides_changed()
        return _json({"action": "suspend", **target})

    async def resume(self, request: web.Request) -> web.Response:
        _params(request, set())
        policy_id = request.match_info["policy_id"]
        count = await self.api.hold_store.resume_policy(policy_id)
        if count == 0:
            raise ApiError(404, "that policy is not suspended (GET /api/v1/overrides lists them)")
        await self.audit(request, "policy.resume", {"policy_id": policy_id}, count)
        await self._overrides_changed()
        return _json({"action": "resume", "policy_id": policy_id, "count": count})

    async def exempt(self, request: web.Request) -> web.Response:
        values = _params(request, {"user", "device", "seconds", "until", "reason"})
        policy_id = _policy_id(self.api, request)
        user, device = _text(values, "user"), _text(values, "device")
        if (user is None) == (device is None):
            raise ApiError(400, "bad parameter: give user or device (one of them)")
        subject = f"user:{user.casefold()}" if user is not None else f"device:{device}"
        now = self.api.clock()
        until, reason = _override_terms(values, now)
        actor = f"admin:{request[ADMIN_KEY].name}"
        await self.api.hold_store.exempt_from_policy(policy_id, subject, until, reason, actor, now)
        target: dict[str, object] = {"policy_id": policy_id, "subject": subject,
                                     "until": until.isoformat(), "reason": reason}  # fmt: skip
        await self.audit(request, "policy.exempt", target, 1)
        await self._overrides_changed()
        return _json({"action": "exempt", **target})

    async def audit_list(self, request: web.Request) -> web.Response:
        values = _params(request, {"limit", "before"})
        limit = _integer(values, "limit", 100, 1, MAX_PAGE)
        before = _integer(values, "before", 2**62, 1, 2**62)
        rows = await self.api.hold_store.admin_actions(limit, before)
        return _json(
            {
                "entries": [
                    {
                        "seq": r.seq,
                        "at": r.at.isoformat(),
                        "actor": r.actor,
                        "role": r.role,
                        "action": r.action,
                        "target": r.target,
                        "count": r.count,
                    }
                    for r in rows
                ],
                "next": rows[-1].seq if len(rows) == limit else None,
            }
        )

    async def decisions(self, request: web.Request) -> web.Response:
        _params(request, set())
        return _json(self.api.timeline.series().as_dict())

    # --- policy history (gateway/policy/history.py) ----------------------------------------

    async def history(self, request: web.Request) -> web.Response:
        values = _params(request, {"limit", "before"})
        limit = _integer(values, "limit", 50, 1, MAX_PAGE)
        before = _integer(values, "before", 2**62, 1, 2**62)
        rows = await self.api.hold_store.policy_versions(limit, before)
        live = self.api.policies.current.version
        return _json(
            {
                "in_force": live,
                "keep": KEEP_VERSIONS,
                "versions": [{**v.summary(), "in_force": v.version == live} for v in rows],
                "next": rows[-1].seq if len(rows) == limit else None,
            }
        )

    async def _stored(self, version: str) -> PolicyVersion:
        found = await self.api.hold_store.policy_version(version)
        if found is None or found.snapshot is None:
            raise ApiError(
                404,
                "no such policy version in the history (GET /api/v1/policies/history lists them)",
            )
        return found

    async def history_show(self, request: web.Request) -> web.Response:
        _params(request, set())
        version = request.match_info["version"]
        if not _VERSION.fullmatch(version):
            raise ApiError(404, "no such policy version (versions are 12 hex digits)")
        found = await self._stored(version)
        snap = found.snapshot
        assert snap is not None  # _stored checked it
        policies = None
        if snap.policies is not None:
            policies = [{"id": pid, "state": state} for pid, (_, state) in sorted(snap.policies.items())]  # fmt: skip
        return _json(
            {
                **found.summary(),
                "in_force": version == self.api.policies.current.version,
                "files": [f.as_dict() for f in snap.files],
                "policies": policies,
            }
        )

    async def history_diff(self, request: web.Request) -> web.Response:
        values = _params(request, {"from", "to"})
        old, new = _version_param(values, "from"), _version_param(values, "to")
        before, after = await self._stored(old), await self._stored(new)
        assert before.snapshot is not None
        assert after.snapshot is not None
        diff = await asyncio.to_thread(compare, before.snapshot, after.snapshot)
        return _json({"from": before.summary(), "to": after.summary(), **diff.as_dict()})


def _version_param(values: Mapping[str, str], key: str) -> str:
    value = values.get(key)
    if value is None:
        raise ApiError(400, f"bad parameter: {key} is required (GET /api/v1/policies/history lists the versions)")  # fmt: skip
    if not _VERSION.fullmatch(value):
        raise ApiError(400, f"bad parameter: {key} must be a policy version (12 hex digits)")
    return value


def _headers(block: bytes) -> tuple[list[list[str]], bool]:
    """A held message's header fields as [name, value] pairs, bounded; values unfolded."""
    message = BytesHeaderParser(policy=compat32).parsebytes(block)
    fields: list[list[str]] = []
    truncated = False
    for name, value in message.items():
        if len(fields) == MAX_HEADERS:
            truncated = True
            break
        text = " ".join(str(value).split())
        if len(text) > MAX_HEADER_VALUE:
            text, truncated = text[:MAX_HEADER_VALUE], True
        fields.append([printable(name, 200) or "", printable(text, MAX_HEADER_VALUE) or ""])
    return fields, truncated


def _device_row(
    live: CompiledPolicySet,
    claims: DeviceClaims,
    now: datetime,
    accesses: frozenset[Access],
    overrides: Overrides,
) -> dict[str, object]:
    return {
        **claims.summary(),
        "seen_for": sorted(a.value for a in accesses),
        "decisions": {
            access.value: decide(live, claims, now, access, overrides=overrides).as_dict()
            for access in Access
        },
    }


def _policy_row(policy: Any, now: datetime) -> dict[str, object]:
    phase = policy.phase_at(now) if policy.is_active else None
    return {
        "id": policy.id,
        "title": policy.title,
        "state": policy.state.value,
        "action": policy.action.label,
        "access": sorted(a.value for a in policy.access),
        "phase_now": phase.value if phase else None,
        "announce_at": policy.announce_at.isoformat() if policy.announce_at else None,
        "enforce_at": policy.enforce_at.isoformat() if policy.enforce_at else None,
        "retracted_reason": policy.retracted_reason,
        "message": policy.message,
        "source": str(policy.source) if policy.source else None,
    }


def _reload(result: ReloadResult | None) -> dict[str, object] | None:
    if result is None:
        return None
    return {
        "ok": result.ok,
        "version": result.version,
        "trigger": result.trigger,
        "problems": [_problem(p) for p in result.problems],
    }


def _problem(problem: Problem) -> dict[str, object]:
    return {
        "file": problem.file,
        "line": problem.line,
        "key": problem.key,
        "message": problem.message,
    }


def _picklable(policy_set: PolicySet) -> PolicySet:
    """The set without what compiling cached on its conditions (the check functions,
    closures that cannot be pickled): fresh Conditions, the same values."""
    policies = tuple(
        dataclasses.replace(
            p, match=dataclasses.replace(p.match), scope=dataclasses.replace(p.scope)
        )
        for p in policy_set.policies
    )
    return PolicySet(policies, policy_set.version, dict(policy_set.groups))


IMPACT_NICENESS = 19  # the lowest CPU priority: a preview waits while SMTP has work
IMPACT_TIMEOUT = 300.0  # seconds an admin's preview request waits for the worker


def impact_pool() -> ProcessPoolExecutor:
    """The impact preview's worker: spawned (no fork of a process with threads), one task
    per child (the memory of a large inventory is returned when the preview ends), at the
    lowest CPU priority, so that on a busy machine the preview, not SMTP, waits."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        max_tasks_per_child=1,
        initializer=_lowest_priority,
    )


def _lowest_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, 0, IMPACT_NICENESS)
    if hasattr(os, "SCHED_IDLE"):  # Linux: run only on a core nothing else wants
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def preview_from_store(
    live: PolicySet,
    text: str,
    mode: str,
    database: Path,
    store_settings: StoreSettings,
    since: datetime,
    now: datetime,
    limit: int | None,
    notices: bool = True,
) -> dict[str, object] | tuple[Problem, ...]:
    """:func:`preview` in a worker process, over the inventory the hold store keeps (read
    as `gateway impact` reads it: SQLite through a second connection, no lock taken, or
    the shared PostgreSQL store), with the operator overrides in force and the notices
    already sent."""
    compiled = compile_policy_set(live)
    candidate = candidate_of(compiled, text, mode)
    if isinstance(candidate, tuple):
        return candidate
    store = open_store_at(database, store_settings)
    try:
        both = live.policies + candidate.source.policies
        inputs = read_preview_inputs(store, since, now, both, notices)
    finally:
        store.close()
    return preview(compiled, candidate, mode, inputs, now, limit)


def candidate_of(
    live: CompiledPolicySet, text: str, mode: str
) -> CompiledPolicySet | tuple[Problem, ...]:
    """The candidate set of an uploaded file, or its problems by line.

    ``merge``: the live set with the file's policies in place of the live ones of the same
    id (upload a retraction of one ban); ``replace``: the file alone is the candidate set.
    """
    groups = live.source.groups
    with tempfile.TemporaryDirectory(prefix="gateway-impact-") as directory:
        path = Path(directory) / "candidate.toml"
        path.write_text(text, encoding="utf-8")
        try:
            uploaded = load_policy_dir(Path(directory), groups)
        except PolicyLoadError as exc:
            return tuple(
                Problem("candidate.toml", p.line, p.key, p.message.replace(directory, "."))
                for p in exc.problems
            )
    ids = {p.id for p in uploaded.policies}
    kept = () if mode == "replace" else tuple(p for p in live.source.policies if p.id not in ids)
    candidate_set = PolicySet(kept + uploaded.policies, f"candidate-{uploaded.version}", groups)
    return compile_policy_set(candidate_set)


def preview(
    live: CompiledPolicySet,
    candidate: CompiledPolicySet,
    mode: str,
    inputs: PreviewInputs,
    now: datetime,
    limit: int | None,
) -> dict[str, object]:
    """The impact of a candidate set over the inventory (CPU: run in a worker process),
    as the API's answer: whom it newly warns, holds or rejects, whom it releases, and
    whom it would tell, each list bounded."""
    change = preview_change(live, candidate, inputs, now, limit)
    diff, overrides, refusal = change.diff, inputs.overrides, change.refusal
    rows = change.report.as_dict()
    lists = ("newly_warned", "newly_deferred", "newly_held", "newly_rejected", "released")
    counts = {key: len(rows[key]) for key in lists}  # type: ignore[arg-type]
    for key in lists:  # the first rows only: a page or a client needs no 25,000-row answer
        rows[key] = rows[key][:LISTED_ROWS]  # type: ignore[index]
    return {
        "at": now.isoformat(),
        "mode": mode,
        "live_version": live.version,
        "candidate_version": candidate.version,
        "diff": {
            "added": list(diff.added),
            "changed": list(diff.changed),
            "retracted": list(diff.retracted),
            "removed": list(diff.removed),
        },
        **rows,
        "counts": counts,
        "rows_limit": LISTED_ROWS,
        "notices": {"enabled": inputs.notices, **change.told.as_dict(LISTED_ROWS)},
        "overrides": {
            "suspended": sorted(overrides.suspended),
            "exempt": [{"policy_id": p, "subject": s} for p, s in sorted(overrides.exempt)],
        },
        "guard": {"limit": limit, "refused": refusal is not None, "reason": refusal},
    }


def admin_apps(api: AdminApi) -> tuple[web.Application, web.Application]:
    """The /api/v1 application and the /admin pages over the same handlers (mounted on
    the admin listener by the server)."""
    from gateway.admin.pages import admin_pages

    if not api.csrf_key:
        api = AdminApi(**{**api.__dict__, "csrf_key": secrets.token_bytes(32)})
    handlers = Handlers(api)
    return admin_api(api, handlers), admin_pages(api, handlers)


def admin_api(api: AdminApi, handlers: Handlers) -> web.Application:
    """The /api/v1 application."""
    needs = {("POST", "/api/v1/impact"): Role.VIEWER}
    app = web.Application(middlewares=[_guard(api, needs)])
    app.on_cleanup.append(handlers.close)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.router.add_get("/session", handlers.session)
    app.router.add_get("/status", handlers.status)
    app.router.add_get("/held", handlers.held_list)
    app.router.add_post("/held/{action:release|drop}", handlers.bulk)
    app.router.add_get("/held/{hold_id}", handlers.held_show)
    app.router.add_post("/held/{hold_id}/release", handlers.held_release)
    app.router.add_post("/held/{hold_id}/drop", handlers.held_drop)
    app.router.add_get("/devices", handlers.devices)
    app.router.add_get("/policies", handlers.policies)
    app.router.add_get("/policies/history", handlers.history)
    app.router.add_get("/policies/history/diff", handlers.history_diff)  # before {version}
    app.router.add_get("/policies/history/{version}", handlers.history_show)
    app.router.add_get("/decisions", handlers.decisions)
    app.router.add_post("/impact", handlers.impact)
    app.router.add_get("/audit", handlers.audit_list)
    app.router.add_get("/overrides", handlers.overrides)
    app.router.add_post("/policies/{policy_id}/suspend", handlers.suspend)
    app.router.add_post("/policies/{policy_id}/resume", handlers.resume)
    app.router.add_post("/policies/{policy_id}/exemptions", handlers.exempt)
    return app
