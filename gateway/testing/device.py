"""A fake phone: holds an MDM-signed token, installs and removes apps, sends mail.

It speaks SMTP through aiosmtplib and does the AUTH exchange itself, so it can use any of
the three mechanisms and report every reply (including the OAUTHBEARER error challenge).
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import aiosmtplib

from gateway.smtp.sasl import oauthbearer_response, plain_response, xoauth2_response
from gateway.testing.issuer import TestIssuer


@dataclass
class SendResult:
    """Every reply of one submission, as (code, text)."""

    auth: tuple[int, str] | None = None
    auth_challenge: str | None = None  # decoded JSON error challenge, if one came
    mail: tuple[int, str] | None = None
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


def make_message(
    subject: str = "Hello", body: str = "Hi there.", sender: str = "", recipient: str = ""
) -> bytes:
    lines = [
        f"From: <{sender}>" if sender else "From: <alice@example.test>",
        f"To: <{recipient}>" if recipient else "To: <bob@example.test>",
        f"Subject: {subject}",
        "Message-ID: <"
        + base64.b32encode(subject.encode()).decode().strip("=").lower()[:20]
        + "@device.test>",
        "",
        body,
        "",
    ]
    return "\r\n".join(lines).encode()


@dataclass
class FakeDevice:
    issuer: TestIssuer
    user: str = "alice@example.test"
    device_id: str = "phone-1"
    device_class: str = "mobile"
    platform: str = "ios"
    apps: set[str] = field(default_factory=set)
    posture: dict[str, bool] = field(default_factory=dict)
    model: str | None = None
    os_version: str | None = None

    def install(self, *apps: str) -> None:
        self.apps.update(apps)

    def remove(self, *apps: str) -> None:
        self.apps.difference_update(apps)

    def token(self, at: datetime | None = None, lifetime: timedelta = timedelta(minutes=15)) -> str:
        return self.issuer.token(
            subject=self.user,
            device_id=self.device_id,
            platform=self.platform,
            device_class=self.device_class,
            apps=sorted(self.apps),
            posture=self.posture,
            model=self.model,
            os_version=self.os_version,
            issued_at=at,
            lifetime=lifetime,
        )

    async def send(
        self,
        port: int,
        *,
        host: str = "127.0.0.1",
        mechanism: str = "PLAIN",
        recipients: Iterable[str] = ("bob@example.test",),
        sender: str | None = None,
        message: bytes | None = None,
        token: str | None = None,
        sasl_user: str | None = None,
        starttls: bool = False,
        implicit_tls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        at: datetime | None = None,
        mail_options: Sequence[str] = (),
        timeout: float = 10.0,  # noqa: ASYNC109  # passed to aiosmtplib as its socket timeout
        source_address: str | None = None,  # a loopback address of its own (127.0.0.2, ...)
    ) -> SendResult:
        """One whole submission; stops at the first step that fails, like a real client."""
        result = SendResult()
        recipients = list(recipients)
        sender = self.user if sender is None else sender
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            use_tls=implicit_tls,
            start_tls=starttls,
            tls_context=tls_context,
            timeout=timeout,
            local_hostname="device.test",
            source_address=None if source_address is None else (source_address, 0),
        )
        await client.connect()
        try:
            await client.ehlo()
            auth = await self.authenticate(
                client, mechanism, token or self.token(at), sasl_user or self.user, result
            )
            if auth[0] != 235:
                return result
            response = await client.execute_command(
                b"MAIL", b"FROM:<" + sender.encode() + b">", *[o.encode() for o in mail_options]
            )
            result.mail = (response.code, response.message)
            if response.code != 250:
                return result
            for recipient in recipients:
                response = await client.execute_command(
                    b"RCPT", b"TO:<" + recipient.encode() + b">"
                )
                result.rcpt[recipient] = (response.code, response.message)
            if not any(code == 250 for code, _ in result.rcpt.values()):
                return result
            content = (
                message
                if message is not None
                else make_message(sender=sender, recipient=recipients[0])
            )
            try:
                response = await client.data(content)
                result.data = (response.code, response.message)
            except aiosmtplib.SMTPResponseException as exc:
                result.data = (exc.code, exc.message)
        finally:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()
        return result

    @staticmethod
    async def authenticate(
        client: aiosmtplib.SMTP, mechanism: str, token: str, user: str, result: SendResult
    ) -> tuple[int, str]:
        if mechanism == "PLAIN":
            blob = plain_response(user, token)
        elif mechanism == "XOAUTH2":
            blob = xoauth2_response(user, token)
        elif mechanism == "OAUTHBEARER":
            blob = oauthbearer_response(user, token, host="gateway.test", port=587)
        else:
            raise ValueError(f"unknown mechanism {mechanism}")
        response = await client.execute_command(b"AUTH", mechanism.encode(), base64.b64encode(blob))
        if response.code == 334:
            # The bearer mechanisms' error challenge: acknowledge it to get the final reply.
            result.auth_challenge = base64.b64decode(response.message).decode()
            response = await client.execute_command(b"AQ==" if mechanism == "OAUTHBEARER" else b"")
        result.auth = (response.code, response.message)
        return result.auth
