"""A hypothesis state machine drives real SMTP sessions against a running gateway and
checks every reply code against a model of the protocol; the upstream must hold exactly
the messages the model says were accepted."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from hypothesis.strategies import sampled_from

from gateway.smtp.sasl import plain_response
from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

MAX_RECIPIENTS = 3
UNKNOWN_COMMAND_BUDGET = 5  # aiosmtpd's BOGUS_LIMIT: the 5th unknown command gets 502 and close


@dataclass
class Running:
    port: int
    issuer: TestIssuer
    upstream: FakeUpstream


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One gateway for every example, on its own loop in a thread (the machine is sync)."""
    issuer = TestIssuer.generate("k1")
    ready: list[Running] = []
    started = threading.Event()
    stop: asyncio.Event | None = None
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        directory: Path = tmp_path_factory.mktemp("state-machine")
        limits = {
            "max_errors": 100_000,
            "auth_failures_per_session": 100_000,
            "auth_failure_delay_seconds": 0,
        }
        smtp = {"max_recipients": MAX_RECIPIENTS}
        async with gateway_with_upstream(directory, issuer, smtp=smtp, limits=limits) as (gw, up):
            ready.append(Running(gw.port, issuer, up))
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    yield ready[0]
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def reply(self) -> int:
        while True:
            line = self.file.readline()
            if not line:
                return 0
            if line[3:4] != b"-":
                return int(line[:3])

    def command(self, line: bytes) -> int:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_smtp_sessions_follow_the_model(running: Running) -> None:
    good_token = FakeDevice(running.issuer).token()
    bad_token = FakeDevice(TestIssuer.generate("k1")).token()  # untrusted key

    class Sessions(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.accepted_before = len(running.upstream.messages)
            self.accepted = 0
            self.client: Client | None = None
            self.connect()

        def connect(self) -> None:
            self.client = Client(running.port)
            assert self.client.reply() == 220
            self.greeted = self.authenticated = False
            self.in_mail = False
            self.recipients = 0
            self.unknown_commands = 0

        def send(self, line: bytes) -> int:
            assert self.client is not None
            return self.client.command(line)

        def teardown(self) -> None:
            if self.client is not None:
                self.client.close()

        @rule()
        def ehlo(self) -> None:
            assert self.send(b"EHLO model.test") == 250
            self.greeted = True
            self.in_mail, self.recipients = False, 0

        @rule(good=sampled_from([True, False]))
        def auth(self, good: bool) -> None:
            token = good_token if good else bad_token
            blob = base64.b64encode(plain_response("alice@example.test", token))
            code = self.send(b"AUTH PLAIN " + blob)
            if not self.greeted:
                # Before EHLO, RFC 5321's 512-octet line limit applies to AUTH too, and a
                # real token is longer: 500, not the 503 a short AUTH line would get.
                assert code == 500
            elif self.authenticated:
                assert code == 503
            elif good:
                assert code == 235
                self.authenticated = True
            else:
                assert code == 535

        @rule(own=sampled_from([True, False]))
        def mail(self, own: bool) -> None:
            sender = b"alice@example.test" if own else b"mallory@example.test"
            code = self.send(b"MAIL FROM:<" + sender + b">")
            if not self.greeted:
                assert code == 503
            elif not self.authenticated:
                assert code == 530
            elif self.in_mail:
                assert code == 503
            elif own:
                assert code == 250
                self.in_mail = True
            else:
                assert code == 553

        @rule()
        def rcpt(self) -> None:
            code = self.send(b"RCPT TO:<bob@example.test>")
            if not self.greeted:
                assert code == 503
            elif not self.authenticated:
                assert code == 530
            elif not self.in_mail:
                assert code == 503
            elif self.recipients >= MAX_RECIPIENTS:
                assert code == 452
            else:
                assert code == 250
                self.recipients += 1

        @rule()
        def data(self) -> None:
            code = self.send(b"DATA")
            if not self.greeted:
                assert code == 503
            elif not self.authenticated:
                assert code == 530
            elif not self.in_mail or not self.recipients:
                assert code == 503
            else:
                assert code == 354
                assert self.client is not None
                self.client.sock.sendall(make_message(subject="model") + b".\r\n")
                assert self.client.reply() == 250
                self.accepted += 1
                self.in_mail, self.recipients = False, 0

        @rule()
        def rset(self) -> None:
            assert self.send(b"RSET") == 250
            self.in_mail, self.recipients = False, 0

        @rule(line=sampled_from([b"NOOP", b"XYZZY", b"", b"MAIL", b"RCPT TO:", b"VRFY x"]))
        def odd(self, line: bytes) -> None:
            code = self.send(line)
            assert 0 < code < 600
            if line == b"NOOP":
                assert code == 250
            elif line == b"XYZZY":
                self.unknown_commands += 1
                if self.unknown_commands >= UNKNOWN_COMMAND_BUDGET:
                    assert code == 502
                    assert self.client is not None
                    assert self.client.reply() == 0  # closed
                    self.client.close()
                    self.connect()
                else:
                    assert code == 500
            elif line == b"":
                assert code == 500
            elif line != b"VRFY x":
                assert 500 <= code < 600

        @precondition(lambda self: self.client is not None)
        @rule()
        def quit_and_reconnect(self) -> None:
            assert self.send(b"QUIT") == 221
            assert self.client is not None
            self.client.close()
            self.connect()

        @invariant()
        def upstream_has_exactly_the_accepted(self) -> None:
            assert len(running.upstream.messages) - self.accepted_before == self.accepted

    run_state_machine_as_test(
        Sessions, settings=settings(settings.default, stateful_step_count=25, deadline=None)
    )
