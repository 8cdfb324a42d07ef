"""`gateway demo`: the story of SPEC s 1, played end to end on loopback.

A real gateway, a recording upstream and scripted devices, all in this process. The clock
is simulated so the story's dates (July 2020) can be replayed any day; everything else is
real: SMTP sessions over sockets, signed tokens, TOML files edited on disk and reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.testing.device import FakeDevice, make_message
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


def story_policy() -> str:
    """The shipped ban (config/policies/remove-tiktok.toml), kept identical by a test."""
    return (Path(__file__).parent / "story" / STORY_POLICY_FILE).read_text()


async def play(workdir: Path, out: Callable[[str], None] = print) -> list[Step]:
    issuer = TestIssuer.generate("demo-1")
    clock = SimulatedClock(datetime(2020, 7, 10, 8, 0, tzinfo=PACIFIC))
    steps: list[Step] = []

    def record(label: str, what: str, expected: str, got: str) -> None:
        step = Step(clock.now.strftime("%a %d %b %H:%M"), label, what, expected, got)
        steps.append(step)
        verdict = "ok" if step.ok else "UNEXPECTED"
        out(f"  {step.when:<17} {label:<26} {what:<30} -> {_short(got)}  {verdict}")

    async with FakeUpstream.running() as upstream:
        policies = {STORY_POLICY_FILE: story_policy()}
        config = write_config(
            workdir, issuer=issuer, upstream_port=upstream.port, policies=policies
        )
        policy_path = workdir / "policies" / STORY_POLICY_FILE
        async with running_gateway(config, clock=clock) as gateway:

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
            out("")
            out("Friday 08:00: the ban is written but not yet announced.")
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "before the announcement",
                "250 2.0.0 Message accepted",
            )
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
            await send(
                laptop,
                "Alice's MacBook",
                "laptop mail (unaffected)",
                "250 2.0.0 Message accepted for delivery",
            )
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


def _short(reply: str, width: int = 58) -> str:
    return reply if len(reply) <= width else reply[: width - 3] + "..."


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as directory:
        steps = asyncio.run(play(Path(directory)))
    failed = [s for s in steps if not s.ok]
    print("")
    print(
        "Every step behaved as the story says."
        if not failed
        else f"{len(failed)} step(s) did not behave as expected."
    )
    return 0 if not failed else 1
