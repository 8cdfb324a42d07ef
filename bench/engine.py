"""Engine benchmark: µs per decision for 10, 1,000 and 10,000 policies with a 200-app token.

    python -m bench.engine [--rounds 7] [--calls 2000] [--access send|sync] [--narrowed 0.2]

Policies are a realistic mix: app bans (each naming 1-3 apps) make up the bulk, with
2% user and 2% device-id policies (lost phones), plus a fixed 20 platform/OS-minimum
policies: an organisation writes a few of those, not thousands. The token lists 200 apps, a few of
which are banned, so every decision does real work. Prints medians of several rounds.
``--narrowed F`` narrows a fraction F of the policies to sending or to syncing (half each,
``scope.access``), to measure the per-candidate access check; ``--access`` is the access
decided for.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime, timedelta

from gateway.domain import Access, Action, Device, DeviceClaims, DeviceClass, Platform, PolicyState
from gateway.policy.engine import compile_policy_set, decide
from gateway.policy.model import Conditions, Policy, PolicySet
from gateway.policy.versions import parse_range

NOW = datetime(2020, 7, 11, 10, tzinfo=UTC)


def make_policies(count: int, rng: random.Random, narrowed: float = 0.0) -> PolicySet:
    # A separate generator, so that --narrowed 0 builds exactly the policies it always did.
    narrowing = random.Random(count + 1)
    policies = []
    for i in range(count):
        kind = rng.random()
        if i < min(20, count // 2):
            platform = (Platform.ANDROID, Platform.IOS)[i % 2]
            match = Conditions(
                platforms=frozenset({platform}), os_version=parse_range(f"<{rng.randint(5, 12)}")
            )
        elif kind < 0.96:
            match = Conditions(
                apps_any=frozenset(
                    f"com.vendor{rng.randrange(count * 2)}.app" for _ in range(rng.randint(1, 3))
                )
            )
        elif kind < 0.98:
            match = Conditions(device_ids=frozenset({f"lost-{i}"}))
        else:
            match = Conditions(users=frozenset({f"user{i}@example.test"}))
        policies.append(
            Policy(
                id=f"p{i:05d}",
                action=rng.choice(list(Action)[1:]),
                state=PolicyState.ENFORCE if rng.random() < 0.9 else PolicyState.AUDIT,
                message=f"policy {i}",
                match=match,
                scope=Conditions(
                    device_classes=frozenset({DeviceClass.MOBILE, DeviceClass.TABLET})
                ),
                announce_at=NOW - timedelta(days=2),
                enforce_at=NOW - timedelta(days=1)
                if rng.random() < 0.5
                else NOW + timedelta(days=1),
                access=frozenset({narrowing.choice(list(Access))})
                if narrowing.random() < narrowed
                else frozenset(Access),
            )
        )
    return PolicySet(tuple(policies), version="bench")


def make_claims(count: int, rng: random.Random) -> DeviceClaims:
    apps = {f"com.vendor{rng.randrange(count * 2)}.app" for _ in range(5)}  # a few banned ones
    while len(apps) < 200:
        apps.add(f"com.harmless{len(apps)}.app")
    return DeviceClaims(
        issuer="https://mdm.example.test",
        subject="alice@example.test",
        audience=("gw",),
        issued_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        device=Device(
            "phone-1", Platform.ANDROID, DeviceClass.MOBILE, model="Pixel 8", os_version="14"
        ),
        apps=frozenset(apps),
        posture={"jailbroken": False},
    )


def measure(
    policy_count: int, rounds: int, calls: int, access: Access = Access.SEND, narrowed: float = 0.0
) -> tuple[float, float, str]:
    rng = random.Random(policy_count)
    compiled = compile_policy_set(make_policies(policy_count, rng, narrowed))
    claims = make_claims(policy_count, rng)
    decision = decide(compiled, claims, NOW, access)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            decide(compiled, claims, NOW, access)
        samples.append((time.perf_counter() - start) / calls)
    median = statistics.median(samples)
    return median * 1e6, 1 / median, f"{decision.action.label} ({len(decision.matches)} matches)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--access", choices=[a.value for a in Access], default="send")
    parser.add_argument(
        "--narrowed", type=float, default=0.0, help="fraction of policies narrowed by access"
    )
    args = parser.parse_args()
    access = Access(args.access)
    print(f"access: {access.value}, narrowed: {args.narrowed:.0%} of the policies")
    print(f"{'policies':>9} {'µs/decision (median)':>22} {'decisions/s':>12}  decision")
    results = {}
    for count in (10, 1_000, 10_000):
        micros, per_second, outcome = measure(count, args.rounds, args.calls, access, args.narrowed)
        results[count] = micros
        print(f"{count:>9} {micros:>22.2f} {per_second:>12,.0f}  {outcome}")
    print(
        f"ratio 10,000 / 10 policies: {results[10_000] / results[10]:.2f}x   target: <= 20 µs at 10,000 -> "
        f"{'met' if results[10_000] <= 20 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
