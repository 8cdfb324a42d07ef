"""Delivery into a mailbox over LMTP (RFC 2033): the sync notices, to Dovecot's LMTP.

smtplib.LMTP in a worker thread rather than aiosmtplib: aiosmtplib has no LMTP mode (it
greets with EHLO, where RFC 2033 s 4.1 asks for LHLO), while smtplib.LMTP says LHLO. One
recipient per transaction, so the single reply smtplib reads after DATA is that
recipient's (RFC 2033 s 4.2 sends one per recipient). Notices are rare (once per
device, policy and phase), so a thread per delivery costs nothing that matters; the
socket timeout bounds every step of it.
"""

from __future__ import annotations

import asyncio
import smtplib

from gateway.config.settings import Endpoint


class LmtpDeliveryError(Exception):
    """The LMTP server did not take the message; the text is the reply or the error's
    type (never the message)."""


def _deliver(
    endpoint: Endpoint, hostname: str, sender: str, recipient: str, message: bytes, timeout: float
) -> None:
    try:
        with smtplib.LMTP(
            endpoint.host, endpoint.port, local_hostname=hostname, timeout=timeout
        ) as lmtp:
            lmtp.sendmail(sender, [recipient], message)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        raise LmtpDeliveryError(f"{code} {text.decode(errors='replace')[:200]}") from None
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        reply = error.decode(errors="replace") if isinstance(error, bytes) else str(error)
        raise LmtpDeliveryError(f"{exc.smtp_code} {reply[:200]}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise LmtpDeliveryError(type(exc).__name__) from None


class LmtpDelivery:
    """Delivers one message to one mailbox; raises :class:`LmtpDeliveryError`."""

    def __init__(self, endpoint: Endpoint, hostname: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.hostname = hostname
        self.timeout = timeout

    async def __call__(self, sender: str, recipient: str, message: bytes) -> None:
        await asyncio.to_thread(
            _deliver, self.endpoint, self.hostname, sender, recipient, message, self.timeout
        )
