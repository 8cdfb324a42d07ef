"""`gateway demo`: the story of SPEC s 1, played end to end on loopback.

A real gateway, a recording upstream and scripted devices, all in this process. The clock
is simulated so the story's dates (July 2020) can be replayed any day; everything else is
real: SMTP sessions over sockets, signed tokens, TOML files edited on disk and reloaded.

At each step the phones also sync, and the demo shows what their mail app sees: by
default from the gateway's sync endpoint, asked exactly as Dovecot asks it (the refusal
check, then introspection); with ``--dovecot`` (Dovecot installed) through a real Dovecot
started from deploy/dovecot/, with IMAP logins, the notices it delivers over LMTP and the
sessions it ends after the retraction.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import secrets
import smtplib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import aiohttp

from gateway.testing.device import FakeDevice, make_message
from gateway.testing.dovecot import DovecotPorts, TemporaryDovecot, temporary_dovecot
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

STORY_POLICY_FILE = "remove-tiktok.toml"
TIKTOK = "com.zhiliaoapp.musically"
TRILL = "com.ss.android.ugc.trill"
PACIFIC = datetime.fromisoformat("2020-07-10T00:00:00-07:00").tzinfo


class SimulatedClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Step:
    when: str
    who: str
    what: str
    expected: str
    got: str

    @property
    def ok(self) -> bool:
        return self.got.startswith(self.expected)


class MailApp(Protocol):
    """How a phone's mail app syncs: what it sees, as one line."""

    async def sync(self, user: str, token: str) -> str: ...


class EndpointView:
    """The two questions Dovecot's passdb chain asks the sync endpoint, and what the
    mail app then sees."""

    def __init__(self, client: aiohttp.ClientSession) -> None:
        self.client = client

    async def _ask(self, path: str, token: str) -> tuple[int, dict[str, object]]:
        headers = {"X-Dovecot-Auth-Service": "imap", "X-Dovecot-Auth-Remote": "127.0.0.1"}
        async with self.client.post(path, data={"token": token}, headers=headers) as response:
            return response.status, await response.json()

    async def sync(self, user: str, token: str) -> str:
        _, refusal = await self._ask("/oauth2/refusal", token)
        if refusal.get("active"):
            return f"refused: NO [CONTACTADMIN] {refusal.get('reason', '')}"
        status, answer = await self._ask("/oauth2/introspect", token)
        if status == 503:
            return "refused for now: NO [UNAVAILABLE]"
        if not answer.get("active"):
            return "refused: NO [AUTHENTICATIONFAILED]"
        mailbox = answer.get("mailbox_user")
        if mailbox != user:
            return f"quarantine mailbox ({mailbox}): only the notice saying what to do"
        if answer.get("decision") == "warn":
            return f"inbox, warned: {answer.get('reason', '')}"
        return "inbox"


class DovecotView:
    """A real IMAP LOGIN with the token as the password, through Dovecot; the subjects in
    the INBOX it opens (the quarantine mailbox's for a held phone)."""

    def __init__(self, dovecot: TemporaryDovecot) -> None:
        self.dovecot = dovecot

    def _login(self, user: str, token: str) -> str:
        imap = imaplib.IMAP4("127.0.0.1", self.dovecot.ports.imap, timeout=10)
        try:
            imap.login(user, token)
        except imaplib.IMAP4.error as refused:
            imap.shutdown()
            text = refused.args[0]
            return f"refused: NO {text.decode() if isinstance(text, bytes) else text}"
        try:
            _, data = imap.select("INBOX", readonly=True)
            count = int(data[0] or b"0")
            subjects = []
            for number in range(1, count + 1):
                _, parts = imap.fetch(str(number), "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                header = parts[0]
                if isinstance(header, tuple):
                    subjects.append(header[1].decode().strip().removeprefix("Subject: "))
        finally:
            imap.logout()
        where = "inbox" if f"user=<{user}>" in self._last_login() else "quarantine mailbox"
        return f"{where}: {' | '.join(subjects) or '(empty)'}"

    def _last_login(self) -> str:
        logins = [line for line in self.dovecot.log_text().splitlines() if "Login: user=" in line]
        return logins[-1] if logins else ""

    async def sync(self, user: str, token: str) -> str:
        async with asyncio.timeout(30):
            return await asyncio.to_thread(self._login, user, token)

    def deliver(self, to: str, subject: str) -> None:
        """A message into a real inbox, through Dovecot's LMTP (as the MTA would)."""
        message = EmailMessage()
        message["From"] = "finance@example.test"
        message["To"] = to
        message["Subject"] = subject
        message.set_content("The figures are attached.\n")
        with smtplib.LMTP("127.0.0.1", self.dovecot.ports.lmtp, timeout=10) as lmtp:
            lmtp.send_message(message, to_addrs=[to])


#: What the mail app is expected to see, by view: (endpoint, Dovecot).
EXPECT = {
    "inbox": ("inbox", "inbox: Quarterly figures"),
    "warned": ("inbox, warned: Remove TikTok", "inbox: Quarterly figures | Action required"),
    "quarantine": ("quarantine mailbox", "quarantine mailbox: Your mailbox is not available"),
}


def story_policy() -> str:
    """The shipped ban (config/policies/remove-tiktok.toml), kept identical by a test."""
    return (Path(__file__).parent / "story" / STORY_POLICY_FILE).read_text()


async def play(
    workdir: Path, out: Callable[[str], None] = print, *, dovecot: bool = False
) -> list[Step]:
    """Play the story; ``dovecot``: the sync half through a real Dovecot (installed)."""
    issuer = TestIssuer.generate("demo-1")
    clock = SimulatedClock(datetime(2020, 7, 10, 8, 0, tzinfo=PACIFIC))
    steps: list[Step] = []

    def record(label: str, what: str, expected: str, got: str) -> None:
        step = Step(clock.now.strftime("%a %d %b %H:%M"), label, what, expected, got)
        steps.append(step)
        verdict = "ok" if step.ok else "UNEXPECTED"
        out(f"  {step.when:<17} {label:<26} {what:<30} -> {_short(got)}  {verdict}")

    async with FakeUpstream.running() as upstream, contextlib.AsyncExitStack() as stack:
        policies = {STORY_POLICY_FILE: story_policy()}
        ports = DovecotPorts.free() if dovecot else None
        api_key = secrets.token_urlsafe(16)
        sync: dict[str, object] = {}
        if ports is not None:  # notices over LMTP, sessions ended through doveadm
            _write_secret(workdir / "doveadm-api-key", api_key)
            sync = {
                "lmtp": f"127.0.0.1:{ports.lmtp}",
                "doveadm_url": f"http://127.0.0.1:{ports.doveadm_http}/doveadm/v1",
                "doveadm_api_key_file": "doveadm-api-key",
            }
        config = write_config(
            workdir, issuer=issuer, upstream_port=upstream.port, policies=policies, sync=sync
        )
        policy_path = workdir / "policies" / STORY_POLICY_FILE
        async with running_gateway(config, clock=clock) as gateway:
            app: MailApp
            column = 1 if ports is not None else 0
            if ports is not None:
                server = await stack.enter_async_context(
                    temporary_dovecot(
                        gateway_url=f"http://127.0.0.1:{gateway.sync_port}/",
                        client_secret="demo",  # noqa: S106  # on loopback: not checked
                        ports=ports,
                        doveadm_api_key=api_key,
                    )
                )
                view = DovecotView(server)
                for user in ("alice@example.test", "carol@example.test"):
                    await asyncio.to_thread(view.deliver, user, "Quarterly figures")
                app = view
            else:
                client = await stack.enter_async_context(
                    aiohttp.ClientSession(
                        base_url=f"http://127.0.0.1:{gateway.sync_port}",
                        timeout=aiohttp.ClientTimeout(total=10),
                    )
                )
                app = EndpointView(client)

            def device(user: str, device_id: str, apps: set[str], **kind: str) -> FakeDevice:
                return FakeDevice(issuer, user=user, device_id=device_id, apps=apps, **kind)  # type: ignore[arg-type]

            phone = device("alice@example.test", "alice-iphone", {TIKTOK, "com.apple.mobilesafari"})
            laptop = device(
                "alice@example.test",
                "alice-macbook",
                {TIKTOK},
                device_class="desktop",
                platform="macos",
            )
            carols = device("carol@example.test", "carol-galaxy", {TRILL}, platform="android")
            bobs = device(
                "bob@example.test", "bob-pixel", {"com.android.chrome"}, platform="android"
            )

            async def send(who: FakeDevice, label: str, what: str, expected: str) -> None:
                result = await who.send(
                    gateway.port,
                    at=clock.now,
                    recipients=["team@example.test"],
                    message=make_message(
                        subject=what, sender=who.user, recipient="team@example.test"
                    ),
                )
                reply = result.data or result.mail or result.auth or (0, "no reply")
                record(label, what, expected, f"{reply[0]} {reply[1]}")

            async def syncs(who: FakeDevice, label: str, expected: str) -> None:
                """What the device's mail app sees when it syncs now."""
                got = await app.sync(who.user, who.token(at=clock.now))
                record(label, "syncs (IMAP)", EXPECT[expected][column], got)

            async def delivered(count: int, what: str) -> None:
                with contextlib.suppress(TimeoutError):
                    await upstream.wait_for(count, timeout=10)
                record(
                    "upstream", what, f"{count} delivered", f"{len(upstream.messages)} delivered"
                )

            out(
                "Compliance Gateway demo: the TikTok ban of 10-Jul-2020 and its retraction (US Pacific time)"
            )
            out(
                f"  gateway 127.0.0.1:{gateway.port}, upstream 127.0.0.1:{upstream.port}, policies {policy_path.parent}"
            )
            out(
                f"  mail apps sync through a real Dovecot (IMAP 127.0.0.1:{ports.imap})"
                if ports is not None
                else f"  mail apps sync: answers of the sync endpoint 127.0.0.1:{gateway.sync_port}"
                " (what Dovecot asks at each login; --dovecot for a real one)"
            )
            out("")
            out("Friday 08:00: the ban is written but not yet announced.")
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "before the announcement",
                "250 2.0.0 Message accepted",
            )
            await syncs(phone, "Alice's iPhone (TikTok)", "inbox")
            clock.now = datetime(2020, 7, 10, 9, 30, tzinfo=PACIFIC)
            out(
                "Friday 09:00: the ban is announced; phones with TikTok are warned, laptops are not."
            )
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "during the warning period",
                "250 2.0.0 Message accepted. NOTICE",
            )
            await syncs(phone, "Alice's iPhone (TikTok)", "warned")
            await send(
                laptop, "Alice's MacBook", "laptop mail", "250 2.0.0 Message accepted for delivery"
            )
            clock.now = datetime(2020, 7, 11, 0, 30, tzinfo=PACIFIC)
            out("Friday 23:59: the deadline passes; mail from phones with TikTok is held, durably.")
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "after the deadline",
                "250 2.6.0 held: Remove TikTok",
            )
            await send(
                carols,
                "Carol's Galaxy (TikTok)",
                "after the deadline",
                "250 2.6.0 held: Remove TikTok",
            )
            await syncs(phone, "Alice's iPhone (TikTok)", "quarantine")
            await syncs(carols, "Carol's Galaxy (TikTok)", "quarantine")
            await send(
                laptop,
                "Alice's MacBook",
                "laptop mail (unaffected)",
                "250 2.0.0 Message accepted for delivery",
            )
            await syncs(laptop, "Alice's MacBook", "inbox")
            await send(
                bobs,
                "Bob's Pixel (no TikTok)",
                "phone without the app",
                "250 2.0.0 Message accepted for delivery",
            )
            await delivered(5, "held mail stays held")
            clock.now = datetime(2020, 7, 11, 1, 15, tzinfo=PACIFIC)
            out("Saturday 01:15: Alice removes TikTok; her next connection releases her held mail.")
            phone.remove(TIKTOK)
            await send(
                phone,
                "Alice's iPhone (no TikTok)",
                "after removing the app",
                "250 2.0.0 Message accepted for delivery",
            )
            await syncs(phone, "Alice's iPhone (no TikTok)", "inbox")
            await delivered(7, "Alice's held mail released")
            clock.now = datetime(2020, 7, 11, 2, 0, tzinfo=PACIFIC)
            out("Saturday 02:00: 'sent in error': the admin retracts the ban with a TOML edit.")
            retraction = 'state = "retracted"\nretracted_reason = "sent in error"'
            policy_path.write_text(policy_path.read_text().replace('state = "enforce"', retraction))
            result = await gateway.server.reload("demo-edit")
            out(
                f"  reload: version {result.version}, retracted {list(result.diff.retracted)}, "
                f"{result.duration_seconds * 1000:.1f} ms"
            )
            await delivered(8, "Carol's held mail released")
            await send(
                carols,
                "Carol's Galaxy (TikTok)",
                "after the retraction",
                "250 2.0.0 Message accepted for delivery",
            )
            await syncs(carols, "Carol's Galaxy (TikTok)", "inbox")
        out("")
        out(f"The upstream received {len(upstream.messages)} message(s), in this order:")
        for message in upstream.messages:
            subject = next(
                (line for line in message.headers.splitlines() if line.startswith("Subject:")), ""
            )
            notice = (
                " [with X-Compliance-Notice]" if "X-Compliance-Notice:" in message.headers else ""
            )
            out(f"  from {message.sender:<20} {subject}{notice}")
    return steps


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")


def _short(reply: str, width: int = 58) -> str:
    return reply if len(reply) <= width else reply[: width - 3] + "..."


def run_demo(*, dovecot: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as directory:
        steps = asyncio.run(play(Path(directory), dovecot=dovecot))
    failed = [s for s in steps if not s.ok]
    print("")
    print(
        "Every step behaved as the story says."
        if not failed
        else f"{len(failed)} step(s) did not behave as expected."
    )
    return 0 if not failed else 1
