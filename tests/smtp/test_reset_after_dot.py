"""A client that resets the connection (RST) right after the final dot, against
`gateway serve` as a process (uvloop when installed, as deployed): no exception event, the
gateway keeps serving, and each message is relayed whole or not at all."""

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

BODY = b"Subject: gone\r\n\r\n" + b"line of the message\r\n" * 200


async def _collect(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


async def _event(lines: list[bytes], wanted: str, within: float = 15.0) -> dict[str, object]:
    async with asyncio.timeout(within):
        while True:
            for line in list(lines):
                event = json.loads(line)
                if event.get("event") == wanted:
                    return event  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)


async def _reset_after_the_dot(port: int, token: str, n: int) -> None:
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
    await client.send(f"X-N: {n}\r\n".encode() + BODY + b".\r\n")
    client.writer.transport.abort()  # SO_LINGER 0: the kernel sends RST


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3])
async def test_reset_after_the_dot_is_no_exception_and_never_half(
    tmp_path: Path, delay: float
) -> None:
    issuer = TestIssuer.generate("k1")
    err: list[bytes] = []
    async with FakeUpstream.running() as upstream:
        upstream.faults.delay = delay  # the reply to the dot comes before/after the RST
        config = write_config(tmp_path, issuer=issuer, upstream_port=upstream.port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--grace", "2",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stderr is not None
        reader = asyncio.create_task(_collect(process.stderr, err))
        try:
            started = await _event(err, "listening")
            port = int(str(started["submission"]).rsplit(":", 1)[1])
            phone = FakeDevice(issuer)
            for n in range(8):
                await _reset_after_the_dot(port, phone.token(), n)
                await asyncio.sleep(delay / 4 * (n % 3))
            await asyncio.sleep(1.0 + delay)  # what the gateway still does for them
            assert (await phone.send(port)).accepted  # still serving
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=15) == 0
            await asyncio.wait_for(reader, timeout=5)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            reader.cancel()
    events = [json.loads(line) for line in err]
    bad = [e for e in events if "exception" in e or e.get("level") in ("error", "critical")]
    assert bad == [], json.dumps(bad, indent=1)
    # Never half: a message received whole is relayed whole (its relay is not cut short
    # when the client goes), with one decision event; the upstream has exactly those.
    # (A reset that overtakes the dot in the kernel loses the message before the gateway
    # reads it: then there is no decision and nothing upstream, which is also whole.)
    decisions = [e for e in events if e["event"] == "decision"]
    assert {d["result"] for d in decisions} == {"relayed"}
    assert len({d["session"] for d in decisions}) == len(decisions) == len(upstream.messages)
    gone = {e["session"] for e in events if e["event"] == "client_gone_after_dot"}
    assert gone <= {d["session"] for d in decisions}  # received whole: relayed and logged
    for message in upstream.messages[:-1]:
        assert message.content.endswith(BODY.split(b"\r\n\r\n", 1)[1]), message.content[-200:]
