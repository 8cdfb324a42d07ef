"""What release does with each recipient's outcome, with ESMTP parameters, and when the
store cannot record an outcome: over real SMTP sessions and a real SQLite file."""

from __future__ import annotations

import asyncio
import email
import sqlite3
from collections.abc import Callable
from email.message import Message
from pathlib import Path

import pytest

from gateway.hold.store import HoldStore
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import RunningGateway
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import ReceivedMessage
from tests.hold.kit import held_mail_gateway, readyz
from tests.stories import TIKTOK, tiktok_ban

HELD = (250, "2.6.0 held: Remove TikTok.")


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


async def _hold(gateway: RunningGateway, device: FakeDevice, **send: object) -> None:
    assert (await device.send(gateway.port, **send)).data == HELD  # type: ignore[arg-type]


async def _retract(gateway: RunningGateway) -> None:
    (gateway.policy_dir / "ban.toml").write_text(tiktok_ban("hold", state="retracted"))
    await gateway.server.reload("test")


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _held(gateway: RunningGateway) -> list[str]:
    store = HoldStore(gateway.settings.hold.database)
    try:
        return [h.hold_id for h in store.select()]
    finally:
        store.close()


def _status_blocks(report: Message) -> list[Message]:
    part = report.get_payload(1)
    assert isinstance(part, Message)
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


async def test_a_recipient_refused_at_release_is_bounced_and_the_other_delivered(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Defect 3: the client heard 250 for both recipients at hold time (RFC 5321 s 6.1);
    one refused with 550 at release gets a DSN naming it and the upstream's reply."""
    async with held_mail_gateway(tmp_path, issuer) as (gateway, upstream):
        await _hold(
            gateway,
            FakeDevice(issuer, apps={TIKTOK}),
            recipients=("bob@example.test", "gone@example.test"),
        )
        upstream.faults.rcpt_replies["gone@example.test"] = "550 5.1.1 no such user"
        await _retract(gateway)
        await gateway.server.services.releaser.run()
        await gateway.server.services.releaser.run()  # the bounce goes out
        await _until(lambda: len(upstream.messages) == 2)
        assert _held(gateway) == []
    original, bounce = upstream.messages
    assert original.recipients == ("bob@example.test",)
    assert bounce.sender == ""
    assert bounce.recipients == ("alice@example.test",)
    report = email.message_from_bytes(bounce.content)
    assert report.get_content_type() == "multipart/report"
    _, *per_recipient = _status_blocks(report)
    assert [dict(b.items()) for b in per_recipient] == [
        {
            "Final-Recipient": "rfc822; gone@example.test",
            "Action": "failed",
            "Status": "5.1.1",
            "Diagnostic-Code": "smtp; 550 5.1.1 upstream: no such user",
        }
    ]


async def test_a_permanent_refusal_at_release_bounces_at_once_not_after_days(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Defect 4: a 5xx for the whole message is final: one pass bounces it, no retries."""
    async with held_mail_gateway(tmp_path, issuer) as (gateway, upstream):
        await _hold(gateway, FakeDevice(issuer, apps={TIKTOK}))
        upstream.faults.data_reply = "554 5.6.0 content rejected"
        await _retract(gateway)
        report = await gateway.server.services.releaser.run()
        assert len(report.bounced) == 1
        assert report.failed == []
        upstream.faults.data_reply = None
        await gateway.server.services.releaser.run()
        (bounce,) = await upstream.wait_for(1)
        assert _held(gateway) == []
    assert bounce.sender == ""
    assert bounce.recipients == ("alice@example.test",)
    assert b"Diagnostic-Code: smtp; 554 5.6.0 upstream: content rejected" in bounce.content


async def test_a_temporary_refusal_keeps_only_the_recipients_to_retry(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """A 4xx for one recipient keeps the message for that recipient alone: the other is
    not sent twice on the retry."""
    async with held_mail_gateway(tmp_path, issuer) as (gateway, upstream):
        await _hold(
            gateway,
            FakeDevice(issuer, apps={TIKTOK}),
            recipients=("bob@example.test", "busy@example.test"),
        )
        upstream.faults.rcpt_replies["busy@example.test"] = "452 4.2.2 mailbox full"
        await _retract(gateway)
        report = await gateway.server.services.releaser.run()
        assert report.failed
        assert report.bounced == []
        store = HoldStore(gateway.settings.hold.database)
        (kept,) = store.select()
        store.close()
        assert kept.recipients == ("busy@example.test",)
        assert kept.attempts == 1
        assert kept.last_error == "452 4.2.2 upstream: mailbox full"
    assert [m.recipients for m in upstream.messages] == [("bob@example.test",)]


async def test_released_mail_keeps_its_esmtp_parameters(tmp_path: Path, issuer: TestIssuer) -> None:
    """Defect 5: BODY=8BITMIME given at MAIL FROM reaches the upstream when released."""
    async with held_mail_gateway(tmp_path, issuer) as (gateway, upstream):
        body = make_message(body="Grüße aus Köln")
        await _hold(
            gateway,
            FakeDevice(issuer, apps={TIKTOK}),
            message=body,
            mail_options=("BODY=8BITMIME",),
        )
        await _retract(gateway)
        await gateway.server.services.releaser.run()
        (released,) = await upstream.wait_for(1)
    assert "BODY=8BITMIME" in released.options
    assert "Grüße aus Köln".encode() in released.content


@pytest.mark.slow
async def test_a_lock_held_during_release_stops_it_without_sending_anything_twice(
    tmp_path: Path, issuer: TestIssuer
) -> None:
    """Defect 2: the upstream said 250 but the row's delete cannot be written (another
    connection holds the store's write lock past the busy timeout). Release stops, says so
    on /readyz, sends nothing again while the lock is held, and once it is gone records
    the outcomes: five held, five delivered, none twice."""
    locker: sqlite3.Connection | None = None

    def lock_the_store(_: ReceivedMessage) -> None:
        nonlocal locker
        if locker is None:
            locker = sqlite3.connect(str(gateway.settings.hold.database), isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")

    async with held_mail_gateway(
        tmp_path, issuer, extra="busy_timeout_seconds = 0.3\n", release_tick=0.2
    ) as (gateway, upstream):
        device = FakeDevice(issuer, apps={TIKTOK})
        for n in range(5):
            await _hold(gateway, device, message=make_message(subject=f"m{n}"))
        upstream.faults.on_accept = lock_the_store
        await _retract(gateway)
        await _until(lambda: gateway.server.services.releaser.fault is not None)
        status, text = await asyncio.to_thread(readyz, gateway)
        assert status == 503
        assert "release of held mail stopped" in text
        assert "locked" in text
        before = len(upstream.messages)
        await asyncio.sleep(2)  # ten ticks: nothing is sent again while the lock is held
        assert len(upstream.messages) == before
        assert locker is not None
        locker.execute("ROLLBACK")
        locker.close()
        await _until(lambda: len(upstream.messages) == 5 and not _held(gateway))
        async with asyncio.timeout(10):
            while (await asyncio.to_thread(readyz, gateway))[0] != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    subjects = sorted(
        m.headers.split("Subject: ", 1)[1].split("\r\n")[0] for m in upstream.messages
    )
    assert subjects == [f"m{n}" for n in range(5)]
