"""The log stream of `gateway serve`, as a process: every line is one JSON object, and no
client can put a raw control character into it (docs/operations.md, Logs)."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import struct
import sys
from pathlib import Path

import pytest

from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice
from gateway.testing.harness import write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from gateway.testing.upstream import FakeUpstream

# Raw bytes a client sends before AUTH: CR, ESC, NUL, BEL, an unknown command made of
# escape sequences, and a line that imitates a log event.
HOSTILE_LINES = (
    b"\x1b[31mFAKE\x1b[0m\r\x1b[2K",
    b'{"event": "auth_ok", "user": "ceo@example.test"}',
    b"NOOP \r\x1b]0;pwned\x07",
    b"\x00\x00HELP\x00",
    b"MAIL FROM:<\x1b[2J@example.test>",
    b"AUTH PLAIN \x1b\r\x00",
    b"EHLO \x1b[1A\x1b[2K\rforged",
)


async def _collect(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


async def _wait_for_event(
    lines: list[bytes], wanted: str, within: float = 15.0
) -> dict[str, object]:
    async with asyncio.timeout(within):
        while True:
            for line in list(lines):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == wanted:
                    return event  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


async def _hostile_before_auth(port: int) -> None:
    async with await RawSmtp.connect(port) as client:
        assert (await client.reply())[0] == 220
        for line in HOSTILE_LINES:
            await client.send(line + b"\r\n")
            code, _ = await client.reply()
            if code in (0, 421):
                return


async def _reset_after_the_dot(port: int, token: str) -> None:
    """A whole submission, then a TCP RST instead of waiting for the reply to the dot."""
    client = await RawSmtp.connect(port)
    assert (await client.reply())[0] == 220
    assert (await client.command("EHLO phone"))[0] == 250
    blob = base64.b64encode(plain_response("alice@example.test", token)).decode()
    assert (await client.command(f"AUTH PLAIN {blob}"))[0] == 235
    assert (await client.command("MAIL FROM:<alice@example.test>"))[0] == 250
    assert (await client.command("RCPT TO:<bob@example.test>"))[0] == 250
    assert (await client.command("DATA"))[0] == 354
    sock: socket.socket = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.send(b"Subject: gone\r\n\r\nbye\r\n.\r\n")
    client.writer.transport.abort()  # SO_LINGER 0: the kernel sends RST


@pytest.mark.slow
async def test_every_line_of_the_log_stream_is_json_under_hostile_clients(tmp_path: Path) -> None:
    issuer = TestIssuer.generate("k1")
    out: list[bytes] = []
    err: list[bytes] = []
    async with FakeUpstream.running() as upstream:
        upstream.faults.delay = 0.3  # the reply to the dot comes after the client is gone
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--grace", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        assert process.stderr is not None
        readers = [
            asyncio.create_task(_collect(process.stdout, out)),
            asyncio.create_task(_collect(process.stderr, err)),
        ]
        try:
            started = await _wait_for_event(err, "listening")
            port = int(str(started["submission"]).rsplit(":", 1)[1])
            for _ in range(3):
                await _hostile_before_auth(port)
            phone = FakeDevice(issuer)
            for _ in range(3):
                await _reset_after_the_dot(port, phone.token())
            await asyncio.sleep(1.0)  # what the gateway still does for them (the RST may win)
            hostile_id = b"Subject: hi\r\nMessage-ID: <\x1b[5m@x>\r\n\r\nhi\r\n"
            assert (await phone.send(port, message=hostile_id)).accepted  # still serving
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=15) == 0
            await asyncio.wait_for(asyncio.gather(*readers), timeout=5)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            for reader in readers:
                reader.cancel()
    assert out == []  # stdout stays empty: the log stream is stderr (docs/operations.md)
    events = []
    for line in out + err:
        assert line.endswith(b"\n")
        body = line[:-1]
        raw = [c for c in body if c < 0x20 or c == 0x7F]
        assert not raw, f"raw control characters in {body!r}"
        events.append(json.loads(body))  # every line is one JSON object
    names = [e["event"] for e in events]
    assert "stopped" in names
    # Tracebacks (asyncio's "Task exception was never retrieved" after a reset, say) are a
    # field of an event, never lines of their own.
    for event in events:
        if "exception" in event:
            assert str(event["exception"]).startswith("Traceback"), event
    assert started["version"]
    assert started["config"] == str(config)
    assert started["policy_version"]
    assert str(started["admin"]).startswith("127.0.0.1:")
    # The hostile lines did reach the log, escaped, through aiosmtpd's own logger.
    library = [e for e in events if e["event"] == "library_log"]
    assert any(
        "unrecognised" in str(e["message"]) and "\\x1b" in str(e["message"]) for e in library
    )
    decisions = [e for e in events if e["event"] == "decision" and e.get("message_id")]
    assert "<\\x1b[5m@x>" in [e["message_id"] for e in decisions]
