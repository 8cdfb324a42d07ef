"""Policy tests for admins: described devices, a time, and the decision expected.

``gateway test POLICY_DIR CASES.toml`` runs them, as ``opa test`` does for Rego, so that a
policy change can be checked in the admins' own CI before it is merged. Pure: the caller
reads the files; cases are decided by the same engine the gateway runs.

A cases file::

    [defaults]                     # optional; any case key, used where a case omits it
    at = 2020-07-11T09:00:00Z
    platform = "ios"

    [[case]]
    name = "a phone with TikTok is held after the deadline"
    user = "carol@example.test"
    class = "mobile"               # mobile, tablet, desktop, browser
    apps = ["com.zhiliaoapp.musically"]
    expect = "hold"                # allow, warn, defer, hold, reject
    expect_policy = "remove-tiktok"  # optional: the deciding policy
    expect_phase = "enforce"       # optional: announce or enforce
    access = "sync"                # optional: decide a login that syncs (default: "send")
    device_id = "phone-7"          # optional (default: the case name): rollout buckets use it
    first_seen = 2020-07-12T09:00:00Z  # optional: when the device was first seen matching
                                   # (grace_hours counts from it; default: at, never seen)
    expect_outside_rollout = true  # optional: a staged rollout left this device out
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from xml.etree import ElementTree

from gateway.config.toml import Table, TomlFile
from gateway.domain import (
    Access,
    Action,
    Decision,
    Device,
    DeviceClaims,
    DeviceClass,
    Phase,
    Platform,
)
from gateway.errors import Problem
from gateway.policy.engine import CompiledPolicySet, decide

CASE_KEYS_WITH_DEFAULTS = (
    "at", "user", "device_id", "platform", "class", "apps", "posture", "model",
    "os_version", "managed", "access", "first_seen",
)  # fmt: skip
ACTIONS = [a.label for a in Action]
PHASES = [p.value for p in Phase]


@dataclass(frozen=True)
class Case:
    name: str
    line: int | None
    at: datetime
    claims: DeviceClaims
    expect: Action
    expect_policy: str | None = None
    expect_phase: Phase | None = None
    access: Access = Access.SEND
    first_seen: datetime | None = None
    expect_outside_rollout: bool | None = None


@dataclass(frozen=True)
class CaseResult:
    case: Case
    decision: Decision
    differences: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.differences


def read_cases(source: TomlFile) -> tuple[list[Case], list[Problem]]:
    """The cases of a parsed file, and every problem found (file:line:key each)."""
    problems: list[Problem] = []
    root = Table(source, source.data, (), problems)
    defaults = root.table("defaults")
    default_values: dict[str, object] = {}
    if defaults is not None:
        for key in CASE_KEYS_WITH_DEFAULTS:
            if defaults.has(key):
                default_values[key] = defaults.data[key]
                defaults._seen.add(key)  # validated where each case reads it
        defaults.finish()
    tables = root.tables("case")
    if not tables and not problems:
        root.problem("case", "no [[case]] tables: write at least one case")
    cases = [case for t in tables if (case := _read_case(t, default_values)) is not None]
    names: dict[str, int] = {}
    for index, case in enumerate(cases):
        if case.name in names:
            tables[index].problem("name", f"duplicate case name '{case.name}'")
        names[case.name] = index
    root.finish()
    return cases, problems


def _read_case(table: Table, defaults: Mapping[str, object]) -> Case | None:
    for key, value in defaults.items():
        table.data.setdefault(key, value)
    before = len(table.problems)
    name = table.text("name", required=True)
    at = table.moment("at", required=True)
    user = table.text("user", required=True)
    device_id = table.text("device_id")
    platform = table.choice("platform", [p.value for p in Platform])
    device_class = table.choice("class", [c.value for c in DeviceClass], required=True)
    apps = table.texts("apps", allow_empty=True) or []
    posture = table.mapping("posture", lambda v: isinstance(v, bool), "true or false") or {}
    model = table.text("model")
    os_version = table.text("os_version")
    managed = table.flag("managed")
    access = table.choice("access", [a.value for a in Access])
    expect = table.choice("expect", ACTIONS, required=True)
    expect_policy = table.text("expect_policy")
    expect_phase = table.choice("expect_phase", PHASES)
    first_seen = table.moment("first_seen")
    expect_outside_rollout = table.flag("expect_outside_rollout")
    table.finish()
    if (
        len(table.problems) > before
        or name is None
        or at is None
        or user is None
        or device_class is None
        or expect is None
    ):
        return None
    claims = DeviceClaims(
        issuer="gateway-test",
        subject=user,
        audience=("gateway-test",),
        issued_at=at - timedelta(minutes=1),
        expires_at=at + timedelta(minutes=15),
        device=Device(
            id=device_id or f"{name}",
            platform=Platform(platform or "ios"),
            device_class=DeviceClass(device_class),
            model=model,
            os_version=os_version,
            managed=managed,
        ),
        apps=frozenset(apps),
        posture=posture,
    )
    return Case(
        name=name,
        line=table.source.line_of(table.path),
        at=at,
        claims=claims,
        expect=Action.parse(expect),
        expect_policy=expect_policy,
        expect_phase=Phase(expect_phase) if expect_phase else None,
        access=Access(access) if access else Access.SEND,
        first_seen=first_seen,
        expect_outside_rollout=expect_outside_rollout,
    )


def run_case(compiled: CompiledPolicySet, case: Case) -> CaseResult:
    seen = (
        {p.id: case.first_seen for p in compiled.source.policies if p.grace is not None}
        if case.first_seen is not None
        else None
    )
    decision = decide(compiled, case.claims, case.at, case.access, seen)
    differences = []
    if decision.action is not case.expect:
        syncing = " for sync" if case.access is Access.SYNC else ""
        differences.append(f"expected {case.expect.label}{syncing}, got {_describe(decision)}")
    if case.expect_policy is not None and case.expect_policy not in decision.policy_ids:
        deciding = ", ".join(decision.policy_ids) or "no policy"
        differences.append(f"expected policy {case.expect_policy}, decided by {deciding}")
    if case.expect_phase is not None and decision.phase is not case.expect_phase:
        phase = decision.phase.value if decision.phase else "no phase"
        differences.append(f"expected phase {case.expect_phase.value}, got {phase}")
    outside = bool(decision.outside_rollout)
    if case.expect_outside_rollout is not None and outside is not case.expect_outside_rollout:
        got = ", ".join(decision.outside_rollout) if outside else "in every rollout"
        differences.append(
            f"expected {'outside' if case.expect_outside_rollout else 'inside'} the rollout, "
            f"got {'outside ' if outside else ''}{got}"
        )
    return CaseResult(case, decision, tuple(differences))


def _describe(decision: Decision) -> str:
    text = decision.action.label
    if decision.policy_ids:
        text += f" by {', '.join(decision.policy_ids)}"
    if decision.phase is not None:
        text += f" ({decision.phase.value})"
    if decision.exempted:
        text += f"; exempted by {', '.join(decision.exempted)}"
    if decision.outside_rollout:
        text += f"; outside the rollout of {', '.join(decision.outside_rollout)}"
    for policy_id, deadline in decision.deadlines.items():
        text += f"; {policy_id} enforced on this device from {deadline}"
    return text


def junit_xml(results: list[CaseResult], suite: str) -> bytes:
    """JUnit XML, the format CI systems show test results from."""
    failures = sum(not r.passed for r in results)
    root = ElementTree.Element(
        "testsuite", name=suite, tests=str(len(results)), failures=str(failures), errors="0"
    )
    for result in results:
        case = ElementTree.SubElement(
            root, "testcase", classname=suite, name=result.case.name, time="0"
        )
        if not result.passed:
            failure = ElementTree.SubElement(
                case, "failure", message=result.differences[0], type="PolicyDecision"
            )
            failure.text = "\n".join(result.differences)
    xml: bytes = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml
