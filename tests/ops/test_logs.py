"""Decision events carry their reasons; tokens never reach a log line."""

from __future__ import annotations

import asyncio
import base64
import getpass
import io
import json
from pathlib import Path

import pytest
import structlog

from gateway import cli
from gateway.hold.store import HoldStore
from gateway.ops import logs
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from tests.stories import TIKTOK, tiktok_ban

BAN = '[[policy]]\nid = "ban"\nmatch.apps_any = ["com.bad"]\naction = "warn"\nmessage = "Remove it."\n'


async def test_decision_event_and_no_tokens_in_logs(tmp_path: Path) -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        issuer = TestIssuer.generate("k1")
        async with gateway_with_upstream(tmp_path, issuer, {"ban.toml": BAN}) as (gateway, _):
            phone = FakeDevice(issuer, apps={"com.bad"})
            token = phone.token()
            for mechanism in ("PLAIN", "XOAUTH2", "OAUTHBEARER"):
                await phone.send(gateway.port, mechanism=mechanism, token=token)
            await phone.send(gateway.port, token=token[:-4] + "AAAA")  # a refused token too
            version = gateway.server.services.policies.current.version
    finally:
        structlog.reset_defaults()
    text = stream.getvalue()
    assert token not in text
    assert token.split(".")[1] not in text  # not even the payload
    events = [json.loads(line) for line in text.splitlines()]
    decisions = [e for e in events if e["event"] == "decision"]
    assert len(decisions) == 3
    assert decisions[0] | {"session": "", "timestamp": "", "elapsed_ms": 0} == {
        "v": 1, "event": "decision", "level": "info", "session": "", "timestamp": "", "elapsed_ms": 0,
        "access": "send", "protocol": "smtp", "client": "127.0.0.1", "user": "alice@example.test", "device_id": "phone-1", "action": "warn", "phase": "enforce",
        "policy_ids": ["ban"], "audit": [], "exempted": [], "overridden": [], "outside_rollout": [], "deadlines": {},
        "policy_version": version,
        "sender": "alice@example.test", "recipients": 1, "refused": 0, "result": "relayed",
        "upstream_reply": "250 2.0.0 upstream: queued as 1", "size": decisions[0]["size"],
        "message_id": "<jbswy3dp@device.test>",
    }  # fmt: skip
    failures = [e for e in events if e["event"] == "auth_failed"]
    assert [e["reason"] for e in failures] == ["bad_signature"]


def test_redaction_masks_token_shaped_strings() -> None:
    event = logs.guard_fields(
        None, "info", {"token": "x", "detail": "got eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl here"}
    )
    assert event == {"token": "<redacted>", "detail": "got <redacted-token> here"}


def test_redaction_masks_any_jws_shaped_string_not_only_eyj() -> None:
    issuer = TestIssuer.generate("k1")
    token = FakeDevice(issuer).token()
    _, payload, signature = token.split(".")
    # The same claims under a header encoded differently (whitespace before the brace):
    # still a JWS, and it reaches the log in the SASL user field of a refused AUTH.
    other = base64.urlsafe_b64encode(b' {"alg":"ES256"}').rstrip(b"=").decode()
    assert not other.startswith("eyJ")
    for secret in (token, f"{other}.{payload}.{signature}", f"{other}.{payload}."):
        event = logs.guard_fields(None, "info", {"user": secret, "problems": [f"x {secret}"]})
        assert event == {"user": "<redacted-token>", "problems": ["x <redacted-token>"]}
    kept = {"upstream": "smtp.example.com:587", "version": "1.2.3", "host": "mx1.mail.example.net"}
    assert logs.guard_fields(None, "info", dict(kept)) == kept


async def test_the_decision_event_carries_an_escaped_bounded_message_id(tmp_path: Path) -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    folded = b"\r\n ".join([b"<a\x1b[2J\x07@b>"] + [b"x" * 500] * 4)  # 2,000 octets, folded
    message = (
        b"Subject: hi\r\nMessage-ID:\r\n " + folded + b"\r\n\r\nMessage-ID: <body@not.header>\r\n"
    )
    try:
        issuer = TestIssuer.generate("k1")
        async with gateway_with_upstream(tmp_path, issuer) as (gateway, _):
            phone = FakeDevice(issuer)
            recipients = ("bob@example.test", "carol@example.test")
            assert (await phone.send(gateway.port, message=message, recipients=recipients)).accepted
            assert (
                await phone.send(gateway.port, message=b"Subject: none\r\n\r\nbody\r\n")
            ).accepted
    finally:
        structlog.reset_defaults()
    decisions = [
        e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == "decision"
    ]
    first, second = decisions
    assert first["recipients"] == 2
    assert first["message_id"].startswith("<a\\x1b[2J\\x07@b> xxx")
    assert len(first["message_id"]) == logs.MESSAGE_ID_LIMIT
    assert second["message_id"] is None


async def test_hold_release_and_drop_are_audited_and_the_server_logs_the_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        issuer = TestIssuer.generate("k1")
        policies = {"ban.toml": tiktok_ban("hold")}
        async with gateway_with_upstream(tmp_path, issuer, policies) as (gateway, upstream):
            phone = FakeDevice(issuer, apps={TIKTOK})
            for _ in range(3):
                assert (await phone.send(gateway.port)).data[0] == 250  # type: ignore[index]
            config = str(gateway.config_path)
            store = HoldStore(gateway.settings.hold.database)
            first, *_ = [h.hold_id for h in store.select()]
            store.close()
            assert cli.main(["hold", "release", first, "--config", config]) == 0
            await upstream.wait_for(1)
            for _ in range(50):  # the released message leaves the store
                store = HoldStore(gateway.settings.hold.database)
                left = store.count()
                store.close()
                if left == 2:
                    break
                await asyncio.sleep(0.1)
            assert cli.main(["hold", "drop", "--device", "phone-1", "--config", config]) == 0
    finally:
        structlog.reset_defaults()
    audit = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(a["event"], a["os_user"], a["count"], a["audit"]) for a in audit] == [
        ("admin_hold_release", getpass.getuser(), 1, True),
        ("admin_hold_drop", getpass.getuser(), 2, True),
    ]
    assert audit[0]["hold_ids"] == [first]
    assert audit[1]["filter"] == {"device_id": "phone-1"}
    released = [
        e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == "released"
    ]
    assert [(e["hold_id"], e["requested"]) for e in released] == [(first, True)]


def test_a_token_in_an_exceptions_text_is_masked_in_the_rendered_traceback() -> None:
    """A library may put what it was given into its exception's message: the traceback
    in the log line must not carry a device token either (its newlines stay JSON-escaped)."""
    token = FakeDevice(TestIssuer.generate("k1")).token()
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        try:
            raise ValueError(f"cannot parse {token}")
        except ValueError:
            structlog.get_logger("gateway").error("parse_failed", exc_info=True)
    finally:
        structlog.reset_defaults()  # the tests after this one log as the suite does
    (line,) = stream.getvalue().splitlines()
    event = json.loads(line)
    assert token not in line
    assert "ValueError: cannot parse <redacted-token>" in event["exception"]
    assert "Traceback (most recent call last):\n" in event["exception"]
