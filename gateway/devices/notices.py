"""Notice mails: tell a user once when their device enters warn or hold for a policy, and
when held mail is released. At most one per (device, policy, phase), remembered in the
hold store's database so a restart does not repeat them.

The wording lives here. Messages are built with the email package (policy SMTP), never by
formatting strings: a device id, an address or a policy's message enters a header as one
line of text, so it cannot add a header.
"""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Callable
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Protocol

import structlog

from gateway.domain import Action, Decision, DeviceClaims
from gateway.hold.store import AsyncStore, HeldMessage
from gateway.upstream.relay import Relay

log = structlog.get_logger("gateway.notices")

SUBJECTS = {
    "warn": "Action required for mobile mail on {device}",
    "hold": "Mail from {device} is being held",
    "released": "Held mail from {device} has been sent",
    "withdrawn": "Disregard the earlier notice about {device}",
    # Notices in mailboxes (sync): the phase key carries the access, so that a device's
    # SMTP notice and its mailbox notice for the same policy are both sent once.
    "warn:sync": "Action required for mobile mail on {device}",
    "hold:sync": "Your mailbox is not available on {device}",
    "withdrawn:sync": "Mobile mail on {device} is back",
}
#: The access suffix of mailbox notices' phase keys in the notices table.
SYNC_SUFFIX = ":sync"


def _one_line(value: str) -> str:
    """Text on one line: every run of whitespace (CR and LF too) becomes a space."""
    return " ".join(value.split())


def released_text(held: HeldMessage) -> str:
    return (
        f"Mail held from your device {held.device_id} by policy {', '.join(held.policy_ids)} "
        "has now been sent: the device complies, or the policy was lifted."
    )


def quarantine_text(message: str) -> str:
    """What a held device shows in place of the mailbox: what to do, and that nothing is lost."""
    return (
        f"{message} Until then this device shows only this notice in place of your mailbox. "
        "Nothing is lost: your mail is waiting, and your other devices see it as usual. "
        "Once this device complies, open the mail app again (or pull to refresh) and your "
        "inbox comes back at its next login."
    )


def warn_text(message: str) -> str:
    return (
        f"{message} This device still syncs your mail for now; after the deadline it will "
        "show only a notice in place of your mailbox until it complies."
    )


def withdrawn_text(device_id: str, policy_id: str, reason: str | None) -> str:
    why = f" ({reason})" if reason else ""
    return (
        f"The restriction {policy_id} on your device {device_id} was withdrawn{why}. "
        "Nothing is asked of you: the mail app shows your inbox again at its next sync."
    )


def disregard_text(device_id: str, policy_id: str, reason: str | None) -> str:
    """The "withdrawn" mail: to exactly the users who had a notice for this policy."""
    why = f" ({reason})" if reason else ""
    return (
        f"The restriction {policy_id} on your device {device_id} has been withdrawn{why}. "
        "Please disregard the earlier notice about it: nothing is asked of you."
    )


def notice_message(
    sender: str, recipient: str, phase: str, device_id: str, text: str, now: datetime, hostname: str
) -> bytes:
    message = EmailMessage(policy=SMTP)
    message["From"] = f"Compliance Gateway <{_one_line(sender)}>"
    message["To"] = f"<{_one_line(recipient)}>"
    message["Subject"] = SUBJECTS[phase].format(device=_one_line(device_id)[:200])
    message["Date"] = format_datetime(now)
    message["Message-ID"] = f"<{uuid.uuid4().hex}@{_one_line(hostname)}>"
    message["Auto-Submitted"] = "auto-generated"
    message["MIME-Version"] = "1.0"
    body = textwrap.fill(_one_line(text), 72, break_long_words=False, break_on_hyphens=False)
    body += "\n"
    # 7bit when it can be; never raw 8-bit (the upstream is not asked for 8BITMIME).
    message.set_content(body, cte=None if body.isascii() else "quoted-printable")
    return message.as_bytes()


class Notifier:
    def __init__(self, store: AsyncStore, relay: Relay, sender: str, hostname: str) -> None:
        self.store = store
        self.relay = relay
        self.sender = sender
        self.hostname = hostname

    async def decision_notices(
        self, claims: DeviceClaims, decision: Decision, now: datetime
    ) -> None:
        """A WARN or HOLD decision: one notice per policy that asked for that action."""
        if decision.action not in (Action.WARN, Action.HOLD):
            return
        phase = decision.action.label
        for match in decision.matches:
            if match.action is decision.action:
                await self._notify_logged(
                    claims.subject, claims.device.id, match.policy_id, phase, match.message, now
                )

    async def released_notices(self, held: HeldMessage, now: datetime) -> None:
        """Held mail was sent: one "released" notice per policy that held it."""
        text = released_text(held)
        for policy_id in held.policy_ids:
            await self._notify_logged(held.user, held.device_id, policy_id, "released", text, now)

    async def _notify_logged(
        self, user: str, device_id: str, policy_id: str, phase: str, text: str, now: datetime
    ) -> None:
        """notify(), with any failure logged rather than raised (notices are best effort)."""
        try:
            await self.notify(user, device_id, policy_id, phase, text, now)
        except Exception:
            log.exception(
                "notice_error", user=user, device_id=device_id, policy_id=policy_id, phase=phase
            )

    async def notify(
        self, user: str, device_id: str, policy_id: str, phase: str, text: str, now: datetime
    ) -> bool:
        """Send the notice unless this (device, policy, phase) already had one."""
        if not await self.store.claim_notice(device_id, policy_id, phase, now):
            return False
        try:
            message = notice_message(self.sender, user, phase, device_id, text, now, self.hostname)
            reply = (await self.relay.deliver(self.sender, [user], message)).reply
        except Exception:
            await self.store.unclaim_notice(device_id, policy_id, phase)  # try again next time
            raise
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


class MailboxDelivery(Protocol):
    """Puts a whole message into one mailbox (LMTP to Dovecot); raises on failure."""

    async def __call__(self, sender: str, recipient: str, message: bytes) -> None: ...


class MailboxNotices:
    """Notices delivered straight into mailboxes for sync: the warning in the real inbox,
    the notice in the quarantine mailbox, and the notice that a ban was withdrawn. Once
    per (device, policy, phase), claimed in the same table as the SMTP notices with the
    phase key ``<phase>:sync``. Best effort: a failure is logged and counted, and the
    claim is given back so the next login tries again."""

    def __init__(
        self,
        store: AsyncStore,
        deliver: MailboxDelivery,
        sender: str,
        hostname: str,
        on_result: Callable[[str, str], None],
    ) -> None:
        self.store = store
        self.deliver = deliver
        self.sender = sender
        self.hostname = hostname
        self.on_result = on_result  # (phase, "sent" | "failed")

    async def at_login(
        self, claims: DeviceClaims, decision: Decision, mailbox: str, now: datetime
    ) -> None:
        """A warned login (the real inbox) or a quarantined one (the quarantine mailbox)."""
        if decision.action is Action.WARN:
            phase, wording = "warn", warn_text
        elif decision.action is Action.HOLD:
            phase, wording = "hold", quarantine_text
        else:
            return
        for match in decision.matches:
            if match.action is decision.action:
                await self.notify(
                    mailbox, claims.device.id, match.policy_id, phase, wording(match.message), now
                )

    async def withdrawn(
        self, user: str, device_id: str, policy_id: str, reason: str | None, now: datetime
    ) -> None:
        """The device's ban was lifted: said in the real inbox, where it logs in now."""
        text = withdrawn_text(device_id, policy_id, reason)
        await self.notify(user, device_id, policy_id, "withdrawn", text, now)

    async def notify(
        self, mailbox: str, device_id: str, policy_id: str, phase: str, text: str, now: datetime
    ) -> bool:
        """Deliver unless this (device, policy, phase) had its mailbox notice; never raises."""
        key = phase + SYNC_SUFFIX
        if not await self.store.claim_notice(device_id, policy_id, key, now):
            return False
        try:
            message = notice_message(self.sender, mailbox, key, device_id, text, now, self.hostname)
            await self.deliver(self.sender, mailbox, message)
        except Exception as exc:
            await self.store.unclaim_notice(device_id, policy_id, key)  # try again next time
            self.on_result(phase, "failed")
            log.warning(
                "notice_failed",
                access="sync",
                mailbox=mailbox,
                device_id=device_id,
                policy_id=policy_id,
                phase=phase,
                error=str(exc)[:200] or type(exc).__name__,
            )
            return False
        self.on_result(phase, "sent")
        log.info(
            "notice_sent",
            access="sync",
            mailbox=mailbox,
            device_id=device_id,
            policy_id=policy_id,
            phase=phase,
        )
        return True
