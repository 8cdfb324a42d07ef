"""What the policy history stores of a set, and the diff between two stored versions:
bounded text (cut at a line, the hash of the whole kept), nothing stored from files that
changed since the load, fingerprints that are the same in every process, policy changes
by id (docs/admin.md, "Policy history")."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy import history
from gateway.policy.history import MAX_TEXT_BYTES, compare, fingerprint, read_contents, snapshot
from gateway.policy.loader import load_policy_dir
from gateway.policy.model import Policy, PolicySet
from gateway.policy.store import PolicyStore
from tests.stories import tiktok_ban

REPO = Path(__file__).resolve().parents[2]

# Sets of apps and platforms: frozensets, whose iteration order follows string hashes.
MANY_APPS = tiktok_ban("hold").replace(
    'match.apps_any = ["com.zhiliaoapp.musically"]',
    'match.apps_any = ["a.one", "b.two", "c.three", "d.four", "e.five"]\n'
    'match.platform = ["ios", "android"]',
)


def _load(directory: Path, files: dict[str, str]) -> PolicySet:
    directory.mkdir(exist_ok=True)
    for old in directory.glob("*.toml"):
        old.unlink()
    for name, text in files.items():
        (directory / name).write_text(text)
    return load_policy_dir(directory)


def test_text_is_bounded_and_cut_at_a_line_with_the_whole_files_hash_kept(
    tmp_path: Path,
) -> None:
    policy_set = _load(tmp_path / "p", {"ban.toml": tiktok_ban()})
    big = b"# padding line\n" * (MAX_TEXT_BYTES // 15 + 100)
    snap = snapshot(policy_set, [("b.toml", b"after\n"), ("a.toml", big)])
    a, b = snap.files
    assert (a.name, a.size, a.sha256) == ("a.toml", len(big), hashlib.sha256(big).hexdigest())
    assert a.truncated
    assert a.text.endswith("# padding line\n")
    assert len(a.text.encode()) <= MAX_TEXT_BYTES
    assert (b.name, b.text, b.truncated) == ("b.toml", "", True)  # no room left
    assert snap.text_bytes <= MAX_TEXT_BYTES
    assert snap.truncated


def test_files_changed_since_the_load_are_not_stored_as_its_text(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    policy_set = _load(directory, {"ban.toml": tiktok_ban("hold")})
    contents = read_contents(policy_set, directory)
    assert contents == [("ban.toml", tiktok_ban("hold").encode())]
    (directory / "ban.toml").write_text(tiktok_ban("reject"))  # edited after the load
    assert read_contents(policy_set, directory) is None
    snap = snapshot(policy_set, None)
    assert (snap.files, snap.truncated, snap.policy_count) == ((), True, 1)
    assert snap.policies is not None  # the policies are from the load itself


def test_fingerprints_are_the_same_in_every_process(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    (policy,) = _load(directory, {"ban.toml": MANY_APPS}).policies
    program = (
        "import sys; from pathlib import Path; from gateway.policy.loader import "
        "load_policy_dir; from gateway.policy.history import fingerprint; "
        "print(fingerprint(load_policy_dir(Path(sys.argv[1])).policies[0]))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", program, str(directory)],
            env={
                "PYTHONHASHSEED": str(seed),
                "PATH": "/usr/bin:/bin",
                "PYTHONPATH": str(REPO),
            },
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert seen == {fingerprint(policy)}
    (changed,) = _load(directory, {"ban.toml": MANY_APPS.replace("e.five", "f.six")}).policies
    assert fingerprint(changed) != fingerprint(policy)


def test_compare_names_policy_changes_and_bounds_the_diff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "p"

    def stored(files: dict[str, str]) -> history.Snapshot:
        policy_set = _load(directory, files)
        return snapshot(policy_set, read_contents(policy_set, directory))

    other = tiktok_ban("warn").replace("remove-tiktok", "other")
    old = stored({"ban.toml": tiktok_ban("hold"), "other.toml": other})
    retracted = tiktok_ban("hold", state="retracted", extra='retracted_reason = "error"\n')
    new = stored({"ban.toml": retracted, "new.toml": other.replace('"other"', '"new"')})
    diff = compare(old, new)
    assert diff.policies is not None
    assert (diff.policies.added, diff.policies.retracted, diff.policies.removed) == (
        ("new",),
        ("remove-tiktok",),
        ("other",),
    )
    assert diff.policies.changed == ()
    assert [(f.name, f.status) for f in diff.files] == [
        ("ban.toml", "changed"),
        ("new.toml", "added"),
        ("other.toml", "removed"),
    ]
    assert '-state = "enforce"' in diff.files[0].diff.splitlines()
    assert diff.files[2].diff.splitlines()[:2] == [f"--- {old.version}/other.toml", "+++ /dev/null"]
    assert compare(old, old).files == ()
    assert compare(old, old).unchanged_files == 2

    monkeypatch.setattr(history, "MAX_DIFF_LINES", 3)
    cut = compare(old, new).files[0]
    assert (len(cut.diff.splitlines()), cut.truncated) == (3, True)
    monkeypatch.setattr(history, "MAX_POLICIES", 1)  # the old set has two: not fingerprinted
    assert compare(stored({"ban.toml": tiktok_ban(), "other.toml": other}), new).policies is None


def test_after_a_one_file_reload_only_that_files_policies_are_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's parse cache keeps the Policy objects of unchanged files; the history's
    Fingerprints reuses their fingerprints, so recording a reload costs the edit's size."""
    directory = tmp_path / "p"
    other = tiktok_ban("warn").replace("remove-tiktok", "other")
    _load(directory, {"ban.toml": tiktok_ban("hold"), "other.toml": other})
    store = PolicyStore(directory, {})
    store.reload("startup")
    hashed: list[str] = []

    def counted(policy: Policy) -> str:
        hashed.append(policy.id)
        return fingerprint(policy)

    monkeypatch.setattr(history, "fingerprint", counted)
    fingerprints = history.Fingerprints()
    first = snapshot(store.current.source, None, fingerprints)
    assert sorted(hashed) == ["other", "remove-tiktok"]
    (directory / "ban.toml").write_text(tiktok_ban("reject"))
    store.reload("sighup")
    hashed.clear()
    second = snapshot(store.current.source, None, fingerprints)
    assert hashed == ["remove-tiktok"]
    assert second.policies == snapshot(store.current.source, None).policies  # as if fresh
    assert first.policies is not None
    assert second.policies is not None
    assert first.policies["other"] == second.policies["other"]
    assert first.policies["remove-tiktok"] != second.policies["remove-tiktok"]
