"""The endpoint Dovecot's oauth2 passdb asks, over real HTTP against `gateway serve`:
RFC 7662 introspection (flat JSON), the refusal check of the two-passdb chain, client
authentication, and a login as a decision event with access "sync"."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import structlog

from gateway.ops import logs
from gateway.testing.harness import RunningGateway, gateway_with_upstream
from gateway.testing.issuer import TestIssuer

CLIENT_ID = "dovecot"
CLIENT_SECRET = "dovecot-secret-1"
NGINX_SECRET = "nginx-secret-1"
BACKEND_PASSWORD = "backend-pw-1"
USER = "alice@example.test"


def policy(policy_id: str, app: str, action: str, message: str) -> str:
    return (
        f'[[policy]]\nid = "{policy_id}"\nmatch.apps_any = ["{app}"]\n'
        f'action = "{action}"\nmessage = "{message}"\n'
    )


POLICIES = {
    "warn.toml": policy("warn-app", "com.warn", "warn", "Please remove WarnApp."),
    "hold.toml": policy("hold-app", "com.hold", "hold", "Remove HoldApp to read your mail."),
    "reject.toml": policy("reject-app", "com.reject", "reject", "RejectApp is banned."),
    "defer.toml": policy("defer-app", "com.defer", "defer", "Try again later."),
}


def write_secrets(directory: Path) -> dict[str, object]:
    """The [sync] keys with the secrets in files, as an admin mounts them."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in (
        ("client_secret", CLIENT_SECRET),
        ("nginx_secret", NGINX_SECRET),
        ("backend_password", BACKEND_PASSWORD),
    ):
        (directory / name).write_text(value + "\n")
    return {
        "client_id": CLIENT_ID,
        "client_secret_file": "client_secret",
        "nginx_secret_file": "nginx_secret",
        "imap_backend": "127.0.0.1:1143",
        "backend_password_file": "backend_password",
    }


@asynccontextmanager
async def sync_gateway(
    directory: Path, issuer: TestIssuer, sync: Mapping[str, object] | None = None
) -> AsyncIterator[tuple[RunningGateway, aiohttp.ClientSession]]:
    keys = {  # None: leave the key out
        key: value
        for key, value in (write_secrets(directory) | dict(sync or {})).items()
        if value is not None
    }
    async with (
        gateway_with_upstream(directory, issuer, POLICIES, sync=keys) as (gateway, _),
        aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{gateway.sync_port}",
            timeout=aiohttp.ClientTimeout(total=10),
        ) as client,
    ):
        yield gateway, client


async def introspect(
    client: aiohttp.ClientSession,
    token: str,
    *,
    path: str = "/oauth2/introspect",
    secret: str = CLIENT_SECRET,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, object]]:
    """As Dovecot 2.3.19 asks with introspection_mode = post: credentials in the form."""
    form = {"token": token, "client_id": CLIENT_ID, "client_secret": secret}
    all_headers = {"X-Dovecot-Auth-Service": "imap", "X-Dovecot-Auth-Remote": "192.0.2.7"}
    all_headers.update(headers or {})
    async with client.post(path, data=form, headers=all_headers) as response:
        return response.status, await response.json()


async def raw_introspect(port: int, token: str, headers: Mapping[str, str]) -> int:
    """An introspection request written byte by byte; returns the status."""
    body = urllib.parse.urlencode(
        {"token": token, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    ).encode()
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (
        "POST /oauth2/introspect HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n{head}\r\n"
    ).encode("latin-1") + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    return int(response.split()[1])


def assert_flat(body: Mapping[str, object]) -> None:
    """Dovecot skips nested values: every value is a string (or active, a boolean)."""
    for key, value in body.items():
        assert isinstance(value, bool if key == "active" else str), (key, value)


async def test_a_valid_token_logs_in_to_the_users_own_mailbox(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (_, client):
        status, body = await introspect(client, issuer.token(subject=USER))
        assert status == 200
        assert body == {
            "active": True,
            "email": USER,
            "mailbox_user": USER,
            "decision": "allow",
            "policy_ids": "",
            "reason": "",
        }
        assert_flat(body)
        # warn logs in too, and says why
        status, body = await introspect(client, issuer.token(apps=["com.warn"]))
        assert (status, body["active"], body["decision"]) == (200, True, "warn")
        assert (body["policy_ids"], body["reason"]) == ("warn-app", "Please remove WarnApp.")
        assert_flat(body)
        # Dovecot 2.3.21 and 2.4: only the token in the form, the client in Basic auth
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        async with client.post(
            "/oauth2/introspect",
            data={"token": issuer.token()},
            headers={"Authorization": f"Basic {basic}"},
        ) as response:
            assert response.status == 200
            assert (await response.json())["active"] is True


async def test_forged_expired_and_garbage_tokens_are_inactive(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    forger = TestIssuer.generate("k1")  # same issuer name and kid, another key
    expired = issuer.token(issued_at=datetime.now(UTC) - timedelta(hours=2))
    async with sync_gateway(tmp_path, issuer) as (_, client):
        for token in (forger.token(), expired, "not-a-token", issuer.token()[:-6] + "AAAAAA"):
            status, body = await introspect(client, token)
            # RFC 7662 s 2.2: nothing more about an inactive token
            assert (status, body) == (200, {"active": False}), token[:20]
            status, body = await introspect(client, token, path="/oauth2/refusal")
            assert (status, body) == (200, {"active": False})


async def test_reject_is_refused_with_the_policy_message(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (_, client):
        banned = issuer.token(apps=["com.reject"])
        status, body = await introspect(client, banned, path="/oauth2/refusal")
        assert status == 200
        assert body == {
            "active": True,
            "email": USER,
            "nologin": "y",
            "decision": "reject",
            "policy_ids": "reject-app",
            "reason": "RejectApp is banned.",
        }
        assert_flat(body)
        # Without the chain, introspection alone never logs the device in either.
        status, body = await introspect(client, banned)
        assert (status, body["active"], body["decision"]) == (200, False, "reject")
        # A compliant device is not refused: the chain goes on to introspection.
        for token in (issuer.token(), issuer.token(apps=["com.warn"])):
            assert await introspect(client, token, path="/oauth2/refusal") == (
                200,
                {"active": False},
            )


async def test_hold_logs_in_to_the_quarantine_mailbox(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (_, client):
        held = issuer.token(apps=["com.hold"])
        status, body = await introspect(client, held)
        assert status == 200
        assert body == {
            "active": True,
            "email": USER,
            "mailbox_user": "quarantine+alice@example.test",
            "decision": "hold",
            "policy_ids": "hold-app",
            "reason": "Remove HoldApp to read your mail.",
        }
        # The laptop of the same user still sees the real inbox.
        laptop = issuer.token(device_id="laptop-1", device_class="desktop", platform="macos")
        assert (await introspect(client, laptop))[1]["mailbox_user"] == USER
        # Quarantine is a login: the refusal check lets it through.
        assert await introspect(client, held, path="/oauth2/refusal") == (200, {"active": False})


async def test_hold_refuses_when_configured_so(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer, {"hold": "refuse"}) as (_, client):
        held = issuer.token(apps=["com.hold"])
        status, body = await introspect(client, held, path="/oauth2/refusal")
        assert (status, body["active"], body["nologin"]) == (200, True, "y")
        assert body["reason"] == "Remove HoldApp to read your mail."
        status, body = await introspect(client, held)
        assert (status, body["active"], body["decision"]) == (200, False, "hold")


async def test_defer_is_a_temporary_failure(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (_, client):
        status, body = await introspect(client, issuer.token(apps=["com.defer"]))
        # Neither 2xx nor 4xx: Dovecot answers NO [UNAVAILABLE].
        assert status == 503
        assert (body["decision"], body["reason"]) == ("defer", "Try again later.")
        # ... and the refusal check does not refuse it (the chain reaches the 503).
        status, body = await introspect(
            client, issuer.token(apps=["com.defer"]), path="/oauth2/refusal"
        )
        assert (status, body) == (200, {"active": False})


async def test_a_client_without_the_right_secret_gets_401(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        async with sync_gateway(tmp_path, issuer) as (_, client):
            token = issuer.token()
            for path in ("/oauth2/introspect", "/oauth2/refusal"):
                status, body = await introspect(client, token, path=path, secret="wrong")
                assert (status, body) == (401, {"error": "invalid_client"})
                async with client.post(path, data={"token": token}) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"].startswith("Basic ")
                wrong = base64.b64encode(f"{CLIENT_ID}:wrong".encode()).decode()
                async with client.post(
                    path, data={"token": token}, headers={"Authorization": f"Basic {wrong}"}
                ) as response:
                    assert response.status == 401
    finally:
        structlog.reset_defaults()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert not [e for e in events if e["event"] == "decision"]  # no token was looked at
    assert CLIENT_SECRET not in stream.getvalue()
    assert "wrong" not in stream.getvalue()


async def test_a_login_is_a_decision_event_with_access_sync_and_counted(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        async with sync_gateway(tmp_path, issuer) as (gateway, client):
            token = issuer.token(apps=["com.hold"])
            await introspect(client, token, headers={"X-Dovecot-Auth-Service": "imap"})
            await introspect(client, issuer.token(), headers={"X-Dovecot-Auth-Service": "pop3"})
            # A refusal check that does not refuse makes no event: one login, one event.
            await introspect(client, issuer.token(), path="/oauth2/refusal")
            await introspect(client, "forged")
            # Client-controlled headers with control characters, sent raw (aiohttp's own
            # client refuses to): a tab passes HTTP parsing and reaches the decision event;
            # an ANSI escape is refused by the parser (400), which logs it structured.
            assert gateway.sync_port is not None
            status = await raw_introspect(
                gateway.sync_port, issuer.token(), {"X-Dovecot-Auth-Service": "imap\tfake"}
            )
            assert status == 200
            status = await raw_introspect(
                gateway.sync_port, issuer.token(), {"X-Dovecot-Auth-Service": "imap\x1b[2J"}
            )
            assert status == 400
            async with client.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as response:
                metrics = await response.text()
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert token not in text
    events = [json.loads(line) for line in text.splitlines()]
    decisions = [e for e in events if e["event"] == "decision"]
    assert [(e["access"], e["protocol"], e["action"], e["result"]) for e in decisions] == [
        ("sync", "imap", "hold", "quarantine"),
        ("sync", "pop3", "allow", "allow"),
        ("sync", "imap\\tfake", "allow", "allow"),
    ]
    assert decisions[0]["policy_ids"] == ["hold-app"]
    assert decisions[0]["mailbox_user"] == "quarantine+alice@example.test"
    assert decisions[0]["client"] == "192.0.2.7"
    (broken,) = [e for e in events if e["event"] == "http_error"]
    assert "\\x1b" in broken["detail"]
    assert all(ch.isprintable() for e in events for value in e.values() for ch in str(value))
    refused = [e for e in events if e["event"] == "login_refused"]
    assert [(e["access"], e["reason"]) for e in refused] == [("sync", "malformed")]
    line = 'gateway_sync_decisions_total{access="sync",action="%s",protocol="%s"} 1.0'
    assert line % ("hold", "imap") in metrics
    assert line % ("allow", "pop3") in metrics
    assert line % ("allow", "other") in metrics  # the odd protocol: a bounded label set
    assert line % ("invalid_token", "imap") in metrics
