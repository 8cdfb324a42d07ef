"""Read a policy directory into a validated PolicySet, reporting every problem at once.

Which files count: regular files (or symlinks to them) named ``*.toml`` directly in the
directory, skipping dot-files. That covers editor temporaries (``.ban.toml.swp``,
``.#ban.toml``, ``ban.toml~``) and a Kubernetes ConfigMap mount, whose real files live in
``..data/`` behind per-file symlinks at the top level.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from gateway.config.toml import Table, TomlFile, parse_toml
from gateway.domain import Access, Action, DeviceClass, Platform, PolicyState
from gateway.errors import PolicyLoadError, Problem
from gateway.policy.model import (
    ALL_ACCESS,
    Conditions,
    Exemptions,
    ModelPattern,
    Policy,
    PolicySet,
    Rollout,
    RolloutStage,
    SourceRef,
)
from gateway.policy.versions import parse_range

POLICY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

_SCOPE_KEYS = {
    "platform",
    "device_class",
    "model",
    "os_version",
    "managed",
    "users",
    "groups",
    "device_ids",
}
_MATCH_KEYS = _SCOPE_KEYS | {"apps_any", "apps_all", "posture", "all_devices"}

# Policy text reaches SMTP replies, the X-Compliance-Notice header, notice mail, logs and
# the admin's terminal, so it is refused at load when it holds a control character (C0,
# DEL, C1, and the Unicode line/paragraph separators): a CR LF would forge reply lines or
# headers, an ESC would drive a terminal.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The longest reply carrying policy text is "250 2.0.0 Message accepted. NOTICE: " (37
# octets) + message + " (enforced from <ISO time>)" (at most 49) + CRLF: with 400
# characters (the reply is sent as ASCII, one octet each) it stays within RFC 5321's 512
# octets per reply line (s 4.5.3.1.5), and the X-Compliance-Notice header line within RFC
# 5322's 998 (s 2.1.1) with room for the policy ids.
MAX_POLICY_TEXT = 400
_TEXT_KEYS = ("title", "message", "retracted_reason")


def policy_files(directory: Path) -> list[Path]:
    """The files that make up a policy directory, in a stable order."""
    if not directory.is_dir():
        raise PolicyLoadError(
            [Problem(str(directory), None, "", "policy directory does not exist")]
        )
    return sorted(
        p
        for p in directory.iterdir()
        if p.name.endswith(".toml") and not p.name.startswith(".") and p.is_file()
    )


def ignored_files(directory: Path) -> list[tuple[Path, str]]:
    """What a policy directory holds that the loader skips, with why: a ``ban.tml`` typo
    would otherwise load as "no policies" and, deployed, retract every ban."""
    if not directory.is_dir():
        return []
    ignored: list[tuple[Path, str]] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            ignored.append((path, "hidden (its name starts with a dot)"))
        elif not path.is_file():
            ignored.append((path, "not a regular file (subdirectories are not read)"))
        elif not path.name.endswith(".toml"):
            ignored.append((path, "not a .toml file"))
    return ignored


def policy_version(
    contents: Iterable[tuple[str, bytes]], groups: Mapping[str, frozenset[str]]
) -> str:
    """A content hash: identical directories (and group tables) give identical versions."""
    digest = hashlib.sha256()
    for name, data in sorted(contents):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    for group in sorted(groups):
        digest.update(
            b"group\0" + group.encode() + b"\0" + "\0".join(sorted(groups[group])).encode()
        )
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class ParsedFile:
    policies: tuple[Policy, ...]
    problems: tuple[Problem, ...]


def parse_policy_file(
    raw: bytes, path: Path, name: str, groups: Mapping[str, frozenset[str]]
) -> ParsedFile:
    """One file's policies and problems. A module-level function of picklable arguments,
    so that a store can run it in another process."""
    parsed = parse_toml(raw, path, name)
    if isinstance(parsed, Problem):
        return ParsedFile((), (parsed,))
    problems: list[Problem] = []
    policies = _policies_in(parsed, groups, problems)
    return ParsedFile(tuple(policies), tuple(problems))


FileParser = Callable[[bytes, Path, str, Mapping[str, frozenset[str]]], ParsedFile]


class ParseCache:
    """Files parsed by the previous load, keyed by name and content hash: a reload after
    one edited file parses that file only (TOML parsing is most of a 10,000-policy load).
    Only valid for one groups table, which is why a PolicyStore owns one. ``parser`` parses
    a file not in the cache (the store may hand it to another process)."""

    def __init__(self, parser: FileParser = parse_policy_file) -> None:
        self._parser = parser
        self._files: dict[tuple[str, bytes], ParsedFile] = {}
        self._next: dict[tuple[str, bytes], ParsedFile] = {}

    def parse(
        self, raw: bytes, path: Path, name: str, groups: Mapping[str, frozenset[str]]
    ) -> ParsedFile:
        key = (name, hashlib.sha256(raw).digest())
        found = self._files.get(key)
        if found is None:
            found = self._parser(raw, path, name, groups)
        self._next[key] = found
        return found

    def begin(self) -> None:
        self._next = {}

    def end(self) -> None:
        """Keep the files of this load only, so the cache never outgrows the directory."""
        self._files = self._next


def load_policy_dir(
    directory: Path,
    groups: Mapping[str, frozenset[str]] | None = None,
    cache: ParseCache | None = None,
    files: Sequence[Path] | None = None,
) -> PolicySet:
    """Load and validate a policy directory (or only ``files`` of it); raises
    PolicyLoadError listing every problem."""
    groups = {
        name: frozenset(m.casefold() for m in members) for name, members in (groups or {}).items()
    }
    cache = cache or ParseCache()
    problems: list[Problem] = []
    policies: list[Policy] = []
    contents: list[tuple[str, bytes]] = []
    files_of: list[str] = []  # each policy's file, for a duplicate without a source
    cache.begin()
    for path in policy_files(directory) if files is None else files:
        name = _display(directory, path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            problems.append(Problem(name, None, "", f"cannot read file: {exc.strerror or exc}"))
            continue
        parsed = cache.parse(raw, path, name, groups)
        problems.extend(parsed.problems)
        contents.append((path.name, raw))
        policies.extend(parsed.policies)
        files_of.extend([path.name] * len(parsed.policies))
    cache.end()
    ids = [policy.id for policy in policies]
    if len(set(ids)) != len(ids):  # rare: find and name the duplicates one by one
        policies = _first_of_each_id(policies, files_of, problems)
    if problems:
        raise PolicyLoadError(sorted(problems, key=lambda p: (p.file, p.line or 0)))
    return PolicySet(tuple(policies), policy_version(contents, groups), groups)


def _first_of_each_id(
    all_policies: list[Policy], files_of: list[str], problems: list[Problem]
) -> list[Policy]:
    """The first policy of each id; a problem for each later one."""
    policies: list[Policy] = []
    first_seen: dict[str, SourceRef] = {}
    for policy, file in zip(all_policies, files_of, strict=True):
        earlier = first_seen.get(policy.id)
        if earlier is not None:
            problems.append(
                Problem(
                    policy.source.file if policy.source else file,
                    policy.source.line if policy.source else None,
                    "id",
                    f"duplicate policy id '{policy.id}' (first defined at {earlier})",
                )
            )
            continue
        if policy.source:
            first_seen[policy.id] = policy.source
        policies.append(policy)
    return policies


def _display(directory: Path, path: Path) -> str:
    return str(directory / path.name)


def _policies_in(
    source: TomlFile, groups: Mapping[str, frozenset[str]], problems: list[Problem]
) -> list[Policy]:
    root = Table(source, source.data, (), problems)
    tables = root.tables("policy")
    root.finish()
    if not tables and "policy" not in source.data:
        problems.append(Problem(source.display_name, None, "", "no [[policy]] tables in this file"))
    result = []
    for table in tables:
        before = len(problems)
        policy = _read_policy(table, groups)
        if policy is not None and len(problems) == before:
            result.append(policy)
    return result


def _read_policy(table: Table, groups: Mapping[str, frozenset[str]]) -> Policy | None:
    policy_id = table.text("id", required=True)
    if policy_id is not None and not POLICY_ID_RE.match(policy_id):
        table.problem(
            "id",
            f"'{policy_id}' is not a valid id: use lowercase letters, digits, '.', '_' and '-'",
        )
        policy_id = None
    title = _policy_text(table, "title")
    action_text = table.choice("action", [a.label for a in Action], required=True)
    state_text = table.choice("state", [s.value for s in PolicyState])
    message = _policy_text(table, "message")
    announce_at = table.moment("announce_at")
    enforce_at = table.moment("enforce_at")
    retracted_reason = _policy_text(table, "retracted_reason")
    confirm_impact = table.integer("confirm_impact", minimum=0)
    grace_hours = table.number("grace_hours")
    rollout_table = table.table("rollout")
    rollout = _read_rollout(rollout_table, groups) if rollout_table is not None else None
    match_table = table.table("match", required=True)
    scope_table = table.table("scope")
    exempt_table = table.table("exempt")

    problems_before_match = len(table.problems)
    if match_table is not None and match_table.has("access"):
        match_table.problem("access", "access belongs in scope: write scope.access instead")
        match_table._seen.add("access")
    match = _read_conditions(match_table, _MATCH_KEYS, groups) if match_table else None
    match_had_problems = len(table.problems) > problems_before_match
    access = _read_access(scope_table) if scope_table else ALL_ACCESS
    scope = _read_conditions(scope_table, _SCOPE_KEYS, groups) if scope_table else Conditions()
    exempt = _read_exemptions(exempt_table, groups) if exempt_table else Exemptions()
    table.finish()

    if announce_at and enforce_at and enforce_at < announce_at:
        table.problem(
            "enforce_at",
            f"enforce_at ({enforce_at.isoformat()}) is before announce_at ({announce_at.isoformat()})",
        )
    if announce_at and not enforce_at:
        table.problem(
            "announce_at",
            "announce_at needs an enforce_at: the announcement warns until that deadline",
        )
    if retracted_reason is not None and state_text != PolicyState.RETRACTED.value:
        table.problem(
            "retracted_reason", 'retracted_reason is only meaningful with state = "retracted"'
        )
    if match is not None:
        if match.is_empty() and not match_had_problems:
            table.problem(
                "match",
                "policy matches nothing: give at least one condition, or all_devices = true "
                "to match every device in scope",
            )
        for name in ("platforms", "device_classes"):
            left, right = getattr(match, name), getattr(scope, name)
            if left is not None and right is not None and left.isdisjoint(right):
                table.problem(
                    "match",
                    f"match.{name} and scope.{name} share no value: the policy matches nothing",
                )

    if policy_id is None or action_text is None or match is None or access is None:
        return None
    action = Action.parse(action_text)
    state = PolicyState(state_text) if state_text else PolicyState.ENFORCE
    return Policy(
        id=policy_id,
        action=action,
        state=state,
        message=message or title or f"Mail from this device is restricted by policy {policy_id}.",
        match=match,
        scope=scope,
        exempt=exempt,
        access=access,
        title=title,
        announce_at=announce_at,
        enforce_at=enforce_at,
        retracted_reason=retracted_reason,
        confirm_impact=confirm_impact,
        rollout=rollout,
        grace=timedelta(hours=grace_hours) if grace_hours else None,
        source=SourceRef(table.source.display_name, table.source.line_of(table.path)),
    )


def _read_rollout(table: Table, groups: Mapping[str, frozenset[str]]) -> Rollout | None:
    """``[policy.rollout]``: ``percent = N`` alone, or ``[[policy.rollout.stage]]`` tables
    with ``at`` and ``percent`` and/or ``groups``, in date order."""
    percent = _percent(table, "percent")
    stage_tables = table.tables("stage")
    table.finish()
    if percent is not None and stage_tables:
        table.problem(
            "percent", "give rollout.percent or [[policy.rollout.stage]] tables, not both"
        )
        return None
    if percent is not None:
        return Rollout((RolloutStage(None, percent),))
    if not stage_tables:
        if "percent" not in table.data and "stage" not in table.data:
            table.problem(
                None, "empty rollout: give percent = N or [[policy.rollout.stage]] tables"
            )
        return None
    stages: list[RolloutStage] = []
    for stage_table in stage_tables:
        at = stage_table.moment("at", required=True)
        stage_percent = _percent(stage_table, "percent")
        stage_groups = _check_groups(stage_table, "groups", stage_table.texts("groups"), groups)
        stage_table.finish()
        if stage_percent is None and stage_groups is None:
            if not stage_table.has("percent") and not stage_table.has("groups"):
                stage_table.problem(None, "a stage needs percent = N, groups = [...], or both")
            return None
        if at is None:
            return None
        if stages and stages[-1].at is not None and at <= stages[-1].at:
            stage_table.problem("at", "stages must be in date order, each after the one before")
            return None
        stages.append(RolloutStage(at, stage_percent, stage_groups))
    return Rollout(tuple(stages))


def _percent(table: Table, key: str) -> float | None:
    value = table.number(key)
    if value is not None and value > 100:
        table.problem(key, f"a percentage is at most 100, got {value:g}")
        return None
    return value


def _policy_text(table: Table, key: str) -> str | None:
    """A text key that reaches replies, headers, notices, logs and terminals: one line of
    printable text, at most MAX_POLICY_TEXT characters."""
    value = table.text(key)
    if value is None:
        return None
    found = _CONTROL_RE.search(value)
    if found is not None:
        table.problem(
            key,
            f"contains a control character (U+{ord(found.group()):04X}) at position "
            f"{found.start() + 1}: policy text goes into SMTP replies and headers, so write "
            "it on one line of printable characters",
        )
        return None
    if len(value) > MAX_POLICY_TEXT:
        table.problem(
            key,
            f"is {len(value)} characters long; at most {MAX_POLICY_TEXT} keep the SMTP reply "
            "line within RFC 5321's 512 octets",
        )
        return None
    return value


def _read_access(scope: Table) -> frozenset[Access] | None:
    """``scope.access``: what the policy gates. Absent means both sending and syncing;
    None (after a problem) when the value is not a non-empty list of known accesses."""
    allowed = [a.value for a in Access]
    raw = scope.data.get("access")
    if isinstance(raw, str):  # the likeliest slip: a bare string instead of a list
        scope._seen.add("access")
        scope.problem("access", f'expected a list of strings, got a string: write ["{raw}"]')
        return None
    if raw == []:
        scope._seen.add("access")
        scope.problem(
            "access",
            "empty list gates nothing; list send, sync or both, or leave the key out for both",
        )
        return None
    values = scope.texts("access")
    if values is None:
        return None if scope.has("access") else ALL_ACCESS
    for value in values:
        if value not in allowed:
            scope.problem("access", f"'{value}' is not one of: {', '.join(allowed)}")
            return None
    return frozenset(Access(v) for v in values)


def _enum_set(
    table: Table, key: str, kind: type[Platform] | type[DeviceClass]
) -> frozenset[object] | None:
    values = table.texts(key)
    if values is None:
        return None
    allowed = [member.value for member in kind]
    result = set()
    for value in values:
        if value not in allowed:
            table.problem(key, f"'{value}' is not one of: {', '.join(allowed)}")
            return None
        result.add(kind(value))
    return frozenset(result)


def _check_groups(
    table: Table, key: str, names: list[str] | None, groups: Mapping[str, frozenset[str]]
) -> frozenset[str] | None:
    if names is None:
        return None
    unknown = [n for n in names if n not in groups]
    if unknown:
        known = ", ".join(sorted(groups)) or "none are defined"
        table.problem(
            key,
            f"unknown group(s) {', '.join(unknown)} (groups come from [groups] in gateway.toml: {known})",
        )
        return None
    return frozenset(names)


def _folded(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.casefold() for v in values)


def _read_conditions(
    table: Table, allowed: set[str], groups: Mapping[str, frozenset[str]]
) -> Conditions:
    os_version = None
    os_text = table.text("os_version")
    if os_text is not None:
        try:
            os_version = parse_range(os_text)
        except ValueError as exc:
            table.problem("os_version", str(exc))
        else:
            if os_version.is_empty():
                table.problem(
                    "os_version", f"no version satisfies '{os_text}': the policy matches nothing"
                )
    models = table.texts("model")
    posture = (
        table.mapping("posture", lambda v: isinstance(v, bool), "true or false")
        if "posture" in allowed
        else None
    )
    if posture is not None and not posture:
        table.problem("posture", "empty posture table matches nothing")
    all_devices = table.flag("all_devices") if "all_devices" in allowed else None
    if all_devices is False:
        table.problem("all_devices", "all_devices = false means nothing; remove it")
    apps_any = table.texts("apps_any") if "apps_any" in allowed else None
    apps_all = table.texts("apps_all") if "apps_all" in allowed else None
    conditions = Conditions(
        apps_any=frozenset(apps_any) if apps_any is not None else None,
        apps_all=frozenset(apps_all) if apps_all is not None else None,
        platforms=_enum_set(table, "platform", Platform),  # type: ignore[arg-type]
        device_classes=_enum_set(table, "device_class", DeviceClass),  # type: ignore[arg-type]
        models=tuple(ModelPattern.compile(m) for m in models) if models is not None else None,
        os_version=os_version,
        posture=tuple(sorted(posture.items())) if posture else None,
        managed=table.flag("managed"),
        users=_folded(table.texts("users")),
        groups=_check_groups(table, "groups", table.texts("groups"), groups),
        device_ids=frozenset(ids) if (ids := table.texts("device_ids")) is not None else None,
        all_devices=bool(all_devices),
    )
    table.finish()
    return conditions


def _read_exemptions(table: Table, groups: Mapping[str, frozenset[str]]) -> Exemptions:
    exempt = Exemptions(
        users=_folded(table.texts("users", allow_empty=True)) or frozenset(),
        groups=_check_groups(table, "groups", table.texts("groups", allow_empty=True), groups)
        or frozenset(),
        device_ids=frozenset(table.texts("device_ids", allow_empty=True) or ()),
    )
    table.finish()
    return exempt
