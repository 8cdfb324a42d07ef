"""An upstream's multi-line refusal reaches the client as a bounded multi-line reply
(RFC 5321 s 4.2.1: "550-..." continuation lines, the last "550 ..."), never as one line
of tens of kilobytes, and never with the upstream's control characters."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

import pytest

from gateway.replies import MAX_REPLY_LINES, Reply
from gateway.smtp.sasl import plain_response
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.raw import RawSmtp
from gateway.upstream.relay import upstream_reply

RFC5321_REPLY_LINE = 512  # octets, CRLF included (RFC 5321 s 4.5.3.1.5)


def multi_line(code: int, lines: list[str]) -> str:
    """What aiosmtpd's handler returns to send a multi-line reply."""
    head = [f"{code}-{line}" for line in lines[:-1]]
    return "\r\n".join([*head, f"{code} {lines[-1]}"])


# 400 lines of 48 octets: about 20 KB, as a site's long "user unknown" explanation.
LONG = [f"5.1.1 line {n:03d} of a very long explanation....." for n in range(400)]


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def rcpt_reply_lines(tmp_path: Path, issuer: TestIssuer, upstream_says: str) -> list[bytes]:
    """RCPT through the gateway; the raw lines of the reply the client gets."""
    async with gateway_with_upstream(tmp_path, issuer) as (gateway, upstream):
        upstream.faults.rcpt_replies["bob@example.test"] = upstream_says
        async with await RawSmtp.connect(gateway.port) as client:
            await client.reply()
            await client.command("EHLO device.test")
            blob = base64.b64encode(plain_response("alice@example.test", issuer.token()))
            assert (await client.command(b"AUTH PLAIN " + blob))[0] == 235
            assert (await client.command("MAIL FROM:<alice@example.test>"))[0] == 250
            await client.send(b"RCPT TO:<bob@example.test>\r\n")
            lines: list[bytes] = []
            while True:
                line = await client.reader.readuntil(b"\r\n")
                lines.append(line)
                if line[3:4] != b"-":
                    return lines


async def test_a_20kb_multi_line_refusal_is_bounded(tmp_path: Path, issuer: TestIssuer) -> None:
    lines = await rcpt_reply_lines(tmp_path, issuer, multi_line(550, LONG))
    assert 2 <= len(lines) <= MAX_REPLY_LINES
    assert all(len(line) <= RFC5321_REPLY_LINE for line in lines)
    assert all(line.startswith(b"550-5.1.1 ") for line in lines[:-1])
    assert lines[-1].startswith(b"550 5.1.1 ")
    assert lines[0] == b"550-5.1.1 upstream: line 000 of a very long explanation.....\r\n"
    assert b"more lines" in lines[-1]


async def test_a_short_multi_line_refusal_keeps_its_lines(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    upstream_says = multi_line(
        550, ["5.1.1 <bob@example.test>: no such user", "5.1.1 see https://example.test/help"]
    )
    lines = await rcpt_reply_lines(tmp_path, issuer, upstream_says)
    assert lines == [
        b"550-5.1.1 upstream: <bob@example.test>: no such user\r\n",
        b"550 5.1.1 see https://example.test/help\r\n",
    ]


async def test_a_real_client_reads_the_bounded_reply(tmp_path: Path, issuer: TestIssuer) -> None:
    """Python's smtplib, an ordinary client, parses the multi-line reply as one reply."""
    import asyncio

    async with gateway_with_upstream(tmp_path, issuer) as (gateway, upstream):
        upstream.faults.rcpt_replies["bob@example.test"] = multi_line(550, LONG)
        token = issuer.token()

        def talk() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", gateway.port, timeout=10) as client:
                client.ehlo("device.test")
                blob = base64.b64encode(plain_response("alice@example.test", token)).decode()
                assert client.docmd("AUTH", f"PLAIN {blob}")[0] == 235
                assert client.mail("alice@example.test")[0] == 250
                return client.rcpt("bob@example.test")

        code, text = await asyncio.to_thread(talk)
    assert code == 550
    assert text.startswith(b"5.1.1 upstream: line 000")
    assert 1 < len(text.split(b"\n")) <= MAX_REPLY_LINES


def test_upstream_reply_bounds_lines_and_strips_controls() -> None:
    reply = upstream_reply(550, "\n".join(LONG))
    assert reply.code == 550
    assert reply.enhanced == "5.1.1"
    wire = reply.wire()
    assert len(wire.split("\r\n")) == MAX_REPLY_LINES
    assert all(len(line) + 2 <= RFC5321_REPLY_LINE for line in wire.split("\r\n"))
    assert len(reply.line()) < 8 * RFC5321_REPLY_LINE  # the one-line form for logs and DSNs
    hostile = upstream_reply(550, "5.7.1 bad\x1b[2J\x00 thing\nsecond\r\x07line")
    assert "\x1b" not in hostile.wire()
    assert "\x00" not in hostile.wire()
    assert "\x07" not in hostile.wire()
    assert hostile.wire() == "550-5.7.1 upstream: bad [2J thing\r\n550 5.7.1 second line"
    over_long = upstream_reply(550, "5.1.1 " + "x" * 5000)
    (only,) = over_long.wire().split("\r\n")
    assert len(only) + 2 <= RFC5321_REPLY_LINE
    assert only.endswith("...")


def test_single_line_replies_are_unchanged() -> None:
    reply = Reply(550, "5.1.1", "no such user")
    assert reply.wire() == reply.line() == "550 5.1.1 no such user"
