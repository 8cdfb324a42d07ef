"""Decision events carry their reasons; tokens never reach a log line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import structlog

from gateway.ops import logs
from gateway.testing.device import FakeDevice
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer

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
        "access": "send", "protocol": "smtp", "user": "alice@example.test", "device_id": "phone-1", "action": "warn", "phase": "enforce",
        "policy_ids": ["ban"], "audit": [], "exempted": [], "policy_version": version,
        "sender": "alice@example.test", "recipients": 1, "refused": 0, "result": "relayed",
        "upstream_reply": "250 2.0.0 upstream: queued as 1", "size": decisions[0]["size"],
    }  # fmt: skip
    failures = [e for e in events if e["event"] == "auth_failed"]
    assert [e["reason"] for e in failures] == ["bad_signature"]


def test_redaction_masks_token_shaped_strings() -> None:
    event = logs.redact_secrets(
        None, "info", {"token": "x", "detail": "got eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl here"}
    )
    assert event == {"token": "<redacted>", "detail": "got <redacted-token> here"}
