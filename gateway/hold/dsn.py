"""Delivery status notifications (RFC 3464) for held mail that expired."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from email.utils import format_datetime

from gateway.hold.store import HeldMessage


def delivery_status_notification(
    held: HeldMessage, hostname: str, now: datetime, held_for: timedelta
) -> bytes:
    """A multipart/report bounce with the original headers (not the body) attached."""
    boundary = f"dsn-{uuid.uuid4().hex}"
    original = held.content or b""
    header_end = original.find(b"\r\n\r\n")
    original_headers = original[: header_end + 2] if header_end >= 0 else original
    days = held_for.total_seconds() / 86400
    recipients = "".join(
        f"\r\nFinal-Recipient: rfc822; {r}\r\nAction: failed\r\nStatus: 5.7.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.7.1 held by policy {', '.join(held.policy_ids)} and expired\r\n"
        for r in held.recipients
    )
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{held.sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"Your message of {held.received_at.isoformat()} was held because the device it was sent\r\n"
        f"from did not comply with policy ({', '.join(held.policy_ids)}), and it was not released\r\n"
        f"within {days:g} days. It has not been delivered.\r\n\r\n"
        f"--{boundary}\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"Arrival-Date: {format_datetime(held.received_at)}\r\n"
        f"{recipients}\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
    ).encode()
    return text + original_headers + f"\r\n--{boundary}--\r\n".encode()
