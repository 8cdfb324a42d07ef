"""Relay.deliver: one whole message upstream, with per-recipient outcomes (real sockets)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.settings import Smarthost, UpstreamSettings
from gateway.replies import Reply
from gateway.testing.upstream import FakeUpstream
from gateway.upstream.relay import DATA_CHUNK, Relay, Target, crlf_only, dot_stuffed

MESSAGE = b"From: alice@example.test\r\nSubject: hello\r\n\r\nHello, Bob.\r\n"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.running() as running:
        yield running


@pytest.fixture
async def relay(upstream: FakeUpstream) -> AsyncIterator[Relay]:
    settings = UpstreamSettings(
        smarthosts=(Smarthost("127.0.0.1", upstream.port, tls="none"),), timeout=5
    )
    relay = Relay(settings, "gateway.test")
    yield relay
    await relay.close()


async def test_one_of_two_recipients_refused(upstream: FakeUpstream, relay: Relay) -> None:
    upstream.faults.rcpt_replies["carol@example.test"] = "550 5.1.1 no such user"
    delivery = await relay.deliver(
        "alice@example.test", ["bob@example.test", "carol@example.test"], MESSAGE
    )
    assert delivery.mail.is_success
    assert delivery.accepted == ("bob@example.test",)
    assert delivery.refused == (
        ("carol@example.test", Reply(550, "5.1.1", "upstream: no such user")),
    )
    assert delivery.data == Reply(250, "2.0.0", "upstream: queued as 1")
    assert delivery.reply == delivery.data
    (received,) = upstream.messages
    assert received.sender == "alice@example.test"
    assert received.recipients == ("bob@example.test",)
    assert received.content == MESSAGE


async def test_all_recipients_refused_sends_no_data(upstream: FakeUpstream, relay: Relay) -> None:
    upstream.faults.rcpt_replies["bob@example.test"] = "450 4.2.1 mailbox busy"
    upstream.faults.rcpt_replies["carol@example.test"] = "550 5.1.1 no such user"
    delivery = await relay.deliver(
        "alice@example.test", ["bob@example.test", "carol@example.test"], MESSAGE
    )
    assert delivery.accepted == ()
    assert [recipient for recipient, _ in delivery.refused] == [
        "bob@example.test",
        "carol@example.test",
    ]
    assert delivery.data is None  # DATA was never sent
    assert delivery.reply == Reply(550, "5.1.1", "upstream: no such user")  # the last refusal
    assert upstream.messages == []
    # The transaction was ended (RSET): the next message reuses the pooled connection.
    upstream.faults.rcpt_replies.clear()
    assert (
        await relay.deliver("alice@example.test", ["bob@example.test"], MESSAGE)
    ).reply.is_success
    assert upstream.connections == 1
    assert len(upstream.messages) == 1


@pytest.mark.parametrize(
    ("fault", "reply"),
    [
        ("550 5.7.1 sender refused", Reply(550, "5.7.1", "upstream: sender refused")),
        ("451 4.3.0 try later", Reply(451, "4.3.0", "upstream: try later")),
    ],
)
async def test_mail_refused_is_the_reply(
    upstream: FakeUpstream, relay: Relay, fault: str, reply: Reply
) -> None:
    upstream.faults.mail_reply = fault
    delivery = await relay.deliver("alice@example.test", ["bob@example.test"], MESSAGE)
    assert delivery.mail == reply
    assert delivery.accepted == ()
    assert delivery.refused == ()  # no recipient was tried
    assert delivery.data is None
    assert delivery.reply == reply
    assert upstream.messages == []


async def test_no_recipients_gives_the_mail_reply(upstream: FakeUpstream, relay: Relay) -> None:
    # What Releaser._relay always returned in this case; kept as it was.
    delivery = await relay.deliver("alice@example.test", [], MESSAGE)
    assert delivery.data is None
    assert delivery.reply == delivery.mail
    assert upstream.messages == []


async def test_mx_mode_routes_each_recipient_by_domain(upstream: FakeUpstream) -> None:
    no_mx = Reply(550, "5.1.2", "no mail server for b.test")
    asked: list[str] = []

    async def route(domain: str) -> Sequence[Target] | Reply:
        asked.append(domain)
        return [Target("127.0.0.1", upstream.port)] if domain == "a.test" else no_mx

    relay = Relay(UpstreamSettings(mode="mx", timeout=5), "gateway.test", mx_router=route)
    try:
        delivery = await relay.deliver(
            "alice@example.test", ["bob@a.test", "carol@b.test", "dave@a.test"], MESSAGE
        )
    finally:
        await relay.close()
    assert set(asked) == {"a.test", "b.test"}
    assert delivery.accepted == ("bob@a.test", "dave@a.test")
    assert delivery.refused == (("carol@b.test", no_mx),)
    assert delivery.reply.is_success
    (received,) = upstream.messages
    assert received.recipients == ("bob@a.test", "dave@a.test")


@pytest.mark.parametrize(
    "parts",
    [
        (b"",),
        (b"Subject: x\r\n\r\n.\r\n..two\r\n",),
        (b".starts with a dot\r\nno final CRLF",),
        (b"Received: x\r\n", b".dot at the start of the second part\r\n.\r\n"),
        (b"a\r\n", bytearray(b"x" * (2 * DATA_CHUNK + 5) + b"\r\n.y\r\n")),
    ],
)
def test_the_data_stream_is_dot_stuffed_without_copying_the_message(
    parts: tuple[bytes | bytearray, ...],
) -> None:
    pieces = list(dot_stuffed(parts))
    assert all(len(piece) <= DATA_CHUNK for piece in pieces)
    message = b"".join(parts)
    expected = re.sub(rb"(?m)^\.", b"..", message)
    if not expected.endswith(b"\r\n") and expected:
        expected += b"\r\n"
    assert b"".join(pieces) == expected + b".\r\n"  # as aiosmtplib's data() would send


def test_bare_line_endings_are_made_crlf_before_streaming() -> None:
    crlf = b"a\r\nb\r\n"
    assert crlf_only(crlf) is crlf  # no copy when there is nothing to change
    assert crlf_only(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n"


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\r", b"x", b"."]), max_size=40))
def test_crlf_only_makes_every_line_ending_crlf_and_copies_only_when_needed(
    pieces: list[bytes],
) -> None:
    content = b"".join(pieces)
    result = crlf_only(content)
    assert result == re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    if re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None:
        assert result is content
