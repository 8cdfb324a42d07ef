"""`gateway demo`: the story of SPEC s 1, played end to end on loopback.

A real gateway, a recording upstream and scripted devices, all in this process. The clock
is simulated so the story's dates (July 2020) can be replayed any day; everything else is
real: SMTP sessions over sockets, signed tokens, TOML files edited on disk and reloaded.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from gateway.testing.device import FakeDevice, make_message
from gateway.testing.harness import running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

STORY_POLICY_FILE = "remove-tiktok.toml"
TIKTOK = "com.zhiliaoapp.musically"
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
    async with FakeUpstream.running() as upstream:
        config = write_config(
            workdir,
            issuer=issuer,
            upstream_port=upstream.port,
            policies={STORY_POLICY_FILE: story_policy()},
        )
        policy_path = workdir / "policies" / STORY_POLICY_FILE
        async with running_gateway(config, clock=clock) as gateway:
            phone = FakeDevice(
                issuer,
                user="alice@example.test",
                device_id="alice-iphone",
                apps={TIKTOK, "com.apple.mobilesafari"},
            )
            laptop = FakeDevice(
                issuer,
                user="alice@example.test",
                device_id="alice-macbook",
                device_class="desktop",
                platform="macos",
                apps={TIKTOK},
            )
            bobs_phone = FakeDevice(
                issuer,
                user="bob@example.test",
                device_id="bob-pixel",
                platform="android",
                apps={"com.android.chrome"},
            )

            async def send(device: FakeDevice, label: str, what: str, expected: str) -> None:
                result = await device.send(
                    gateway.port,
                    at=clock.now,
                    recipients=["team@example.test"],
                    message=make_message(
                        subject=what, sender=device.user, recipient="team@example.test"
                    ),
                )
                reply = result.data or result.mail or result.auth or (0, "no reply")
                step = Step(
                    clock.now.strftime("%a %d %b %H:%M %Z"),
                    label,
                    what,
                    expected,
                    f"{reply[0]} {reply[1]}",
                )
                steps.append(step)
                out(
                    f"  {step.when:<22} {label:<24} {what:<34} -> {step.got}  {'ok' if step.ok else 'UNEXPECTED'}"
                )

            out("Compliance Gateway demo: the TikTok ban of 10-Jul-2020 and its retraction")
            out(
                f"  gateway on 127.0.0.1:{gateway.port}, upstream on 127.0.0.1:{upstream.port}, policies in {policy_path.parent}"
            )
            out("")
            out("Thursday morning: the ban is written but not yet announced.")
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "mail before the announcement",
                "250 2.0.0 Message accepted",
            )
            clock.now = datetime(2020, 7, 10, 9, 30, tzinfo=PACIFIC)
            out("Friday 09:00: the ban is announced; phones with TikTok are warned.")
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "mail during the warning period",
                "250 2.0.0 Message accepted. NOTICE",
            )
            await send(
                laptop, "Alice's MacBook", "laptop mail", "250 2.0.0 Message accepted for delivery"
            )
            clock.now = datetime(2020, 7, 11, 0, 30, tzinfo=PACIFIC)
            out("Friday 23:59: the deadline passes; phones with TikTok lose mobile mail.")
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "mail after the deadline",
                "451 4.7.1 Remove TikTok",
            )
            await send(
                laptop,
                "Alice's MacBook",
                "laptop mail (unaffected)",
                "250 2.0.0 Message accepted for delivery",
            )
            await send(
                bobs_phone,
                "Bob's Pixel (no TikTok)",
                "phone mail without the app",
                "250 2.0.0 Message accepted for delivery",
            )
            clock.now = datetime(2020, 7, 11, 2, 0, tzinfo=PACIFIC)
            out("Saturday 02:00: 'sent in error': the admin retracts the ban with a TOML edit.")
            policy_path.write_text(
                policy_path.read_text().replace(
                    'state = "enforce"', 'state = "retracted"\nretracted_reason = "sent in error"'
                )
            )
            result = gateway.server.reload("demo-edit")
            out(
                f"  reload: version {result.version}, retracted {list(result.diff.retracted)}, took {result.duration_seconds * 1000:.1f} ms"
            )
            await send(
                phone,
                "Alice's iPhone (TikTok)",
                "mail after the retraction",
                "250 2.0.0 Message accepted for delivery",
            )
            clock.now += timedelta(minutes=1)
        out("")
        out(f"The upstream received {len(upstream.messages)} message(s):")
        for message in upstream.messages:
            subject = next(
                (line for line in message.headers.splitlines() if line.startswith("Subject:")), ""
            )
            notice = (
                " [with X-Compliance-Notice]" if "X-Compliance-Notice:" in message.headers else ""
            )
            out(f"  from {message.sender:<22} {subject}{notice}")
    return steps


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
