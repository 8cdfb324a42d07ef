"""Policy history: what each policy set the gateway put in force was (its files' text and
its policies), kept bounded in the hold store, and what changed between any two. Pure,
but for :func:`read_contents`, which reads the directory once more.

Bounds (docs/admin.md, "Policy history"): the text of at most MAX_TEXT_BYTES of policy
files per version (a file past that is stored cut at a line, marked truncated; its size
and SHA-256 are always stored, so a change is still seen), at most MAX_FILES files, the
policies compared by fingerprint for sets of at most MAX_POLICIES, and KEEP_VERSIONS
versions (the least recently loaded are pruned).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path

from gateway.domain import PolicyState
from gateway.errors import PolicyLoadError
from gateway.policy.diff import PolicyDiff
from gateway.policy.loader import policy_files, policy_version
from gateway.policy.model import Policy, PolicySet

KEEP_VERSIONS = 100  # versions kept in the store; the least recently loaded go first
MAX_TEXT_BYTES = 256 * 1024  # policy-file text stored per version, all files together
MAX_FILES = 500  # files recorded per version
MAX_POLICIES = 5000  # policies fingerprinted per version; a larger set is compared by files
MAX_DIFF_LINES = 2000  # lines of unified diff answered per file
VERSION_PATTERN = r"^[0-9a-f]{12}$"  # what policy_version() gives


@dataclass(frozen=True)
class FileText:
    """One policy file of a version: its size and hash always, its text up to the cap."""

    name: str
    size: int
    sha256: str
    text: str
    truncated: bool = False  # ``text`` is only the beginning of the file

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: Mapping[str, object]) -> FileText:
        return cls(
            str(row["name"]),
            int(str(row["size"])),
            str(row["sha256"]),
            str(row["text"]),
            bool(row["truncated"]),
        )


@dataclass(frozen=True)
class Snapshot:
    """What is stored of one policy set: its files, and each policy's fingerprint and
    state (None when the set has more than MAX_POLICIES policies)."""

    version: str
    files: tuple[FileText, ...]
    policies: Mapping[str, tuple[str, str]] | None
    policy_count: int
    files_complete: bool = True  # False: more than MAX_FILES files, the rest not recorded

    @property
    def text_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.files)

    @property
    def truncated(self) -> bool:
        return not self.files_complete or any(f.truncated for f in self.files)


@dataclass(frozen=True)
class PolicyVersion:
    """One stored version: when it first came into force (``loaded_at``), by what trigger
    (startup, sighup, watch, periodic) on which gateway, and when a gateway last loaded it;
    ``snapshot`` only when asked for with its text."""

    seq: int
    version: str
    loaded_at: datetime
    trigger: str
    loaded_by: str
    last_loaded_at: datetime
    policy_count: int
    file_count: int
    text_bytes: int
    truncated: bool
    snapshot: Snapshot | None = None

    def summary(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "version": self.version,
            "loaded_at": self.loaded_at.isoformat(),
            "trigger": self.trigger,
            "loaded_by": self.loaded_by,
            "last_loaded_at": self.last_loaded_at.isoformat(),
            "policy_count": self.policy_count,
            "file_count": self.file_count,
            "text_bytes": self.text_bytes,
            "truncated": self.truncated,
        }


def read_contents(policy_set: PolicySet, directory: Path) -> list[tuple[str, bytes]] | None:
    """The directory's files as they were when ``policy_set`` was loaded from it, or None
    when they changed since (their hash is no longer the set's version) or cannot be read."""
    try:
        contents = [(p.name, p.read_bytes()) for p in policy_files(directory)]
    except (OSError, PolicyLoadError):
        return None
    if policy_version(contents, policy_set.groups) != policy_set.version:
        return None
    return contents


class Fingerprints:
    """The fingerprints of the last snapshot's policies, by object: a reload keeps the
    Policy objects of the files it did not parse again (the store's ParseCache), so after
    a one-file edit only that file's policies are hashed again. Holds one set's worth."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Policy, str]] = {}

    def of(self, policies: Sequence[Policy]) -> dict[str, tuple[str, str]]:
        """Each policy's (fingerprint, state) by id."""
        known, kept = self._known, {}
        found: dict[str, tuple[str, str]] = {}
        for policy in policies:
            entry = known.get(id(policy))
            value = entry[1] if entry is not None and entry[0] is policy else fingerprint(policy)
            kept[id(policy)] = (policy, value)
            found[policy.id] = (value, policy.state.value)
        self._known = kept
        return found


def snapshot(
    policy_set: PolicySet,
    contents: Sequence[tuple[str, bytes]] | None,
    fingerprints: Fingerprints | None = None,
) -> Snapshot:
    """What to store of ``policy_set`` (CPU: run it in a worker thread). Without
    ``contents`` (the files changed before they were read again) no file is recorded;
    ``fingerprints`` remembers the policies of the previous call's set."""
    files: list[FileText] = []
    budget = MAX_TEXT_BYTES
    ordered = sorted(contents or ())
    for name, raw in ordered[:MAX_FILES]:
        kept = raw
        if len(raw) > budget:
            cut = raw.rfind(b"\n", 0, budget + 1)
            kept = raw[: cut + 1] if cut >= 0 else b""
        budget -= len(kept)
        files.append(
            FileText(
                name,
                len(raw),
                hashlib.sha256(raw).hexdigest(),
                kept.decode("utf-8", "replace"),
                len(kept) < len(raw),
            )
        )
    policies = None
    if len(policy_set.policies) <= MAX_POLICIES:
        policies = (fingerprints or Fingerprints()).of(policy_set.policies)
    return Snapshot(
        policy_set.version,
        tuple(files),
        policies,
        len(policy_set.policies),
        files_complete=contents is not None and len(ordered) <= MAX_FILES,
    )


def fingerprint(policy: Policy) -> str:
    """A hash of what a policy says, the same in every process (no set or string hash
    order, no file position): two versions' policies of one id differ iff it differs."""
    text = json.dumps(_canonical(policy), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_SCALARS = (str, int, float, bool)
_FIELDS: dict[type, tuple[str, ...]] = {}  # the compared fields of each dataclass met


def _canonical(value: object) -> object:
    """JSON-able and independent of hash order; fields that are None are left out, so a
    field added to the model later does not change the fingerprints of stored versions."""
    if value is None or (isinstance(value, _SCALARS) and not isinstance(value, Enum)):
        return value
    kind = type(value)
    names = _FIELDS.get(kind)
    if names is None and dataclasses.is_dataclass(value):
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(value) if f.compare)
    if names is not None:
        return {
            name: _canonical(field) for name in names if (field := getattr(value, name)) is not None
        }
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, frozenset | set):
        items = [_canonical(v) for v in value]
        if all(isinstance(item, str) for item in items):
            return sorted(items)  # type: ignore[type-var]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    if isinstance(value, tuple | list):
        return [_canonical(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    return repr(value)


@dataclass(frozen=True)
class FileDiff:
    """One file that differs between two versions, as a unified diff of the stored text."""

    name: str
    status: str  # added, removed, changed
    diff: str
    truncated: bool  # a side's text was cut at the cap, or the diff at MAX_DIFF_LINES


@dataclass(frozen=True)
class VersionDiff:
    files: tuple[FileDiff, ...]
    unchanged_files: int
    policies: PolicyDiff | None  # None: a side has more than MAX_POLICIES policies

    def as_dict(self) -> dict[str, object]:
        policies = self.policies
        return {
            "files": [dataclasses.asdict(f) for f in self.files],
            "unchanged_files": self.unchanged_files,
            "policies": None
            if policies is None
            else {
                "added": list(policies.added),
                "changed": list(policies.changed),
                "retracted": list(policies.retracted),
                "removed": list(policies.removed),
            },
        }


def compare(old: Snapshot, new: Snapshot) -> VersionDiff:
    """What changed from ``old`` to ``new``: per file a unified diff, and which policies
    were added, changed, retracted or removed (CPU: a worker thread's job)."""
    before = {f.name: f for f in old.files}
    after = {f.name: f for f in new.files}
    files: list[FileDiff] = []
    unchanged = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is not None and b is not None and a.sha256 == b.sha256:
            unchanged += 1
            continue
        status = "added" if a is None else "removed" if b is None else "changed"
        lines = list(
            difflib.unified_diff(
                a.text.splitlines() if a else [],
                b.text.splitlines() if b else [],
                fromfile=f"{old.version}/{name}" if a else "/dev/null",
                tofile=f"{new.version}/{name}" if b else "/dev/null",
                lineterm="",
            )
        )
        cut = len(lines) > MAX_DIFF_LINES
        truncated = cut or bool(a and a.truncated) or bool(b and b.truncated)
        files.append(FileDiff(name, status, "\n".join(lines[:MAX_DIFF_LINES]), truncated))
    return VersionDiff(tuple(files), unchanged, _policy_changes(old, new))


def _policy_changes(old: Snapshot, new: Snapshot) -> PolicyDiff | None:
    if old.policies is None or new.policies is None:
        return None
    a, b = old.policies, new.policies
    retracted = PolicyState.RETRACTED.value
    gone_back = sorted(
        pid for pid in set(a) & set(b) if b[pid][1] == retracted and a[pid][1] != retracted
    )
    return PolicyDiff(
        added=tuple(sorted(set(b) - set(a))),
        changed=tuple(
            sorted(pid for pid in set(a) & set(b) if a[pid] != b[pid] and pid not in gone_back)
        ),
        retracted=tuple(gone_back),
        removed=tuple(sorted(set(a) - set(b))),
    )
