"""Delivery status notifications (RFC 3464) for held mail: expired, or refused for good
by the upstream when it was released.

Built with the email package (policy SMTP), never by formatting strings: addresses and
policy ids from the store enter a header as one line of text, so they cannot add a header,
a status field or a MIME part; the multipart boundary is one that no part contains.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP
from email.utils import format_datetime

from gateway.hold.store import HeldMessage, header_block


def _one_line(value: str) -> str:
    """Header text on one line: every run of whitespace (CR and LF too) becomes a space."""
    return " ".join(value.split())


def _status_fields(*fields: tuple[str, str]) -> MIMEPart:
    """One block of a message/delivery-status part (a header block without a body)."""
    block = MIMEPart(policy=SMTP)
    for name, value in fields:
        block[name] = _one_line(value)
    return block


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient a bounce reports: its RFC 3463 status and the diagnostic reply."""

    recipient: str
    status: str  # e.g. 5.1.1
    diagnostic: str  # an SMTP reply line: "550 5.1.1 no such user"


def expiry_report(
    held: HeldMessage, original_headers: bytes, hostname: str, now: datetime, held_for: timedelta
) -> bytes:
    """The bounce for held mail that was not released in time: every recipient failed."""
    policies = _one_line(", ".join(held.policy_ids))
    days = held_for.total_seconds() / 86400
    text = (
        f"Your message of {held.received_at.isoformat()} was held because the device it was"
        f" sent from did not comply with policy ({policies}), and it was not released within"
        f" {days:g} days. It has not been delivered."
    )
    failed = [
        FailedRecipient(r, "5.7.1", f"550 5.7.1 held by policy {policies} and expired")
        for r in held.recipients
    ]
    return _report(held, original_headers, hostname, now, text, failed)


def admin_drop_report(
    held: HeldMessage, original_headers: bytes, hostname: str, now: datetime
) -> bytes:
    """The bounce for held mail an administrator dropped and chose to tell the sender
    about (the admin API's drop with ``dsn``): every recipient failed."""
    policies = _one_line(", ".join(held.policy_ids))
    text = (
        f"Your message of {held.received_at.isoformat()} was held because the device it was"
        f" sent from did not comply with policy ({policies}), and an administrator dropped"
        f" it. It has not been delivered."
    )
    failed = [
        FailedRecipient(
            r, "5.7.1", f"550 5.7.1 held by policy {policies} and dropped by an administrator"
        )
        for r in held.recipients
    ]
    return _report(held, original_headers, hostname, now, text, failed)


def refusal_report(
    held: HeldMessage,
    original_headers: bytes,
    hostname: str,
    now: datetime,
    failed: Sequence[FailedRecipient],
) -> bytes:
    """The bounce for recipients the upstream refused for good when held mail was
    released (RFC 5321 s 6.1: the client heard 250 at hold time, so the gateway now owns
    the message and must report its failure)."""
    text = (
        f"Your message of {held.received_at.isoformat()} was held for a while because of the"
        f" compliance of the device it was sent from. When it was released, the receiving"
        f" server refused {'this recipient' if len(failed) == 1 else 'these recipients'}"
        f" permanently, so it was not delivered to "
        f"{'it' if len(failed) == 1 else 'them'}. The server's reply is in the report."
    )
    return _report(held, original_headers, hostname, now, text, failed)


def _report(
    held: HeldMessage,
    original_headers: bytes,
    hostname: str,
    now: datetime,
    text: str,
    failed: Sequence[FailedRecipient],
) -> bytes:
    """A multipart/report bounce (RFC 3464) with the original headers (not the body)."""
    hostname = _one_line(hostname)

    explanation = MIMEPart(policy=SMTP)
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
    for failure in failed:
        status.attach(
            _status_fields(
                ("Final-Recipient", f"rfc822; {failure.recipient}"),
                ("Action", "failed"),
                ("Status", failure.status),
                ("Diagnostic-Code", f"smtp; {failure.diagnostic}"),
            )
        )

    original_headers = header_block(original_headers)
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
