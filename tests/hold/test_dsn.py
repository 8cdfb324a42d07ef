"""The bounce for expired held mail: an RFC 3464 report that parses back, and that no
address or policy id can add a header, a status block or a MIME part to."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message

import pytest

from gateway.config.settings import Smarthost, UpstreamSettings
from gateway.domain import Device, DeviceClaims, DeviceClass, Platform
from gateway.hold.dsn import expiry_report
from gateway.hold.store import HeldMessage
from gateway.testing.upstream import FakeUpstream
from gateway.upstream.relay import Relay

NOW = datetime(2026, 3, 9, 9, 30, tzinfo=UTC)
RECEIVED = NOW - timedelta(days=7, hours=1)
ORIGINAL = (
    b"From: alice@example.test\r\n"
    b"To: bob@example.test, carol@example.test\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <original-1@example.test>\r\n"
    b"\r\n"
    b"The secret body, which never goes back in a bounce.\r\n"
)


def held_message(
    sender: str = "alice@example.test",
    recipients: Sequence[str] = ("bob@example.test", "carol@example.test"),
    policy_ids: Sequence[str] = ("ban-tiktok",),
    content: bytes = ORIGINAL,
) -> HeldMessage:
    claims = DeviceClaims(
        issuer="mdm",
        subject="alice@example.test",
        audience=("gateway",),
        issued_at=RECEIVED,
        expires_at=RECEIVED + timedelta(hours=1),
        device=Device("phone-1", Platform.IOS, DeviceClass.MOBILE),
    )
    return HeldMessage(
        seq=1,
        hold_id="h1",
        received_at=RECEIVED,
        sender=sender,
        recipients=tuple(recipients),
        user="alice@example.test",
        device_id="phone-1",
        claims=claims,
        policy_ids=tuple(policy_ids),
        policy_version="v1",
        size=len(content),
        attempts=0,
        last_error=None,
        release_requested=False,
        content=content,
    )


def dsn(held: HeldMessage) -> bytes:
    return expiry_report(held, held.content or b"", "gateway.test", NOW, timedelta(days=7))


def status_blocks(report: Message) -> list[Message]:
    part = report.get_payload(1)
    assert isinstance(part, Message)
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.running() as running:
        yield running


async def test_the_bounce_parses_back_as_a_delivery_status_report(upstream: FakeUpstream) -> None:
    settings = UpstreamSettings(
        smarthosts=(Smarthost("127.0.0.1", upstream.port, tls="none"),), timeout=5
    )
    relay = Relay(settings, "gateway.test")
    try:
        delivery = await relay.deliver("", ["alice@example.test"], dsn(held_message()))
    finally:
        await relay.close()
    assert delivery.reply.is_success
    (received,) = upstream.messages
    assert received.sender == ""
    assert b"The secret body" not in received.content  # the headers only, never the body

    report = email.message_from_bytes(received.content)
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@gateway.test>"
    assert report["To"] == "<alice@example.test>"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Message-ID"].endswith("@gateway.test>")
    assert email.utils.parsedate_to_datetime(report["Date"]) == NOW
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in report.get_payload()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]

    per_message, *per_recipient = status_blocks(report)
    assert per_message["Reporting-MTA"] == "dns; gateway.test"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == RECEIVED
    assert [dict(block.items()) for block in per_recipient] == [
        {
            "Final-Recipient": f"rfc822; {recipient}",
            "Action": "failed",
            "Status": "5.7.1",
            "Diagnostic-Code": "smtp; 550 5.7.1 held by policy ban-tiktok and expired",
        }
        for recipient in ("bob@example.test", "carol@example.test")
    ]

    headers = report.get_payload(2)
    assert isinstance(headers, Message)
    original_headers = headers.get_payload(decode=True)
    assert isinstance(original_headers, bytes)
    assert original_headers == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"

    explanation = report.get_payload(0)
    assert isinstance(explanation, Message)
    text = explanation.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"ban-tiktok" in text
    assert b"7 days" in text


def test_original_headers_in_8bit_come_back_unchanged() -> None:
    original = b"From: alice@example.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n"
    content = dsn(held_message(content=original))
    assert b"\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n" in content
    report = email.message_from_bytes(content)
    headers = report.get_payload(2)
    assert isinstance(headers, Message)
    assert (
        headers.get_payload(decode=True)
        == b"From: alice@example.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n"
    )


def test_a_hostile_sender_adds_no_header() -> None:
    content = dsn(held_message(sender="alice@example.test\r\nBcc: victim@example.org"))
    report = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    assert report.get_all("Bcc") is None
    assert len(report.get_all("To") or []) == 1
    assert report.get_content_type() == "multipart/report"


def test_a_hostile_recipient_adds_no_header_block_or_part() -> None:
    hostile = (
        "bob@example.test\r\n\r\nFinal-Recipient: rfc822; injected@example.org\r\n"
        "Action: delivered\r\n\r\n--x\r\nContent-Type: text/html\r\n\r\n<b>hi</b>"
    )
    content = dsn(held_message(recipients=(hostile,), policy_ids=("p\r\nBcc: v@example.org",)))
    report = email.message_from_bytes(content)
    assert report.get_all("Bcc") is None
    assert len(report.get_payload()) == 3
    per_message, *per_recipient = status_blocks(report)
    assert len(per_recipient) == 1  # one recipient, one block
    (block,) = per_recipient
    (final_recipient,) = block.get_all("Final-Recipient")
    assert " ".join(final_recipient.split()) == f"rfc822; {' '.join(hostile.split())}"
    assert block.get_all("Action") == ["failed"]
    assert block.get_all("Bcc") is None
    assert "Bcc" not in per_message
