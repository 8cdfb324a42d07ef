"""Delivery status notifications (RFC 3464) for held mail that expired.

Built with the email package (policy SMTP), never by formatting strings: addresses and
policy ids from the store enter a header as one line of text, so they cannot add a header,
a status field or a MIME part; the multipart boundary is one that no part contains.
"""

from __future__ import annotations

import textwrap
import uuid
from datetime import datetime, timedelta
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP
from email.utils import format_datetime

from gateway.hold.store import HeldMessage


def _one_line(value: str) -> str:
    """Header text on one line: every run of whitespace (CR and LF too) becomes a space."""
    return " ".join(value.split())


def _status_fields(*fields: tuple[str, str]) -> MIMEPart:
    """One block of a message/delivery-status part (a header block without a body)."""
    block = MIMEPart(policy=SMTP)
    for name, value in fields:
        block[name] = _one_line(value)
    return block


def delivery_status_notification(
    held: HeldMessage, hostname: str, now: datetime, held_for: timedelta
) -> bytes:
    """A multipart/report bounce with the original headers (not the body) attached."""
    hostname = _one_line(hostname)
    policies = _one_line(", ".join(held.policy_ids))
    days = held_for.total_seconds() / 86400

    explanation = MIMEPart(policy=SMTP)
    text = (
        f"Your message of {held.received_at.isoformat()} was held because the device it was"
        f" sent from did not comply with policy ({policies}), and it was not released within"
        f" {days:g} days. It has not been delivered."
    )
    body = textwrap.fill(text, 72, break_long_words=False, break_on_hyphens=False) + "\n"
    explanation.set_content(body, cte=None if body.isascii() else "quoted-printable")

    status = MIMEPart(policy=SMTP)
    status["Content-Type"] = "message/delivery-status"
    status.attach(
        _status_fields(
            ("Reporting-MTA", f"dns; {hostname}"),
            ("Arrival-Date", format_datetime(held.received_at)),
        )
    )
    for recipient in held.recipients:
        status.attach(
            _status_fields(
                ("Final-Recipient", f"rfc822; {recipient}"),
                ("Action", "failed"),
                ("Status", "5.7.1"),
                ("Diagnostic-Code", f"smtp; 550 5.7.1 held by policy {policies} and expired"),
            )
        )

    original = held.content or b""
    header_end = original.find(b"\r\n\r\n")
    original_headers = original[: header_end + 2] if header_end >= 0 else original
    headers = MIMEPart(policy=SMTP)
    headers.set_content(
        original_headers,
        "text",
        "rfc822-headers",
        cte="7bit" if original_headers.isascii() else "8bit",
    )

    report = EmailMessage(policy=SMTP)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{_one_line(held.sender)}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(now)
    report["Message-ID"] = f"<{uuid.uuid4().hex}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    parts = (explanation, status, headers)
    # Stored as written (set_raw): the email package would quote report-type's value, and
    # "report-type=delivery-status" is how readers and filters expect to find it. Nothing in
    # this value comes from the message or the store.
    report.set_raw(
        "Content-Type",
        f'multipart/report; report-type=delivery-status;\r\n boundary="{_boundary(parts)}"',
    )
    payload: list[Message | str] = list(parts)
    report.set_payload(payload)
    return report.as_bytes()


def _boundary(parts: tuple[MIMEPart, ...]) -> str:
    """A multipart boundary that no part contains."""
    text = b"".join(part.as_bytes() for part in parts)
    while True:
        boundary = f"dsn-{uuid.uuid4().hex}"
        if b"--" + boundary.encode() not in text:
            return boundary
