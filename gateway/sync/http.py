"""The sync decision endpoint over HTTP, as Dovecot 2.3 and nginx 1.22 speak it.

POST /oauth2/introspect   Dovecot's oauth2 passdb (``introspection_mode = post``): an
                          RFC 7662 introspection request, answered with a flat JSON object
                          (Dovecot skips nested values). 2xx/4xx are answers; any other
                          status is a temporary failure (``NO [UNAVAILABLE]``).
POST /oauth2/refusal      the first passdb of a two-passdb chain: "must this device be
                          refused?" ``active`` only when it must, with ``nologin`` and the
                          policy's message as ``reason`` (``NO [CONTACTADMIN] <reason>``).
GET  /nginx/auth          nginx's mail ``auth_http`` for IMAP: the answer is in the
                          ``Auth-*`` response headers; nginx reads at most 1024 bytes of it.

docs/sync.md has the mapping from decisions to what clients see, and the configuration
of both mail servers.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import urllib.parse
from collections.abc import Mapping

import structlog
from aiohttp import web

from gateway.config.settings import SyncSettings
from gateway.logins import LoginFacts, LoginResult, Logins, Outcome
from gateway.ops.http import Handler, HttpListener
from gateway.ops.logs import printable

log = structlog.get_logger("gateway.sync")

NGINX_SECRET_HEADER = "X-Gateway-Secret"  # noqa: S105  # a header name, not a secret
#: nginx's buffer for the whole auth_http response (ngx_mail_auth_http_module).
NGINX_RESPONSE_LIMIT = 1024
#: The longest Auth-Status text we send: with the other headers it stays well under 1024.
NGINX_STATUS_CHARS = 400
# Forms carry a token (16 KiB at most, [tokens] max_token_bytes) and two short credentials.
MAX_BODY_BYTES = 64 * 1024

KEY_LOGINS = web.AppKey("logins", Logins)
KEY_SETTINGS = web.AppKey("settings", SyncSettings)


def _secret_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """RFC 7617 Basic credentials; id and secret are form-encoded first (RFC 6749 s 2.3.1)."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)


def _dovecot_client_ok(
    settings: SyncSettings, form: Mapping[str, str], authorization: str | None
) -> bool:
    """Dovecot authenticates with client_id/client_secret in the form (2.3.19) or in Basic
    auth (2.3.21, 2.4). Without configured credentials, only a loopback listener serves."""
    if settings.client_secret is None or settings.client_id is None:
        return settings.on_loopback
    candidates = [(form.get("client_id"), form.get("client_secret"))]
    basic = _basic_credentials(authorization)
    if basic is not None:
        candidates.append(basic)
    return any(
        client_id == settings.client_id and _secret_matches(secret, settings.client_secret)
        for client_id, secret in candidates
    )


def _dovecot_facts(request: web.Request) -> LoginFacts:
    """``send_auth_headers = yes``: the service (2.3) or protocol (2.4) and the client."""
    headers = request.headers
    return LoginFacts(
        via="dovecot",
        protocol=headers.get("X-Dovecot-Auth-Service") or headers.get("X-Dovecot-Auth-Protocol"),
        client=headers.get("X-Dovecot-Auth-Remote") or headers.get("X-Dovecot-Auth-Remote-Ip"),
    )


def _json(body: Mapping[str, object], status: int = 200) -> web.Response:
    headers = {"Cache-Control": "no-store"}  # RFC 7662 s 2.2 answers are never cached
    return web.json_response(dict(body), status=status, headers=headers)


_UNAUTHORIZED = {"error": "invalid_client"}


def _unauthorized() -> web.Response:
    """RFC 7662 s 2.1: a client that failed to authenticate gets 401."""
    response = _json(_UNAUTHORIZED, status=401)
    response.headers["WWW-Authenticate"] = 'Basic realm="compliance-gateway"'
    return response


def _decided_fields(result: LoginResult) -> dict[str, object]:
    """What operators read in Dovecot's debug log: plain strings only (a flat object)."""
    decision = result.decision
    assert decision is not None
    return {
        "decision": decision.action.label,
        "policy_ids": ",".join(decision.policy_ids),
        "reason": result.message,
    }


async def _dovecot_request(request: web.Request) -> tuple[str, LoginFacts] | web.Response:
    """The token and facts of an authenticated Dovecot request, or the response refusing it."""
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not _dovecot_client_ok(
        request.app[KEY_SETTINGS], fields, request.headers.get("Authorization")
    ):
        log.warning("sync_client_refused", endpoint=request.path, peer=request.remote)
        return _unauthorized()
    token = fields.get("token")
    if not token:
        return _json({"error": "invalid_request"}, status=400)
    return token, _dovecot_facts(request)


async def introspect(request: web.Request) -> web.Response:
    """RFC 7662 introspection for Dovecot's oauth2 passdb (``pass_attrs = user=%{oauth2:
    mailbox_user}`` renames a quarantined login)."""
    parsed = await _dovecot_request(request)
    if isinstance(parsed, web.Response):
        return parsed
    token, facts = parsed
    logins = request.app[KEY_LOGINS]
    result = await logins.evaluate(token, facts)
    logins.record(facts, result, "introspect")
    if result.outcome is Outcome.INVALID:
        return _json({"active": False})  # RFC 7662 s 2.2: nothing more about such a token
    body: dict[str, object] = {
        "active": result.outcome in (Outcome.ALLOW, Outcome.QUARANTINE),
        "email": result.user,
        "mailbox_user": result.mailbox_user,
        **_decided_fields(result),
    }
    if result.outcome is Outcome.DEFER:
        # Not 2xx or 4xx: Dovecot fails the login temporarily (NO [UNAVAILABLE]).
        return _json(body, status=503)
    await logins.notices(result)  # in the mailbox before the mail app first looks
    return _json(body)


async def refusal(request: web.Request) -> web.Response:
    """The first passdb of Dovecot's chain: active (and nologin, reason) only when the
    device must be refused; otherwise inactive, and the next passdb decides. Logged only
    when it refuses, so that a login makes one decision event."""
    parsed = await _dovecot_request(request)
    if isinstance(parsed, web.Response):
        return parsed
    token, facts = parsed
    logins = request.app[KEY_LOGINS]
    result = await logins.evaluate(token, facts)
    if result.outcome is not Outcome.REFUSE:
        return _json({"active": False})
    logins.record(facts, result, "refusal")
    return _json(
        {
            "active": True,
            "email": result.user,
            "nologin": "y",
            **_decided_fields(result),
        }
    )


def _status_text(text: str, limit: int = NGINX_STATUS_CHARS) -> str:
    """Text for an Auth-Status header: one line of printable ASCII, bounded."""
    ascii_text = "".join(ch if " " <= ch <= "~" else "?" for ch in " ".join(text.split()))
    return ascii_text if len(ascii_text) <= limit else ascii_text[: limit - 3] + "..."


def _nginx_refusal(protocol: str | None, code: str, text: str) -> str:
    """IMAP clients see ``NO <text>``: give them the RFC 5530 response code as Dovecot
    would; POP3 clients see ``-ERR <text>``."""
    prefix = f"[{code}] " if (protocol or "").lower() == "imap" else ""
    return _status_text(prefix + text)


def _nginx_headers(
    settings: SyncSettings, result: LoginResult, protocol: str | None
) -> dict[str, str]:
    outcome = result.outcome
    if outcome in (Outcome.ALLOW, Outcome.QUARANTINE):
        backend = settings.imap_backend
        assert backend is not None
        assert settings.backend_password is not None
        user = result.mailbox_user or ""
        if settings.backend_master_user:
            user = f"{user}*{settings.backend_master_user}"
        return {
            "Auth-Status": "OK",
            "Auth-Server": backend.host,
            "Auth-Port": str(backend.port),
            # The backend login: never the token (nginx's 1024-byte buffer, and the
            # token is the device's, not the backend's).
            "Auth-User": urllib.parse.quote(user, safe="@+*"),
            "Auth-Pass": settings.backend_password,
        }
    wait = str(settings.auth_wait)
    if outcome is Outcome.DEFER:
        return {
            "Auth-Status": _nginx_refusal(protocol, "UNAVAILABLE", result.message),
            "Auth-Wait": wait,
        }
    if outcome is Outcome.REFUSE:
        return {"Auth-Status": _nginx_refusal(protocol, "CONTACTADMIN", result.message)}
    return {
        "Auth-Status": _nginx_refusal(
            protocol, "AUTHENTICATIONFAILED", "Invalid login or password"
        ),
        "Auth-Wait": wait,
    }


TEMPORARY = "Temporary server problem, try again later"


async def nginx_auth(request: web.Request) -> web.Response:
    """nginx's mail auth_http (HTTP/1.0 GET; Auth-User and Auth-Pass URL-escaped). The
    status line is ignored by nginx: everything is in the Auth-* headers."""
    settings = request.app[KEY_SETTINGS]
    if settings.imap_backend is None:
        raise web.HTTPNotFound()
    headers = request.headers
    secret = headers.get(NGINX_SECRET_HEADER)
    authenticated = (
        _secret_matches(secret, settings.nginx_secret)
        if settings.nginx_secret is not None
        else settings.on_loopback
    )
    if not authenticated:
        log.warning("sync_client_refused", endpoint=request.path, peer=request.remote)
        return web.Response(
            status=401,
            headers={"Auth-Status": TEMPORARY, "Auth-Wait": str(settings.auth_wait)},
        )
    protocol = headers.get("Auth-Protocol")
    facts = LoginFacts(
        via="nginx",
        protocol=protocol,
        client=headers.get("Client-IP"),
        user=urllib.parse.unquote(headers.get("Auth-User", "")),
    )
    logins = request.app[KEY_LOGINS]
    method = headers.get("Auth-Method", "plain").lower()
    if method not in ("plain", "login"):
        # apop, cram-md5: the password is hashed with a challenge; no token arrives.
        log.info(
            "login_refused",
            access="sync",
            via="nginx",
            protocol=printable(protocol, 32),
            login_user=printable(facts.user),
            reason="auth_method",
            method=printable(method, 32),
        )
        return web.Response(
            headers={
                "Auth-Status": _nginx_refusal(
                    protocol, "AUTHENTICATIONFAILED", "Use a password login (PLAIN or LOGIN)"
                )
            }
        )
    result = await logins.evaluate(urllib.parse.unquote(headers.get("Auth-Pass", "")), facts)
    logins.record(facts, result, "nginx")
    await logins.notices(result)
    return web.Response(headers=_nginx_headers(settings, result, protocol))


@web.middleware
async def temporary_on_error(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Store or internal trouble is a temporary failure for the mail server, never a
    login: 503 for Dovecot (NO [UNAVAILABLE]), Auth-Wait for nginx. No internal text
    reaches the client."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.error(
            "sync_request_failed", endpoint=request.path, error=type(exc).__name__, exc_info=exc
        )
        if request.path.startswith("/nginx/"):
            wait = str(request.app[KEY_SETTINGS].auth_wait)
            return web.Response(status=503, headers={"Auth-Status": TEMPORARY, "Auth-Wait": wait})
        return _json({"error": "temporarily_unavailable"}, status=503)


async def _plain_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No software versions on the wire, and fewer bytes for nginx's 1024."""
    response.headers["Server"] = "compliance-gateway"


def sync_app(logins: Logins, settings: SyncSettings) -> web.Application:
    app = web.Application(middlewares=[temporary_on_error], client_max_size=MAX_BODY_BYTES)
    app[KEY_LOGINS] = logins
    app[KEY_SETTINGS] = settings
    app.router.add_post("/oauth2/introspect", introspect)
    app.router.add_post("/oauth2/refusal", refusal)
    app.router.add_get("/nginx/auth", nginx_auth)
    app.on_response_prepare.append(_plain_server_header)
    return app


class SyncServer:
    """The sync listener, started and stopped by the server's lifecycle."""

    def __init__(self, logins: Logins, settings: SyncSettings) -> None:
        self._listener = HttpListener(sync_app(logins, settings))

    async def start(self, host: str, port: int) -> int:
        return await self._listener.start(host, port)

    async def stop(self) -> None:
        await self._listener.stop()
