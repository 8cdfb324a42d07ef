"""The endpoint nginx's mail auth_http asks, over real HTTP against `gateway serve`, with
requests written as nginx 1.22 writes them (HTTP/1.0 GET, Auth-User and Auth-Pass
URL-escaped); the answer is in the Auth-* headers and must fit nginx's 1024-byte buffer."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.parse
from pathlib import Path

import structlog

from gateway.ops import logs
from gateway.testing.issuer import TestIssuer
from tests.sync.test_dovecot import (
    BACKEND_PASSWORD,
    NGINX_SECRET,
    USER,
    introspect,
    policy,
    sync_gateway,
)


async def nginx_auth(
    port: int,
    token: str,
    *,
    user: str = USER,
    protocol: str = "imap",
    secret: str | None = NGINX_SECRET,
    method: str = "plain",
) -> tuple[int, dict[str, str], bytes]:
    """One auth_http request as ngx_mail_auth_http_module builds it; returns the status,
    the headers and the raw response (nginx reads the whole answer in 1024 bytes)."""
    lines = [
        "GET /nginx/auth HTTP/1.0",
        "Host: 127.0.0.1",
        f"Auth-Method: {method}",
        f"Auth-User: {urllib.parse.quote(user, safe='@')}",
        f"Auth-Pass: {urllib.parse.quote(token, safe='')}",
        f"Auth-Protocol: {protocol}",
        "Auth-Login-Attempt: 1",
        "Client-IP: 192.0.2.9",
    ]
    if secret is not None:
        lines.append(f"X-Gateway-Secret: {secret}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=10)  # HTTP/1.0: closed after
    finally:
        writer.close()
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    status_line, *header_lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, raw


async def test_an_allowed_login_is_proxied_with_the_backend_credential(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (gateway, _):
        assert gateway.sync_port is not None
        token = issuer.token()
        status, headers, raw = await nginx_auth(gateway.sync_port, token)
        assert status == 200
        assert headers["Auth-Status"] == "OK"
        assert (headers["Auth-Server"], headers["Auth-Port"]) == ("127.0.0.1", "1143")
        assert headers["Auth-User"] == USER
        assert headers["Auth-Pass"] == BACKEND_PASSWORD  # never the token
        assert token.encode() not in raw
        assert len(raw) < 1024
        assert "Auth-Wait" not in headers
        # held: the quarantine mailbox, through the same backend
        status, headers, raw = await nginx_auth(gateway.sync_port, issuer.token(apps=["com.hold"]))
        assert headers["Auth-Status"] == "OK"
        assert headers["Auth-User"] == "quarantine+alice@example.test"
        assert len(raw) < 1024


async def test_a_master_user_logs_in_for_the_mailbox(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer, {"backend_master_user": "gateway"}) as (gw, _):
        assert gw.sync_port is not None
        _, headers, _ = await nginx_auth(gw.sync_port, issuer.token(apps=["com.hold"]))
        assert headers["Auth-User"] == "quarantine+alice@example.test*gateway"
        assert headers["Auth-Pass"] == BACKEND_PASSWORD


async def test_refusals_carry_the_message_and_fit_in_1024_bytes(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    # The longest message a policy may have (400 characters; control characters such as
    # U+2028 are refused at load): with "[CONTACTADMIN] " it is still cut for nginx.
    long_message = "Remove the app é now " + "x" * 379
    (tmp_path / "policies").mkdir(parents=True)
    (tmp_path / "policies" / "long.toml").write_text(
        policy("long-ban", "com.long", "reject", long_message)
    )
    async with sync_gateway(tmp_path, issuer) as (gateway, _):
        port = gateway.sync_port
        assert port is not None
        # reject: NO [CONTACTADMIN] <message>, and nginx closes (no Auth-Wait)
        _, headers, raw = await nginx_auth(port, issuer.token(apps=["com.reject"]))
        assert headers == headers | {"Auth-Status": "[CONTACTADMIN] RejectApp is banned."}
        assert "Auth-Wait" not in headers
        assert "Auth-Pass" not in headers
        assert len(raw) < 1024
        # the same for POP3, without the IMAP response code
        _, headers, _ = await nginx_auth(port, issuer.token(apps=["com.reject"]), protocol="pop3")
        assert headers["Auth-Status"] == "RejectApp is banned."
        # a message too long for nginx's buffer is cut, and stays one ASCII line
        _, headers, raw = await nginx_auth(port, issuer.token(apps=["com.long"]))
        assert headers["Auth-Status"].startswith("[CONTACTADMIN] Remove the app ? now xxx")
        assert headers["Auth-Status"].endswith("...")
        assert len(raw) < 1024
        assert raw.isascii()
        # defer: a temporary refusal, after Auth-Wait seconds
        _, headers, _ = await nginx_auth(port, issuer.token(apps=["com.defer"]))
        assert headers["Auth-Status"] == "[UNAVAILABLE] Try again later."
        assert headers["Auth-Wait"] == "3"
        # forged or expired token, or another user's token: a failed login
        for token, user in (
            (TestIssuer.generate("k1").token(), USER),
            ("not-a-token", USER),
            (issuer.token(), "bob@example.test"),
        ):
            _, headers, raw = await nginx_auth(port, token, user=user)
            assert headers["Auth-Status"] == "[AUTHENTICATIONFAILED] Invalid login or password"
            assert headers["Auth-Wait"] == "3"
            assert len(raw) < 1024
        # a challenge-response method carries no token
        _, headers, _ = await nginx_auth(port, issuer.token(), method="cram-md5")
        assert headers["Auth-Status"].startswith("[AUTHENTICATIONFAILED]")


async def test_nginx_without_the_shared_secret_gets_401(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (gateway, _):
        assert gateway.sync_port is not None
        for secret in (None, "wrong", NGINX_SECRET + "x"):
            status, headers, _ = await nginx_auth(gateway.sync_port, issuer.token(), secret=secret)
            assert status == 401
            assert headers["Auth-Status"] != "OK"
            assert "Auth-Pass" not in headers


async def test_internal_trouble_is_a_temporary_failure(tmp_path: Path) -> None:
    """A failure inside the gateway is never a login and never shows its text: 503 for
    Dovecot (NO [UNAVAILABLE]), a temporary Auth-Status with Auth-Wait for nginx."""
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer) as (gateway, client):
        services = gateway.server.services
        assert services.logins.verifier is services.submission.verifier  # one verifier, one cache

        def broken(*_: object) -> None:
            raise OSError("disk on fire at /var/lib/secret-path")

        services.logins.verifier.verify = broken  # type: ignore[method-assign]
        async with client.post(
            "/oauth2/introspect",
            data={
                "token": issuer.token(),
                "client_id": "dovecot",
                "client_secret": "dovecot-secret-1",
            },
        ) as response:
            assert response.status == 503
            text = await response.text()
        assert "fire" not in text
        assert json.loads(text) == {"error": "temporarily_unavailable"}
        assert gateway.sync_port is not None
        status, headers, raw = await nginx_auth(gateway.sync_port, issuer.token())
        assert status == 503
        assert headers["Auth-Status"] == "Temporary server problem, try again later"
        assert headers["Auth-Wait"] == "3"
        assert b"fire" not in raw


async def test_a_control_character_in_the_login_name_is_escaped_in_logs(tmp_path: Path) -> None:
    """nginx URL-escapes Auth-User; unescaped, a client's login name may hold anything."""
    issuer = TestIssuer.generate("k1")
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        async with sync_gateway(tmp_path, issuer) as (gateway, _):
            assert gateway.sync_port is not None
            await nginx_auth(
                gateway.sync_port, issuer.token(), user="alice\x1b[2J\r\n@example.test"
            )
    finally:
        structlog.reset_defaults()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    (refused,) = [e for e in events if e["event"] == "login_refused"]
    assert refused["reason"] == "user_mismatch"
    assert refused["login_user"] == "alice\\x1b[2J\\r\\n@example.test"
    assert refused["protocol"] == "imap"
    assert refused["via"] == "nginx"


async def test_the_endpoints_are_off_unless_configured(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    async with sync_gateway(tmp_path, issuer, {"imap_backend": None}) as (gateway, client):
        assert gateway.sync_port is not None
        status, _, _ = await nginx_auth(gateway.sync_port, issuer.token())
        assert status == 404
        assert (await introspect(client, issuer.token()))[0] == 200
