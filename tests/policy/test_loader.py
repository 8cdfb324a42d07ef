"""The policy loader: strict validation, every problem located by file, line and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.domain import Access, Action, PolicyState
from gateway.errors import PolicyLoadError
from gateway.policy.loader import load_policy_dir

GROUPS = {"it-staff": frozenset({"it@example.test"})}

BAN = """\
[[policy]]
id = "remove-tiktok"
match.apps_any = ["com.zhiliaoapp.musically"]
scope.device_class = ["mobile", "tablet"]
announce_at = 2020-07-10T09:00:00-07:00
enforce_at  = 2020-07-10T23:59:00-07:00
action = "hold"
message = "Remove TikTok."
"""


def write(directory: Path, name: str, text: str | bytes) -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_dir(directory, GROUPS)
    return [str(p) for p in caught.value.problems]


def test_loads_a_valid_ban(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN)
    policy_set = load_policy_dir(tmp_path, GROUPS)
    (policy,) = policy_set.policies
    assert policy.id == "remove-tiktok"
    assert policy.action is Action.HOLD
    assert policy.state is PolicyState.ENFORCE  # the default
    assert policy.match.apps_any == frozenset({"com.zhiliaoapp.musically"})
    assert str(policy.source) == f"{tmp_path / 'ban.toml'}:1"
    assert len(policy_set.version) == 12


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN)
    first = load_policy_dir(tmp_path, GROUPS).version
    assert load_policy_dir(tmp_path, GROUPS).version == first
    write(tmp_path, "ban.toml", BAN.replace("Remove TikTok.", "Remove TikTok now."))
    assert load_policy_dir(tmp_path, GROUPS).version != first


def test_misspelt_key_names_file_line_and_key(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN.replace("match.apps_any", "match.apps_anyy"))
    assert problems_of(tmp_path) == [
        f"{tmp_path / 'ban.toml'}:3: policy[0].match.apps_anyy: unknown key (did you mean 'apps_any'?)"
    ]


def test_all_problems_are_reported_in_one_run(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", BAN.replace('action = "hold"', 'action = "block"'))
    write(
        tmp_path,
        "b.toml",
        BAN.replace("2020-07-10T09:00:00-07:00", "2020-07-10T09:00:00").replace(
            'id = "remove-tiktok"', 'id = "b"'
        ),
    )
    found = problems_of(tmp_path)
    assert len(found) == 2
    assert (
        "a.toml:7: policy[0].action: 'block' is not one of: allow, warn, defer, hold, reject"
        in found[0]
    )
    assert "b.toml:5: policy[0].announce_at: date-time has no UTC offset" in found[1]


def test_enforce_before_announce(tmp_path: Path) -> None:
    write(
        tmp_path, "ban.toml", BAN.replace("2020-07-10T23:59:00-07:00", "2020-07-09T23:59:00-07:00")
    )
    (problem,) = problems_of(tmp_path)
    assert (
        ":6: policy[0].enforce_at: enforce_at (2020-07-09T23:59:00-07:00) is before announce_at"
        in problem
    )


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.toml", BAN)
    write(tmp_path, "b.toml", "# second copy\n" + BAN)
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(f"{tmp_path / 'b.toml'}:2: id: duplicate policy id 'remove-tiktok'")
    assert f"first defined at {tmp_path / 'a.toml'}:1" in problem


@pytest.mark.parametrize(
    ("replacement", "expected"),
    [
        ("match.apps_any = []", "policy[0].match.apps_any: empty list matches nothing"),
        (
            'match.platform = ["ios"]\nscope.platform = ["android"]',
            "share no value: the policy matches nothing",
        ),
        ('match.os_version = ">=15, <14"', "no version satisfies '>=15, <14'"),
        ('match.os_version = "about 15"', "'about 15' is not a comparison"),
        ("match = {}", "policy matches nothing: give at least one condition"),
        ('match.groups = ["nobody"]', "unknown group(s) nobody"),
        (
            'match.device_class = ["watch"]',
            "'watch' is not one of: mobile, tablet, desktop, browser",
        ),
        ('match.apps_any = "com.x"', "expected a list of strings, got a string"),
    ],
)
def test_matchers_that_match_nothing_or_are_wrong(
    tmp_path: Path, replacement: str, expected: str
) -> None:
    write(
        tmp_path,
        "ban.toml",
        BAN.replace('match.apps_any = ["com.zhiliaoapp.musically"]', replacement),
    )
    assert any(expected in p for p in problems_of(tmp_path)), problems_of(tmp_path)


def test_missing_required_keys(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", "[[policy]]\ntitle = 'x'\n")
    found = problems_of(tmp_path)
    assert any("policy[0]: missing required key 'id'" in p for p in found)
    assert any("missing required key 'action'" in p for p in found)
    assert any("missing required key 'match'" in p for p in found)


# Files a careless editor or an attacker might produce; shared with tests/security.
HOSTILE_FILES = [
    (b"\xef\xbb\xbf" + BAN.encode(), "byte-order mark"),
    (BAN.encode() + b"\x00", "NUL byte"),
    (BAN.encode()[:40], "TOML syntax"),  # truncated mid-value
    (
        BAN.encode() + b'id = "again"\n',
        "TOML syntax: Cannot overwrite a value",
    ),  # duplicate key
    (b"x = " + b"[" * 2000 + b"]" * 2000, "nesting deeper than"),
    (b"x = " + b"9" * 5000, "a value cannot be read: Exceeds the limit"),  # 5,000-digit integer
    (b"x = 99999999999999999999", "does not fit in 64 bits"),
    (b"\xff\xfe garbage", "not valid UTF-8"),
]


@pytest.mark.parametrize(("content", "expected"), HOSTILE_FILES)
def test_hostile_files_are_clear_errors(tmp_path: Path, content: bytes, expected: str) -> None:
    write(tmp_path, "ban.toml", content)
    found = problems_of(tmp_path)
    assert any(expected in p for p in found), found


def test_huge_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN + "#" * (5 * 1024 * 1024))
    assert "larger than" in problems_of(tmp_path)[0]


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN.replace('action = "hold"', "action = hold"))
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(f"{tmp_path / 'ban.toml'}:7: TOML syntax")


def test_only_toml_files_count(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN)
    for junk in (".ban.toml.swp", ".#ban.toml", "ban.toml~", "4913", "README.md", ".hidden.toml"):
        write(tmp_path, junk, "this is not TOML [[[")
    (tmp_path / "sub.toml").mkdir()  # a directory named like a policy file
    assert [p.id for p in load_policy_dir(tmp_path, GROUPS).policies] == ["remove-tiktok"]


def test_kubernetes_configmap_layout(tmp_path: Path) -> None:
    # A ConfigMap volume: files live in a timestamped dir, ..data points at it, and each
    # top-level name is a symlink through ..data.
    real = tmp_path / "..2026_11_24_10_00_00.000000001"
    real.mkdir()
    write(real, "ban.toml", BAN)
    os.symlink(real.name, tmp_path / "..data")
    os.symlink("..data/ban.toml", tmp_path / "ban.toml")
    assert [p.id for p in load_policy_dir(tmp_path, GROUPS).policies] == ["remove-tiktok"]


def test_retracted_needs_no_reason_but_reason_needs_retracted(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN + 'state = "retracted"\nretracted_reason = "sent in error"\n')
    assert load_policy_dir(tmp_path, GROUPS).policies[0].retracted_reason == "sent in error"
    write(tmp_path, "ban.toml", BAN + 'retracted_reason = "sent in error"\n')
    assert "only meaningful with state" in problems_of(tmp_path)[0]


def test_exemptions_and_groups(tmp_path: Path) -> None:
    write(
        tmp_path,
        "ban.toml",
        BAN + 'exempt.groups = ["it-staff"]\nexempt.users = ["Boss@Example.test"]\n',
    )
    policy = load_policy_dir(tmp_path, GROUPS).policies[0]
    assert policy.exempt.groups == frozenset({"it-staff"})
    assert policy.exempt.users == frozenset({"boss@example.test"})


def test_scope_access_narrows_a_policy_and_defaults_to_both(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN)
    (policy,) = load_policy_dir(tmp_path, GROUPS).policies
    assert policy.access == frozenset({Access.SEND, Access.SYNC})  # key absent: both
    assert not policy.is_narrowed
    write(tmp_path, "ban.toml", BAN + 'scope.access = ["sync"]\n')
    (policy,) = load_policy_dir(tmp_path, GROUPS).policies
    assert policy.access == frozenset({Access.SYNC})
    assert policy.is_narrowed
    # A scope that says nothing but access is a valid scope.
    write(tmp_path, "ban.toml", BAN.replace("scope.device_class", 'scope.access = ["send"]\n#'))
    (policy,) = load_policy_dir(tmp_path, GROUPS).policies
    assert policy.access == frozenset({Access.SEND})
    assert policy.scope.is_empty()
    write(tmp_path, "ban.toml", BAN + 'scope.access = ["send", "sync"]\n')
    assert not load_policy_dir(tmp_path, GROUPS).policies[0].is_narrowed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["imap"]', "policy[0].scope.access: 'imap' is not one of: send, sync"),
        ('["send", "Sync"]', "policy[0].scope.access: 'Sync' is not one of: send, sync"),
        (
            "[]",
            "policy[0].scope.access: empty list gates nothing; list send, sync or both, "
            "or leave the key out for both",
        ),
        (
            '"sync"',
            'policy[0].scope.access: expected a list of strings, got a string: write ["sync"]',
        ),
        ("true", "policy[0].scope.access: expected a list of strings, got a boolean"),
        ('["send", 1]', "policy[0].scope.access[1]: expected a string, got an integer"),
    ],
)
def test_bad_scope_access_names_file_line_and_key(
    tmp_path: Path, value: str, expected: str
) -> None:
    write(tmp_path, "ban.toml", BAN + f"scope.access = {value}\n")
    assert problems_of(tmp_path) == [f"{tmp_path / 'ban.toml'}:9: {expected}"]


def test_access_in_match_points_to_scope(tmp_path: Path) -> None:
    write(tmp_path, "ban.toml", BAN + 'match.access = ["sync"]\n')
    assert problems_of(tmp_path) == [
        f"{tmp_path / 'ban.toml'}:9: policy[0].match.access: access belongs in scope: "
        "write scope.access instead"
    ]


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in problems_of(tmp_path / "nope")[0]


def test_parse_cache_reparses_only_changed_files(tmp_path: Path) -> None:
    from gateway.policy.loader import ParseCache

    for name in ("a", "b"):
        (tmp_path / f"{name}.toml").write_text(
            f'[[policy]]\nid = "{name}"\nmatch.users = ["{name}@example.test"]\naction = "warn"\n'
        )
    cache = ParseCache()
    first = load_policy_dir(tmp_path, cache=cache)
    (tmp_path / "b.toml").write_text(
        '[[policy]]\nid = "b"\nmatch.users = ["b@example.test"]\naction = "reject"\n'
    )
    second = load_policy_dir(tmp_path, cache=cache)
    assert second.policies[0] is first.policies[0]  # a.toml: the very same parsed object
    assert second.policies[1].action.label == "reject"
    assert second.version != first.version
    (tmp_path / "b.toml").write_text('[[policy]]\nid = "b"\naction = "bogus"\n')
    with pytest.raises(PolicyLoadError, match="bogus"):
        load_policy_dir(tmp_path, cache=cache)
    # Back to the first content: the cache gives the same version as a fresh load.
    (tmp_path / "b.toml").write_text(
        '[[policy]]\nid = "b"\nmatch.users = ["b@example.test"]\naction = "warn"\n'
    )
    assert load_policy_dir(tmp_path, cache=cache).version == load_policy_dir(tmp_path).version


@pytest.mark.parametrize(
    ("key", "value", "code"),
    [
        ("message", "Remove\\u0000 TikTok", "U+0000"),
        ("message", "Remove\\u0007 TikTok", "U+0007"),
        ("title", "\\u001b[31mRed title", "U+001B"),
        ("message", "Remove\\r\\n250 fake", "U+000D"),
        ("retracted_reason", "sent\\u0085in error", "U+0085"),
        ("message", "line\\u2028separator", "U+2028"),
    ],
)
def test_control_characters_in_policy_text_are_refused(
    tmp_path: Path, key: str, value: str, code: str
) -> None:
    # NUL, BEL, ESC and CR LF would otherwise reach the SMTP reply, the
    # X-Compliance-Notice header, notices, logs and the admin's terminal.
    extra = f'{key} = "{value}"\n'
    text = BAN.replace('message = "Remove TikTok."\n', "") + extra
    if key == "retracted_reason":
        text = BAN + 'state = "retracted"\n' + extra
    write(tmp_path, "ban.toml", text)
    (problem,) = problems_of(tmp_path)
    line = text.count("\n")  # the key is the file's last line
    assert problem.startswith(f"{tmp_path / 'ban.toml'}:{line}: policy[0].{key}: ")
    assert code in problem


def test_policy_text_length_is_bounded_by_the_reply_line(tmp_path: Path) -> None:
    from gateway.policy.loader import MAX_POLICY_TEXT

    write(tmp_path, "ban.toml", BAN.replace("Remove TikTok.", "x" * 3000))
    (problem,) = problems_of(tmp_path)
    assert f"{tmp_path / 'ban.toml'}:8: policy[0].message: is 3000 characters long" in problem
    assert "512 octets" in problem
    write(tmp_path, "ban.toml", BAN.replace("Remove TikTok.", "x" * MAX_POLICY_TEXT))
    assert load_policy_dir(tmp_path, GROUPS).policies[0].message == "x" * MAX_POLICY_TEXT


def test_longest_policy_text_keeps_every_reply_within_512_octets(tmp_path: Path) -> None:
    """The bound is what it claims: the longest reply built from policy text (the
    announce-phase NOTICE with its deadline) still fits RFC 5321's reply line."""
    from dataclasses import replace
    from datetime import datetime, timedelta, timezone

    from gateway.domain import Phase
    from gateway.policy.loader import MAX_POLICY_TEXT
    from gateway.replies import Reply

    write(tmp_path, "ban.toml", BAN.replace("Remove TikTok.", "é" * MAX_POLICY_TEXT))
    policy = load_policy_dir(tmp_path, GROUPS).policies[0]
    deadline = datetime(2020, 7, 10, 23, 59, 59, 999999, timezone(timedelta(hours=-7)))
    policy = replace(policy, enforce_at=deadline)
    text = policy.message_for(Phase.ANNOUNCE)
    wire = Reply(250, "2.0.0", f"Message accepted. NOTICE: {text}").wire() + "\r\n"
    assert len(wire.encode()) <= 512
