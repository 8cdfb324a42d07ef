"""Notice mails: built so that no device id, address or policy text can add a header, and
the Notifier's decision/released notices, sent through a real relay to a fake upstream."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.config.settings import Smarthost, UpstreamSettings
from gateway.devices.notices import Notifier, notice_message
from gateway.domain import Action, Decision, Device, DeviceClaims, DeviceClass, Phase, Platform
from gateway.domain import PolicyMatch as Match
from gateway.hold.store import AsyncHoldStore, HeldMessage
from gateway.testing.upstream import FakeUpstream
from gateway.upstream.relay import Delivery, Relay

NOW = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
HOSTILE_DEVICE = "phone\r\nBcc: victim@example.org"
HOSTILE_TEXT = "Remove TikTok.\r\nBcc: victim@example.org\r\n\r\nmore"
SENDER = "compliance-gateway@gateway.test"


def parse(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def claims(device_id: str = "phone-1", user: str = "alice@example.test") -> DeviceClaims:
    return DeviceClaims(
        issuer="mdm",
        subject=user,
        audience=("gateway",),
        issued_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(hours=1),
        device=Device(device_id, Platform.IOS, DeviceClass.MOBILE),
    )


def held_message(device_id: str = "phone-1", policy_ids: Sequence[str] = ("p1",)) -> HeldMessage:
    return HeldMessage(
        seq=1,
        hold_id="h1",
        received_at=NOW,
        sender="alice@example.test",
        recipients=("bob@example.test",),
        user="alice@example.test",
        device_id=device_id,
        claims=claims(device_id),
        policy_ids=tuple(policy_ids),
        policy_version="v1",
        size=10,
        attempts=0,
        last_error=None,
        release_requested=False,
    )


# --- the message --------------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["warn", "hold", "released"])
def test_hostile_device_id_and_policy_text_add_no_header(phase: str) -> None:
    content = notice_message(
        SENDER, "alice@example.test", phase, HOSTILE_DEVICE, HOSTILE_TEXT, NOW, "gateway.test"
    )
    message = parse(content)
    assert message.get_all("Bcc") is None
    assert message.get_all("To") == ["alice@example.test"]
    assert len(message.get_all("Subject") or []) == 1
    assert "phone Bcc: victim@example.org" in str(message["Subject"])  # shown, as text
    assert not message.defects
    assert message.get_content().split() == HOSTILE_TEXT.split()  # the text, in the body only


def test_hostile_recipient_adds_no_header() -> None:
    content = notice_message(
        SENDER, "alice@example.test\r\nBcc: victim@example.org", "hold", "phone-1", "x", NOW, "gw"
    )
    message = parse(content)
    assert message.get_all("Bcc") is None
    assert len(message.get_all("To") or []) == 1


def test_notice_headers() -> None:
    content = notice_message(
        SENDER, "alice@example.test", "warn", "phone-1", "Remove TikTok.", NOW, "gateway.test"
    )
    assert b"\r\nAuto-Submitted: auto-generated\r\n" in content
    message = parse(content)
    assert message["From"] == f"Compliance Gateway <{SENDER}>"
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == "Action required for mobile mail on phone-1"
    assert message["Date"].datetime == NOW
    assert str(message["Message-ID"]).endswith("@gateway.test>")
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "Remove TikTok.\r\n"


def test_non_ascii_notice_is_7bit_on_the_wire() -> None:
    content = notice_message(
        SENDER, "alice@example.test", "hold", "Téléphone", "Entfernen Sie TikTök.", NOW, "gw"
    )
    assert content.isascii()
    message = parse(content)
    assert message["Subject"] == "Mail from Téléphone is being held"
    assert message.get_content() == "Entfernen Sie TikTök.\r\n"


# --- the Notifier, end to end ---------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.running() as running:
        yield running


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[AsyncHoldStore]:
    store = AsyncHoldStore(tmp_path / "hold.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def notifier(upstream: FakeUpstream, store: AsyncHoldStore) -> AsyncIterator[Notifier]:
    settings = UpstreamSettings(
        smarthosts=(Smarthost("127.0.0.1", upstream.port, tls="none"),), timeout=5
    )
    relay = Relay(settings, "gateway.test")
    yield Notifier(store, relay, SENDER, "gateway.test")
    await relay.close()


def subjects(upstream: FakeUpstream) -> list[str]:
    return [str(parse(m.content)["Subject"]) for m in upstream.messages]


async def test_decision_notices_one_per_policy_with_the_decisions_action(
    upstream: FakeUpstream, notifier: Notifier
) -> None:
    decision = Decision(
        Action.HOLD,
        Phase.ENFORCE,
        "Remove TikTok.",
        "v1",
        matches=(
            Match("ban-tiktok", Action.HOLD, Phase.ENFORCE, "Remove TikTok."),
            Match("old-os", Action.WARN, Phase.ANNOUNCE, "Update iOS."),  # not the action
            Match("ban-vpn", Action.HOLD, Phase.ENFORCE, "Remove the VPN."),
        ),
    )
    await notifier.decision_notices(claims(), decision, NOW)
    await notifier.decision_notices(claims(), decision, NOW)  # once per device, policy, phase
    assert subjects(upstream) == ["Mail from phone-1 is being held"] * 2
    assert [m.recipients for m in upstream.messages] == [("alice@example.test",)] * 2
    assert [m.sender for m in upstream.messages] == [SENDER] * 2
    bodies = [parse(m.content).get_content() for m in upstream.messages]
    assert bodies == ["Remove TikTok.\r\n", "Remove the VPN.\r\n"]


async def test_decision_notices_only_for_warn_and_hold(
    upstream: FakeUpstream, notifier: Notifier
) -> None:
    for action in (Action.ALLOW, Action.DEFER, Action.REJECT):
        decision = Decision(
            action, Phase.ENFORCE, "m", "v1", matches=(Match("p", action, Phase.ENFORCE, "m"),)
        )
        await notifier.decision_notices(claims(), decision, NOW)
    assert upstream.messages == []


async def test_warn_notice_with_hostile_device_id_arrives_without_the_header(
    upstream: FakeUpstream, notifier: Notifier
) -> None:
    decision = Decision(
        Action.WARN,
        Phase.ANNOUNCE,
        HOSTILE_TEXT,
        "v1",
        matches=(Match("p", Action.WARN, Phase.ANNOUNCE, HOSTILE_TEXT),),
    )
    await notifier.decision_notices(claims(HOSTILE_DEVICE), decision, NOW)
    (received,) = upstream.messages
    message = parse(received.content)
    assert message.get_all("Bcc") is None
    assert message.get_all("To") == ["alice@example.test"]
    assert received.recipients == ("alice@example.test",)


async def test_released_notices_one_per_policy(upstream: FakeUpstream, notifier: Notifier) -> None:
    await notifier.released_notices(held_message(policy_ids=("ban-tiktok", "ban-vpn")), NOW)
    assert subjects(upstream) == ["Held mail from phone-1 has been sent"] * 2
    text = (
        "Mail held from your device phone-1 by policy ban-tiktok, ban-vpn has now been sent: "
        "the device complies, or the policy was lifted."
    )
    for received in upstream.messages:
        assert parse(received.content).get_content().split() == text.split()


async def test_a_refused_notice_is_logged_not_raised_and_tried_again(
    upstream: FakeUpstream, notifier: Notifier
) -> None:
    upstream.faults.mail_reply = "451 4.3.0 try later"
    await notifier.released_notices(held_message(), NOW)  # does not raise
    assert upstream.messages == []
    upstream.faults.mail_reply = None
    await notifier.released_notices(held_message(), NOW)  # not remembered as sent: sent now
    assert subjects(upstream) == ["Held mail from phone-1 has been sent"]


class BrokenRelay(Relay):
    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
        options: Sequence[str] = (),
    ) -> Delivery:
        raise RuntimeError("relay broke")


async def test_a_failing_relay_never_propagates(store: AsyncHoldStore) -> None:
    relay = BrokenRelay(UpstreamSettings(smarthosts=(Smarthost("127.0.0.1", 9),)), "gw")
    notifier = Notifier(store, relay, SENDER, "gateway.test")
    decision = Decision(
        Action.WARN,
        Phase.ANNOUNCE,
        "m",
        "v1",
        matches=(Match("p", Action.WARN, Phase.ANNOUNCE, "m"),),
    )
    await notifier.decision_notices(claims(), decision, NOW)
    await notifier.released_notices(held_message(), NOW)
    # Not remembered as sent, so the next chance tries again.
    assert await store.claim_notice("phone-1", "p", "warn", NOW)
    assert await store.claim_notice("phone-1", "p1", "released", NOW)
