"""The evaluator, by example: the story's ban at each moment, and each matcher."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.domain import (
    Access,
    Action,
    Device,
    DeviceClaims,
    DeviceClass,
    Phase,
    Platform,
    PolicyState,
)
from gateway.policy.engine import compile_policy_set, decide
from gateway.policy.model import Conditions, Exemptions, ModelPattern, Policy, PolicySet
from gateway.policy.versions import parse_range, parse_version

TIKTOK = "com.zhiliaoapp.musically"
ANNOUNCE = datetime(2020, 7, 10, 16, 0, tzinfo=UTC)
ENFORCE = datetime(2020, 7, 11, 6, 59, tzinfo=UTC)

BAN = Policy(
    id="remove-tiktok",
    action=Action.HOLD,
    state=PolicyState.ENFORCE,
    message="Remove TikTok.",
    match=Conditions(apps_any=frozenset({TIKTOK, "com.ss.android.ugc.trill"})),
    scope=Conditions(device_classes=frozenset({DeviceClass.MOBILE, DeviceClass.TABLET})),
    announce_at=ANNOUNCE,
    enforce_at=ENFORCE,
)


def claims(
    *,
    user: str = "alice@example.test",
    device_id: str = "phone-1",
    device_class: DeviceClass = DeviceClass.MOBILE,
    platform: Platform = Platform.IOS,
    apps: frozenset[str] = frozenset({TIKTOK}),
    model: str | None = None,
    os_version: str | None = None,
    posture: dict[str, bool] | None = None,
) -> DeviceClaims:
    now = datetime(2020, 7, 11, tzinfo=UTC)
    return DeviceClaims(
        issuer="https://mdm.example.test",
        subject=user,
        audience=("gw",),
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        device=Device(device_id, platform, device_class, model=model, os_version=os_version),
        apps=apps,
        posture=posture or {},
    )


def run(
    *policies: Policy,
    device: DeviceClaims,
    at: datetime,
    groups: dict[str, frozenset[str]] | None = None,
    access: Access = Access.SEND,
):  # type: ignore[no-untyped-def]
    policy_set = PolicySet(tuple(policies), version="v1", groups=groups or {})
    return decide(compile_policy_set(policy_set), device, at, access)


@pytest.mark.parametrize(
    ("at", "action", "phase"),
    [
        (ANNOUNCE - timedelta(seconds=1), Action.ALLOW, None),
        (ANNOUNCE, Action.WARN, Phase.ANNOUNCE),
        (ENFORCE - timedelta(seconds=1), Action.WARN, Phase.ANNOUNCE),
        (ENFORCE, Action.HOLD, Phase.ENFORCE),
    ],
)
def test_the_story_ban_through_time(at: datetime, action: Action, phase: Phase | None) -> None:
    decision = run(BAN, device=claims(), at=at)
    assert decision.action is action
    assert decision.phase is phase
    assert decision.policy_version == "v1"
    if action is Action.WARN:
        assert decision.message == "Remove TikTok. (enforced from 2020-07-11T06:59:00+00:00)"
        assert decision.policy_ids == ("remove-tiktok",)


@pytest.mark.parametrize("device_class", [DeviceClass.DESKTOP, DeviceClass.BROWSER])
def test_laptops_and_browsers_are_unaffected(device_class: DeviceClass) -> None:
    assert run(BAN, device=claims(device_class=device_class), at=ENFORCE).action is Action.ALLOW


def test_mobile_without_the_app_is_allowed() -> None:
    assert (
        run(BAN, device=claims(apps=frozenset({"com.apple.mobilesafari"})), at=ENFORCE).action
        is Action.ALLOW
    )


def test_retracted_and_draft_allow() -> None:
    for state in (PolicyState.RETRACTED, PolicyState.DRAFT):
        decision = run(replace(BAN, state=state), device=claims(), at=ENFORCE)
        assert decision.action is Action.ALLOW
        assert decision.audit == ()


def test_audit_allows_and_reports_the_would_be_hold() -> None:
    decision = run(replace(BAN, state=PolicyState.AUDIT), device=claims(), at=ENFORCE)
    assert decision.action is Action.ALLOW
    assert [(m.policy_id, m.action) for m in decision.audit] == [("remove-tiktok", Action.HOLD)]


def test_most_severe_wins_and_ties_break_by_id() -> None:
    reject = replace(BAN, id="z-reject", action=Action.REJECT, message="No.")
    defer = replace(BAN, id="a-defer", action=Action.DEFER)
    decision = run(BAN, reject, defer, device=claims(), at=ENFORCE)
    assert decision.action is Action.REJECT
    assert decision.message == "No."
    assert [m.policy_id for m in decision.matches] == ["z-reject", "remove-tiktok", "a-defer"]
    twin = replace(BAN, id="a-hold", message="First by id.")
    assert run(BAN, twin, device=claims(), at=ENFORCE).message == "First by id."


def test_exemptions_by_user_group_and_device() -> None:
    groups = {"it-staff": frozenset({"it@example.test"})}
    exempt = replace(
        BAN,
        exempt=Exemptions(
            users=frozenset({"boss@example.test"}),
            groups=frozenset({"it-staff"}),
            device_ids=frozenset({"lab-phone"}),
        ),
    )
    for device in (
        claims(user="Boss@Example.test"),
        claims(user="it@example.test"),
        claims(device_id="lab-phone"),
    ):
        decision = run(exempt, device=device, at=ENFORCE, groups=groups)
        assert decision.action is Action.ALLOW
        assert decision.exempted == ("remove-tiktok",)
    assert run(exempt, device=claims(), at=ENFORCE, groups=groups).action is Action.HOLD


def test_lost_phone_by_device_id() -> None:
    lost = Policy(
        id="lost",
        action=Action.REJECT,
        state=PolicyState.ENFORCE,
        message="Reported lost.",
        match=Conditions(device_ids=frozenset({"stolen-1"})),
    )
    assert run(lost, device=claims(device_id="stolen-1"), at=ENFORCE).action is Action.REJECT
    assert run(lost, device=claims(), at=ENFORCE).action is Action.ALLOW


def test_os_version_posture_model_platform_matchers() -> None:
    old_ios = Policy(
        id="old-ios",
        action=Action.DEFER,
        state=PolicyState.ENFORCE,
        message="Update iOS.",
        match=Conditions(platforms=frozenset({Platform.IOS}), os_version=parse_range("<16.4")),
    )
    assert run(old_ios, device=claims(os_version="16.3.1"), at=ENFORCE).action is Action.DEFER
    assert run(old_ios, device=claims(os_version="16.10"), at=ENFORCE).action is Action.ALLOW
    assert run(old_ios, device=claims(os_version="garbage"), at=ENFORCE).action is Action.ALLOW
    assert (
        run(old_ios, device=claims(platform=Platform.ANDROID, os_version="10"), at=ENFORCE).action
        is Action.ALLOW
    )

    jailbroken = Policy(
        id="jb",
        action=Action.REJECT,
        state=PolicyState.ENFORCE,
        message="Jailbroken.",
        match=Conditions(posture=(("jailbroken", True),)),
    )
    assert (
        run(jailbroken, device=claims(posture={"jailbroken": True}), at=ENFORCE).action
        is Action.REJECT
    )
    assert (
        run(jailbroken, device=claims(posture={"jailbroken": False}), at=ENFORCE).action
        is Action.ALLOW
    )
    assert (
        run(jailbroken, device=claims(), at=ENFORCE).action is Action.ALLOW
    )  # unknown is not a violation

    models = Policy(
        id="m",
        action=Action.WARN,
        state=PolicyState.ENFORCE,
        message="Old model.",
        match=Conditions(models=(ModelPattern.compile("iPhone1?,*"),)),
    )
    assert run(models, device=claims(model="iphone12,1"), at=ENFORCE).action is Action.WARN
    assert run(models, device=claims(model="iPhone9,1"), at=ENFORCE).action is Action.ALLOW


def test_apps_all_needs_every_app() -> None:
    pair = Policy(
        id="pair",
        action=Action.DEFER,
        state=PolicyState.ENFORCE,
        message="m",
        match=Conditions(apps_all=frozenset({"a", "b"})),
    )
    assert (
        run(pair, device=claims(apps=frozenset({"a", "b", "c"})), at=ENFORCE).action is Action.DEFER
    )
    assert run(pair, device=claims(apps=frozenset({"a"})), at=ENFORCE).action is Action.ALLOW


def test_versions_compare_as_versions() -> None:
    assert parse_version("13.10") > parse_version("13.5.1")  # type: ignore[operator]
    assert parse_version("17") == parse_version("17.0.0")
    assert parse_version("17.2.1 (21C66)") == (17, 2, 1)
    assert parse_version("beta") is None
    assert parse_range(">=13.0, <17.2").contains((17, 1, 9))
    assert not parse_range(">=13.0, <17.2").contains((17, 2))
    assert parse_range(">15, <=15").is_empty()
    assert not parse_range(">=15, <=15").is_empty()


def test_os_ceiling_index_finds_exactly_the_policies_a_version_can_meet() -> None:
    def below(pid: str, text: str) -> Policy:
        return Policy(id=pid, action=Action.DEFER, state=PolicyState.ENFORCE, message=pid,
                      match=Conditions(platforms=frozenset({Platform.ANDROID}), os_version=parse_range(text)))  # fmt: skip

    policies = [
        below("lt-12", "<12"),
        below("le-14", "<=14"),
        below("lt-14", "<14"),
        below("lt-15.1", "<15.1"),
    ]
    for version, expected in [
        ("11", 4),
        ("12", 3),
        ("14", 2),
        ("14.0.1", 1),
        ("15.1", 0),
        ("garbage", 0),
    ]:
        decision = run(
            *policies, device=claims(platform=Platform.ANDROID, os_version=version), at=ENFORCE
        )
        assert len(decision.matches) == expected, version
    assert (
        run(*policies, device=claims(platform=Platform.IOS, os_version="11"), at=ENFORCE).action
        is Action.ALLOW
    )


# --- scope.access: what a policy gates -------------------------------------------------

SEND_ONLY, SYNC_ONLY = frozenset({Access.SEND}), frozenset({Access.SYNC})

# The same ban filed under each kind of index entry, so the access check is seen to hold
# whichever way the candidate was found.
ANCHORED_BANS = {
    "app": BAN,
    "device": replace(BAN, match=Conditions(device_ids=frozenset({"phone-1"}))),
    "user": replace(BAN, match=Conditions(users=frozenset({"alice@example.test"}))),
    "platform": replace(BAN, match=Conditions(platforms=frozenset({Platform.IOS}))),
    "os-ceiling": replace(
        BAN, match=Conditions(platforms=frozenset({Platform.IOS}), os_version=parse_range("<17"))
    ),
    "unanchored": replace(BAN, match=Conditions(all_devices=True), scope=Conditions()),
}


@pytest.mark.parametrize("anchor", sorted(ANCHORED_BANS))
def test_a_send_only_policy_does_not_touch_sync_and_vice_versa(anchor: str) -> None:
    ban = ANCHORED_BANS[anchor]
    device = claims(os_version="16")
    for at in (ANNOUNCE, ENFORCE):
        for narrowed_to, other in ((Access.SEND, Access.SYNC), (Access.SYNC, Access.SEND)):
            narrowed = replace(ban, access=frozenset({narrowed_to}))
            gated = run(narrowed, device=device, at=at, access=narrowed_to)
            assert gated.action is (Action.WARN if at == ANNOUNCE else Action.HOLD)
            assert gated.policy_ids == ("remove-tiktok",)
            untouched = run(narrowed, device=device, at=at, access=other)
            assert untouched.action is Action.ALLOW
            assert (untouched.matches, untouched.audit, untouched.exempted) == ((), (), ())


@pytest.mark.parametrize("anchor", sorted(ANCHORED_BANS))
def test_by_default_a_policy_gates_sending_and_syncing_alike(anchor: str) -> None:
    ban = ANCHORED_BANS[anchor]
    assert not ban.is_narrowed
    device = claims(os_version="16")
    send = run(ban, device=device, at=ENFORCE, access=Access.SEND)
    assert send.action is Action.HOLD
    assert run(ban, device=device, at=ENFORCE, access=Access.SYNC) == send
    assert run(ban, device=device, at=ENFORCE) == send  # decide() defaults to send


def test_ban_for_syncing_only_next_to_a_general_warning() -> None:
    """The docs' example: the phone still sends (warned), but may not sync."""
    sync_ban = replace(BAN, id="no-sync-with-tiktok", action=Action.REJECT, access=SYNC_ONLY,
                       message="No mail sync with TikTok.", announce_at=None, enforce_at=None)  # fmt: skip
    warning = replace(BAN, id="tiktok-warning", action=Action.WARN, message="Please remove TikTok.")
    send = run(sync_ban, warning, device=claims(), at=ENFORCE, access=Access.SEND)
    assert (send.action, send.policy_ids) == (Action.WARN, ("tiktok-warning",))
    sync = run(sync_ban, warning, device=claims(), at=ENFORCE, access=Access.SYNC)
    assert (sync.action, sync.message) == (Action.REJECT, "No mail sync with TikTok.")
    assert [m.policy_id for m in sync.matches] == ["no-sync-with-tiktok", "tiktok-warning"]


def test_audit_and_exemptions_of_a_narrowed_policy_stay_with_its_access() -> None:
    audit = replace(BAN, state=PolicyState.AUDIT, access=SYNC_ONLY)
    assert run(audit, device=claims(), at=ENFORCE, access=Access.SEND).audit == ()
    assert run(audit, device=claims(), at=ENFORCE, access=Access.SYNC).audit != ()
    exempt = replace(BAN, access=SEND_ONLY, exempt=Exemptions(device_ids=frozenset({"phone-1"})))
    assert run(exempt, device=claims(), at=ENFORCE, access=Access.SEND).exempted == (
        "remove-tiktok",
    )
    assert run(exempt, device=claims(), at=ENFORCE, access=Access.SYNC).exempted == ()


def test_compiled_set_knows_whether_any_policy_is_narrowed() -> None:
    def compiled(*policies: Policy) -> bool:
        return compile_policy_set(PolicySet(policies, "v")).narrowed

    assert not compiled(BAN)
    assert compiled(BAN, replace(BAN, id="sync-ban", access=SYNC_ONLY))
    # A draft or retracted narrowed policy never decides anything, so it does not count.
    assert not compiled(BAN, replace(BAN, id="d", access=SEND_ONLY, state=PolicyState.DRAFT))


def test_compiling_against_the_previous_set_reuses_unchanged_policies_only() -> None:
    """A one-file reload recompiles that file's policies; the tables come out exactly as a
    compile from scratch would build them, positions included."""
    lost = replace(BAN, id="lost", match=Conditions(device_ids=frozenset({"phone-9"})))
    old_os = replace(
        BAN,
        id="old-android",
        match=Conditions(platforms=frozenset({Platform.ANDROID}), os_version=parse_range("<10")),
    )
    first = compile_policy_set(PolicySet((BAN, lost, old_os), version="v1"))
    edited = replace(lost, match=Conditions(device_ids=frozenset({"phone-7"})))
    draft = replace(BAN, id="draft", state=PolicyState.DRAFT)
    second_set = PolicySet((draft, BAN, edited, old_os), version="v2")
    second = compile_policy_set(second_set, first)
    scratch = compile_policy_set(second_set)
    assert second.active[0] is first.active[0]  # BAN: the same object, not compiled again
    assert second.active[2] is first.active[2]  # old-android
    assert second.active[1] is not first.active[1]  # the edited policy is compiled afresh
    for table in ("by_device", "by_user", "by_app", "by_group", "by_platform", "unanchored"):
        assert getattr(second, table) == getattr(scratch, table), table
    assert second.anchors == scratch.anchors
    assert second.os_ceilings.keys() == scratch.os_ceilings.keys()
    assert second.by_device == {"phone-7": (1,)}
    now = ENFORCE + timedelta(hours=1)
    for device_id, action in (("phone-7", Action.HOLD), ("phone-9", Action.ALLOW)):
        token = claims(device_id=device_id, apps=frozenset())
        assert decide(second, token, now).action is action
        assert decide(scratch, token, now).action is action


def _mixed_policies(rng: random.Random, count: int, tag: str) -> list[Policy]:
    """Policies of every anchor kind, some inactive, as a directory of them would hold."""
    kinds = [
        Conditions(apps_any=frozenset({f"com.app{rng.randrange(30)}", TIKTOK})),
        Conditions(device_ids=frozenset({f"phone-{rng.randrange(10)}"})),
        Conditions(users=frozenset({"alice@example.test"})),
        Conditions(groups=frozenset({"staff"})),
        Conditions(platforms=frozenset({Platform.ANDROID}), os_version=parse_range("<12")),
        Conditions(),
    ]
    states = [PolicyState.ENFORCE, PolicyState.AUDIT, PolicyState.DRAFT, PolicyState.RETRACTED]
    return [
        replace(
            BAN,
            id=f"{tag}-{n}",
            match=rng.choice(kinds),
            state=rng.choice(states),
            scope=Conditions(),
        )
        for n in range(count)
    ]


def test_patched_tables_equal_a_compile_from_scratch() -> None:
    """Edits in place, insertions, deletions and edits touching platform or unanchored
    policies: whichever path the compile takes, its tables are those of a fresh compile."""
    rng = random.Random(18)
    policies = _mixed_policies(rng, 60, "p")
    compiled = compile_policy_set(PolicySet(tuple(policies), version="0"))
    for round_ in range(300):
        start = rng.randrange(len(policies))
        end = min(len(policies), start + rng.randrange(1, 6))
        shape = rng.random()
        if shape < 0.6:  # a file edited in place: same count, new objects
            run = [
                replace(p, message=f"edited {round_}", state=rng.choice(list(PolicyState)))
                if rng.random() < 0.7
                else replace(p, message=f"edited {round_}")
                for p in policies[start:end]
            ]
        else:
            run = _mixed_policies(rng, rng.randrange(0, 6), f"r{round_}")
        policies = policies[:start] + run + policies[end:]
        policy_set = PolicySet(tuple(policies), version=str(round_))
        compiled = compile_policy_set(policy_set, compiled)
        scratch = compile_policy_set(policy_set)
        assert [e.policy for e in compiled.active] == [e.policy for e in scratch.active]
        assert compiled.anchors == scratch.anchors
        for field_name in (
            "by_device", "by_user", "by_app", "by_group", "by_platform",
            "os_ceilings", "unanchored", "app_keys", "groups_by_user", "narrowed",
        ):  # fmt: skip
            assert getattr(compiled, field_name) == getattr(scratch, field_name), field_name


def test_overrides_suspend_a_policy_or_exempt_one_user_or_device_and_say_so() -> None:
    """gateway policy suspend / exempt: the engine is given the overrides (pure) and names
    what they set aside in ``overridden``; another policy still applies."""
    from gateway.domain import Overrides

    warn = replace(BAN, id="warn-tiktok", action=Action.WARN, message="TikTok?")
    compiled = compile_policy_set(PolicySet((BAN, warn), version="v1", groups={}))
    alice, bob = claims(), claims(user="bob@example.test", device_id="phone-2")
    suspended = Overrides(suspended=frozenset({"remove-tiktok"}))
    decision = decide(compiled, alice, ENFORCE, overrides=suspended)
    assert (decision.action, decision.policy_ids) == (Action.WARN, ("warn-tiktok",))
    assert decision.overridden == ("remove-tiktok: suspended",)
    assert decision.as_dict()["overridden"] == ["remove-tiktok: suspended"]
    for access in Access:
        assert decide(compiled, alice, ENFORCE, access, overrides=suspended).action is Action.WARN
    by_user = Overrides(exempt=frozenset({("remove-tiktok", "user:alice@example.test")}))
    by_device = Overrides(exempt=frozenset({("remove-tiktok", "device:phone-1")}))
    for exempt in (by_user, by_device):
        decision = decide(compiled, alice, ENFORCE, overrides=exempt)
        assert decision.action is Action.WARN
        assert decision.overridden[0].startswith("remove-tiktok: break-glass exemption for ")
        assert decide(compiled, bob, ENFORCE, overrides=exempt).action is Action.HOLD
    plain = decide(compiled, alice, ENFORCE)
    assert (plain.action, plain.overridden) == (Action.HOLD, ())
