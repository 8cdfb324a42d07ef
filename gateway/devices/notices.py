"""Notice mails: tell a user once when their device enters warn or hold for a policy, and
when held mail is released. At most one per (device, policy, phase), remembered in the
hold store's database so a restart does not repeat them."""

from __future__ import annotations

import uuid
from datetime import datetime
from email.utils import format_datetime

import structlog

from gateway.hold.store import AsyncHoldStore
from gateway.upstream.relay import Relay

log = structlog.get_logger("gateway.notices")

SUBJECTS = {
    "warn": "Action required for mobile mail on {device}",
    "hold": "Mail from {device} is being held",
    "released": "Held mail from {device} has been sent",
}


def notice_message(
    sender: str, recipient: str, phase: str, device_id: str, text: str, now: datetime, hostname: str
) -> bytes:
    subject = SUBJECTS[phase].format(device=device_id)
    body = " ".join(text.split())
    return (
        f"From: Compliance Gateway <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\r\n"
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{body}\r\n"
    ).encode()


class Notifier:
    def __init__(self, store: AsyncHoldStore, relay: Relay, sender: str, hostname: str) -> None:
        self.store = store
        self.relay = relay
        self.sender = sender
        self.hostname = hostname

    async def notify(
        self, user: str, device_id: str, policy_id: str, phase: str, text: str, now: datetime
    ) -> bool:
        """Send the notice unless this (device, policy, phase) already had one."""
        if not await self.store.claim_notice(device_id, policy_id, phase, now):
            return False
        message = notice_message(self.sender, user, phase, device_id, text, now, self.hostname)
        transaction, reply = await self.relay.begin(self.sender, [])
        if reply.is_success:
            reply = await transaction.add_recipient(user, self.relay.routes_by_domain)
        if reply.is_success:
            reply = await transaction.send(message)
        else:
            await transaction.abort()
        if not reply.is_success:
            await self.store.unclaim_notice(device_id, policy_id, phase)  # try again next time
            log.warning(
                "notice_failed",
                user=user,
                device_id=device_id,
                policy_id=policy_id,
                phase=phase,
                reply=reply.line(),
            )
            return False
        log.info("notice_sent", user=user, device_id=device_id, policy_id=policy_id, phase=phase)
        return True
