"""The `gateway` command. The only module that prints for humans and exits.

Exit codes: 0 success; 1 the thing checked is bad (invalid policies, refused token);
2 usage or configuration errors.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.config.settings import Settings, default_config_path, load_settings
from gateway.domain import Access, Overrides, PolicyMatch
from gateway.errors import (
    ConfigError,
    GatewayError,
    HoldStoreError,
    ListenError,
    PolicyLoadError,
    Problem,
    TokenError,
)
from gateway.policy.engine import compile_policy_set, decide
from gateway.policy.loader import ignored_files, load_policy_dir, policy_files

if TYPE_CHECKING:
    from gateway.hold.store import HeldMessage, HoldBackend, HoldFilter
    from gateway.policy.model import Policy, PolicySet
    from gateway.server import Worker
    from gateway.tokens.keyring import KeyRing

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2


class CliError(GatewayError):
    """A usage problem: printed as one line, exit 2."""


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CliError(
            f"--at: {text!r} is not an ISO 8601 date-time such as 2020-07-11T10:00:00-07:00"
        ) from exc
    if moment.tzinfo is None:
        raise CliError(f"--at: {text!r} has no UTC offset; add Z or e.g. -07:00")
    return moment


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.config) if args.config else default_config_path()
    if not path.exists():
        raise CliError(f"configuration file {path} does not exist (use --config or GATEWAY_CONFIG)")
    return load_settings(path)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


# --- check -------------------------------------------------------------------------------


def _check_target(
    args: argparse.Namespace,
) -> tuple[Path, list[Path] | None, dict[str, frozenset[str]]]:
    """(directory, the one file to check or None for the whole directory, groups)."""
    config_path = Path(args.config) if args.config else default_config_path()
    groups: dict[str, frozenset[str]] = {}
    target: Path | None = Path(args.policy_dir) if args.policy_dir else None
    if config_path.exists():
        settings = load_settings(config_path)
        groups = dict(settings.groups)
        target = target or settings.policy_dir
    elif target is None:
        raise CliError(f"no policy directory given and no configuration at {config_path}")
    assert target is not None
    if target.is_file():
        return target.parent, [target], groups
    if target.exists() and not target.is_dir():
        raise CliError(f"{target} is neither a policy directory nor a policy file")
    return target, None, groups


def _check_warnings(
    directory: Path, files: list[Path] | None, policies: int
) -> list[dict[str, str]]:
    warnings: list[dict[str, str]] = []
    if files is None:
        warnings = [
            {"file": str(path), "message": f"ignored: {why}"}
            for path, why in ignored_files(directory)
        ]
        if policies == 0:
            warnings.append(
                {
                    "file": str(directory),
                    "message": "no policies: deployed, this set would end every policy in force",
                }
            )
    elif not files[0].name.endswith(".toml") or files[0].name.startswith("."):
        warnings.append(
            {
                "file": str(files[0]),
                "message": "the gateway ignores this file in a policy directory (only *.toml are read)",
            }
        )
    return warnings


def cmd_check(args: argparse.Namespace) -> int:
    directory, files, groups = _check_target(args)
    shown = str(files[0]) if files else str(directory)
    try:
        policy_set = load_policy_dir(directory, groups, files=files)
    except PolicyLoadError as exc:
        warnings = _check_warnings(directory, files, policies=-1)
        if args.json:
            _print_json(
                {
                    "schema": 1,
                    "ok": False,
                    "directory": shown,
                    "problems": [
                        {"file": p.file, "line": p.line, "key": p.key, "message": p.message}
                        for p in exc.problems
                    ],
                    "warnings": warnings,
                }
            )
        else:
            for problem in exc.problems:
                print(_terminal_safe(str(problem)))
            for warning in warnings:
                print(
                    _terminal_safe(f"warning: {warning['file']}: {warning['message']}"),
                    file=sys.stderr,
                )
            print(
                f"{len(exc.problems)} problem(s) in {_terminal_safe(shown)}; nothing was changed",
                file=sys.stderr,
            )
        return EXIT_BAD
    checked = files if files is not None else policy_files(directory)
    warnings = _check_warnings(directory, files, len(policy_set.policies))
    states: dict[str, int] = {}
    for policy in policy_set.policies:
        states[policy.state.value] = states.get(policy.state.value, 0) + 1
    narrowed = _narrowed_by_access(policy_set)
    if args.json:
        _print_json(
            {
                "schema": 1,
                "ok": True,
                "directory": shown,
                "version": policy_set.version,
                "files": len(checked),
                "policies": len(policy_set.policies),
                "states": states,
                # Policies narrowed by scope.access; every other one gates both.
                "access_only": narrowed,
                "warnings": warnings,
            }
        )
    else:
        for warning in warnings:
            print(
                _terminal_safe(f"warning: {warning['file']}: {warning['message']}"), file=sys.stderr
            )
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no policies"
        version = f", version {policy_set.version}" if files is None else ""
        print(
            _terminal_safe(
                f"{shown}: OK, {len(policy_set.policies)} policies in {len(checked)} file(s) "
                f"({summary}){version}"
            )
        )
        if any(narrowed.values()):
            counts = ", ".join(
                f"{len(ids)} {access} only ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})"
                for access, ids in narrowed.items()
                if ids
            )
            print(f"access: {counts}; the others gate sending and syncing")
    return EXIT_OK


def _narrowed_by_access(policy_set: PolicySet) -> dict[str, list[str]]:
    """Ids of the policies whose scope.access names one access only, per access."""
    return {
        access.value: [p.id for p in policy_set.policies if p.access == frozenset({access})]
        for access in Access
    }


# --- explain -----------------------------------------------------------------------------


def _read_token(source: str) -> str:
    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    return text.strip()


def _keyring(settings: Settings) -> KeyRing:
    """The key files, plus each JWKS-publishing issuer's current keys, fetched once (as
    the server would at start)."""
    from gateway.tokens.jwks import JwksFetchError, fetch_jwks
    from gateway.tokens.keyring import KeyRing

    keyring = KeyRing(settings.tokens.issuers)
    for name, issuer in settings.tokens.issuers.items():
        if issuer.jwks_url is None:
            continue
        try:
            keys, _ = fetch_jwks(issuer.jwks_url)
        except JwksFetchError as exc:
            print(f"warning: JWKS of {name}: {exc}; using the key files only", file=sys.stderr)
            continue
        keyring.set_fetched(name, keys)
    return keyring


def cmd_explain(args: argparse.Namespace) -> int:
    from gateway.tokens.verify import TokenVerifier

    settings = _settings(args)
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    access = Access(args.access)
    try:
        raw = _read_token(args.token)
    except OSError as exc:
        raise CliError(f"--token: cannot read {args.token}: {exc.strerror or exc}") from exc
    try:
        claims = TokenVerifier(settings.tokens, keyring=_keyring(settings)).verify(raw, now)
    except TokenError as exc:
        if args.json:
            _print_json(
                {
                    "schema": 1,
                    "at": now.isoformat(),
                    "token": {"valid": False, "reason": exc.reason, "error": str(exc)},
                }
            )
        else:
            print(f"token refused ({exc.reason}): {exc}")
            if access is Access.SEND:
                print("SMTP: AUTH fails with 535 5.7.8")
            else:
                print("IMAP/POP3: the login fails (the token is not active)")
        return EXIT_BAD
    policy_set = load_policy_dir(settings.policy_dir, settings.groups)
    compiled = compile_policy_set(policy_set)
    first_seen = _first_seen_times(settings, policy_set, claims.device.id)
    overrides = _overrides(settings, now)
    decision = decide(compiled, claims, now, access, first_seen, overrides)
    # Policies that would apply to the other access only: the answer to "why does the
    # sync ban not show here?". Empty unless some policy narrows scope.access.
    other = Access.SYNC if access is Access.SEND else Access.SEND
    other_only: list[str] = []
    other_matches: dict[str, PolicyMatch] = {}
    if compiled.narrowed:
        here = {m.policy_id for m in (*decision.matches, *decision.audit)} | set(decision.exempted)
        there = decide(compiled, claims, now, other, first_seen, overrides)
        other_matches = {m.policy_id: m for m in (*there.matches, *there.audit)}
        other_only = sorted((set(other_matches) | set(there.exempted)) - here)
    sources = {p.id: str(p.source) for p in policy_set.policies}
    if args.json:
        _print_json(
            {
                "schema": 1,
                "at": now.isoformat(),
                "access": access.value,
                "token": {"valid": True, "claims": claims.summary()},
                "decision": decision.as_dict(),
                "first_seen": {k: v.isoformat() for k, v in first_seen.items()},
                # Policies that would apply for the other access: narrowed away from this one.
                "other_access_only": other_only,
            }
        )
        return EXIT_OK
    device = claims.device
    print(f"at:        {now.isoformat()}")
    print(
        f"token:     valid; {claims.subject}, device {device.id} ({device.platform.value} "
        f"{device.device_class.value}, model {device.model or '?'}, OS {device.os_version or '?'}), "
        f"{len(claims.apps)} app(s)"
    )
    print(f"policies:  version {decision.policy_version}")
    print(f"access:    {_ACCESS_TEXT[access]}")
    phase = f" ({decision.phase.value} phase)" if decision.phase else ""
    print(
        f"decision:  {decision.action.label.upper()}{phase}"
        + (f": {decision.message}" if decision.message else "")
    )
    for title, matches in (("matched", decision.matches), ("audit (would have)", decision.audit)):
        for match in matches:
            print(
                f"  {title:<20} {match.policy_id:<24} {match.action.label:<7} {match.phase.value:<9} "
                f"{sources.get(match.policy_id, '')}"
            )
    policies = policy_set.by_id()
    for match in (*decision.matches, *decision.audit):
        sys.stdout.write(
            _terminal_safe_lines(_held_back(policies[match.policy_id], match, first_seen, now))
        )
    for policy_id in decision.exempted:
        print(f"  {'exempted':<20} {policy_id:<24} {'':<7} {'':<9} {sources.get(policy_id, '')}")
    for text in decision.overridden:
        policy_id, _, why = text.partition(": ")
        print(f"  {'overridden':<20} {policy_id:<24} {why} (gateway policy overrides)")
    for policy_id in other_only:
        title = f"{other.value} only"
        found = other_matches.get(policy_id)
        action, phase_text = (found.action.label, found.phase.value) if found else ("", "")
        print(
            f"  {title:<20} {policy_id:<24} {action:<7} {phase_text:<9} {sources.get(policy_id, '')}"
        )
    return EXIT_OK


def _first_seen_times(
    settings: Settings, policy_set: PolicySet, device_id: str
) -> dict[str, datetime]:
    """This device's first-seen times for grace_hours, from the hold database (read only;
    none when no policy has a grace period or there is no database here)."""
    from gateway.hold.store import HoldStore

    if not any(p.grace for p in policy_set.policies) or not settings.hold.database.is_file():
        return {}
    store = HoldStore(settings.hold.database)
    try:
        return store.first_seen_times(device_id)
    except HoldStoreError as exc:
        print(f"warning: first-seen times: {exc}; grace counted from now", file=sys.stderr)
        return {}
    finally:
        store.close()


def _overrides(settings: Settings, now: datetime) -> Overrides:
    """The operator overrides in force (gateway policy suspend / exempt), as the running
    gateway applies them; none when there is no store here."""
    from gateway.hold.backend import open_store
    from gateway.hold.store import overrides_of

    if settings.store.url is None and not settings.hold.database.is_file():
        return Overrides()
    try:
        store = open_store(settings)
    except HoldStoreError as exc:
        print(f"warning: policy overrides: {exc}; none applied", file=sys.stderr)
        return Overrides()
    try:
        return overrides_of(store.policy_overrides(now))
    except HoldStoreError as exc:
        print(f"warning: policy overrides: {exc}; none applied", file=sys.stderr)
        return Overrides()
    finally:
        store.close()


def _held_back(
    policy: Policy, match: PolicyMatch, first_seen: dict[str, datetime], now: datetime
) -> str:
    """Why an enforcing policy only warns this device: its rollout stage, its own deadline."""
    text = ""
    if match.outside_rollout and policy.rollout is not None:
        stage = policy.rollout.current(now)
        where = f"current stage: {stage}" if stage else "no stage reached yet"
        text += (
            f"    {policy.id}: this device is outside the rollout ({where}): warned, not enforced\n"
        )
    if policy.grace is not None:
        seen = first_seen.get(policy.id)
        since = (
            f"first seen matching {seen.isoformat()}"
            if seen
            else "not seen matching yet: counted from now"
        )
        if match.deadline is not None:
            text += f"    {policy.id}: this device's deadline: {match.deadline.isoformat()} ({since}, grace {policy.grace})\n"
        else:
            text += f"    {policy.id}: this device's grace period is over ({since}, grace {policy.grace})\n"
    return text


_ACCESS_TEXT = {
    Access.SEND: "send (SMTP submission; --access sync decides an IMAP or POP3 login)",
    Access.SYNC: "sync (an IMAP or POP3 login; --access send decides SMTP submission)",
}


# --- token -------------------------------------------------------------------------------


def cmd_token_keygen(args: argparse.Namespace) -> int:
    from gateway.tokens.mint import write_dev_key_pair

    out = Path(args.out)
    existing = [
        path
        for path in (out / "dev-issuer.private.jwk.json", out / "dev-issuer.jwks.json")
        if path.exists()
    ]
    if existing and not args.force:
        print(
            f"gateway: {', '.join(map(str, existing))} already exist(s); "
            "tokens signed with the old key would stop verifying. Add --force to replace.",
            file=sys.stderr,
        )
        return EXIT_BAD
    private_path, public_path = write_dev_key_pair(out, kid=args.kid)
    print(f"wrote {private_path} (DEVELOPMENT private key: NOT FOR PRODUCTION)")
    print(f"wrote {public_path} (public JWKS: list it under [[tokens.issuers]] keys)")
    return EXIT_OK


def _posture(items: Sequence[str]) -> dict[str, bool]:
    posture = {}
    for item in items:
        name, _, value = item.partition("=")
        if value.lower() not in ("true", "false") or not name:
            raise CliError(f"--posture: {item!r} is not FLAG=true or FLAG=false")
        posture[name] = value.lower() == "true"
    return posture


def cmd_token_mint(args: argparse.Namespace) -> int:
    from gateway.tokens.mint import device_payload, load_dev_key, mint

    config_path = Path(args.config) if args.config else default_config_path()
    settings = load_settings(config_path) if config_path.exists() else None
    issuer = args.issuer or (next(iter(settings.tokens.issuers)) if settings else None)
    audience = args.audience or (settings.tokens.audience if settings else None)
    if not issuer or not audience:
        raise CliError("give --issuer and --audience, or a configuration that names them")
    key_path = (
        Path(args.key) if args.key else config_path.parent / "keys" / "dev-issuer.private.jwk.json"
    )
    try:
        key = load_dev_key(key_path)
    except (OSError, ValueError) as exc:
        raise CliError(f"--key: cannot load a private key from {key_path}: {exc}") from exc
    apps = [a for group in args.app for a in group.split(",") if a]
    payload = device_payload(
        issuer=issuer,
        audience=audience,
        subject=args.sub,
        device_id=args.device_id,
        platform=args.platform,
        device_class=args.device_class,
        model=args.model,
        os_version=args.os_version,
        managed=args.managed,
        apps=apps,
        posture=_posture(args.posture),
        issued_at=_parse_time(args.at) if args.at else datetime.now(UTC),
        lifetime=timedelta(seconds=args.lifetime),
    )
    print(mint(payload, key))
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------


def _terminal_safe(text: str) -> str:
    """Text from files shown on the admin's terminal: control characters as escapes, so a
    case name cannot move the cursor or rewrite what was printed before it."""
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text
    )


# --- test --------------------------------------------------------------------------------


def cmd_test(args: argparse.Namespace) -> int:
    """Decide each described device with the policies and compare with what was expected."""
    from gateway.config.toml import read_toml
    from gateway.policy.cases import junit_xml, read_cases, run_case

    groups: dict[str, frozenset[str]] = {}
    config_path = Path(args.config) if args.config else default_config_path()
    if args.config or config_path.exists():
        groups = dict(load_settings(config_path).groups)
    compiled = compile_policy_set(load_policy_dir(Path(args.policy_dir), groups))
    source = read_toml(Path(args.cases))
    if isinstance(source, Problem):
        raise ConfigError([source])
    cases, problems = read_cases(source)
    if problems:
        raise ConfigError(problems)
    results = [run_case(compiled, case) for case in cases]
    failed = [r for r in results if not r.passed]
    if args.junit:
        Path(args.junit).write_bytes(junit_xml(results, suite=Path(args.cases).stem))
    if args.json:
        _print_json(
            {
                "schema": 1,
                "ok": not failed,
                "policy_version": compiled.version,
                "cases": [
                    {
                        "name": r.case.name,
                        "line": r.case.line,
                        "access": r.case.access.value,
                        "passed": r.passed,
                        "decision": r.decision.as_dict(),
                        "differences": list(r.differences),
                    }
                    for r in results
                ],
            }
        )
    else:
        for result in results:
            where = f"{args.cases}:{result.case.line}" if result.case.line else args.cases
            mark = "ok  " if result.passed else "FAIL"
            print(f"{mark} {_terminal_safe(result.case.name)}  ({where})")
            for difference in result.differences:
                print(f"       {_terminal_safe(difference)}")
        print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return EXIT_BAD if failed else EXIT_OK


# What shtab completes an argument with (shtab.FILE and shtab.DIRECTORY, spelled out so
# that only `gateway completion` imports shtab).
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}


def _completes(action: argparse.Action, what: dict[str, str]) -> argparse.Action:
    action.complete = what  # type: ignore[attr-defined]  # read by shtab
    return action


def _add_config(parser: argparse.ArgumentParser) -> None:
    _completes(
        parser.add_argument(
            "--config", help="gateway.toml (default: $GATEWAY_CONFIG or config/gateway.toml)"
        ),
        _FILE,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Compliance Gateway: SMTP submission gated on device compliance.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check", help="validate a policy directory (exit 1 listing every problem)"
    )
    _completes(
        check.add_argument(
            "policy_dir",
            nargs="?",
            metavar="PATH",
            help="a policy directory, or one policy file (default: policy_dir from the configuration)",
        ),
        _FILE,
    )
    check.add_argument("--json", action="store_true")
    _add_config(check)
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser("explain", help="verify a token and explain the decision for it")
    _completes(
        explain.add_argument("--token", required=True, help="token file, or - for standard input"),
        _FILE,
    )
    explain.add_argument(
        "--at", help="evaluate as if now were this ISO 8601 time (token checks too)"
    )
    explain.add_argument(
        "--access",
        choices=[a.value for a in Access],
        default=Access.SEND.value,
        help="decide for sending (SMTP, the default) or for syncing (an IMAP or POP3 login)",
    )
    explain.add_argument("--json", action="store_true")
    _add_config(explain)
    explain.set_defaults(func=cmd_explain)

    token = sub.add_parser("token", help="development tokens (never for production)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    keygen = token_sub.add_parser("keygen", help="write a development Ed25519 key pair")
    _completes(
        keygen.add_argument(
            "--out", default="config/keys", help="directory (default: config/keys)"
        ),
        _DIRECTORY,
    )
    keygen.add_argument("--kid", default="dev-1")
    keygen.add_argument(
        "--force", action="store_true", help="replace a key pair that is already there"
    )
    _add_config(keygen)
    keygen.set_defaults(func=cmd_token_keygen)

    mint = token_sub.add_parser("mint", help="mint a device token with the development key")
    mint.add_argument("--sub", required=True, help="the user's mail address")
    mint.add_argument("--device-id", required=True)
    mint.add_argument("--platform", default="ios")
    mint.add_argument("--class", dest="device_class", default="mobile")
    mint.add_argument("--model")
    mint.add_argument("--os-version")
    mint.add_argument("--managed", action=argparse.BooleanOptionalAction, default=None)
    mint.add_argument(
        "--app", action="append", default=[], help="installed app id (repeat, or comma-separate)"
    )
    mint.add_argument("--posture", action="append", default=[], help="FLAG=true|false (repeat)")
    mint.add_argument("--lifetime", type=int, default=900, help="seconds (default 900)")
    mint.add_argument("--at", help="issue time, ISO 8601 (default: now)")
    _completes(
        mint.add_argument(
            "--key",
            help="private JWK (default: keys/dev-issuer.private.jwk.json beside the config)",
        ),
        _FILE,
    )
    mint.add_argument("--issuer", help="default: the first configured issuer")
    mint.add_argument("--audience", help="default: the configured audience")
    _add_config(mint)
    mint.set_defaults(func=cmd_token_mint)

    serve = sub.add_parser(
        "serve", help="run the gateway (SIGTERM drains, SIGHUP reloads policies)"
    )
    serve.add_argument(
        "--grace", type=float, default=30.0, help="seconds to let sessions finish on SIGTERM"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the SMTP ports (SO_REUSEPORT; default: "
        "[gateway] workers, 1); docs/operations.md#workers",
    )
    # Set by the supervisor for each worker it starts (gateway/supervisor.py).
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.add_argument("--worker-run", help=argparse.SUPPRESS)
    serve.add_argument("--worker-fds", help=argparse.SUPPRESS)
    _add_config(serve)
    serve.set_defaults(func=cmd_serve)

    impact = sub.add_parser(
        "impact", help="who a policy change would newly block or release (device inventory)"
    )
    _completes(
        impact.add_argument(
            "candidate_dir",
            nargs="?",
            help="candidate policy directory (default: impact of the live set)",
        ),
        _DIRECTORY,
    )
    impact.add_argument("--at", help="evaluate at this ISO 8601 time (default: now)")
    _completes(
        impact.add_argument(
            "--inventory",
            metavar="FILE",
            help="the hold database holding the device inventory (default: [hold] database)",
        ),
        _FILE,
    )
    impact.add_argument("--json", action="store_true")
    _add_config(impact)
    impact.set_defaults(func=cmd_impact)

    hold = sub.add_parser("hold", help="list, show, release and drop held mail")
    hold_sub = hold.add_subparsers(dest="hold_command", required=True, metavar="ACTION")
    hold_actions = (
        ("list", "list held messages"),
        ("show", "show one held message"),
        ("release", "release held messages (relayed by the running gateway)"),
        ("drop", "delete held messages without delivering them"),
    )
    for name, text in hold_actions:
        action = hold_sub.add_parser(name, help=text)
        if name == "show":
            action.add_argument("hold_id")
        else:
            action.add_argument("--user")
            action.add_argument("--device")
            action.add_argument("--policy")
        if name in ("release", "drop"):
            action.add_argument("ids", nargs="*", metavar="HOLD_ID")
            action.add_argument("--all", action="store_true", help="every held message")
        action.add_argument("--json", action="store_true")
        _add_config(action)
        action.set_defaults(func=cmd_hold)

    policy = sub.add_parser(
        "policy", help="suspend, resume or exempt from a policy without editing files"
    )
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    suspend = policy_sub.add_parser("suspend", help="a policy contributes nothing for a while")
    resume = policy_sub.add_parser("resume", help="end a policy's suspension now")
    exempt = policy_sub.add_parser(
        "exempt", help="break-glass: exempt one user or device from a policy for a while"
    )
    overrides = policy_sub.add_parser("overrides", help="list the overrides in force")
    for action in (suspend, resume, exempt):
        action.add_argument("policy_id", metavar="ID")
    for action in (suspend, exempt):
        action.add_argument("--for", dest="duration", metavar="DURATION", help="e.g. 30m, 2h, 1d")
        action.add_argument("--reason", default="", help="why (shown and audited)")
    suspend.set_defaults(until=None)
    exempt.add_argument("--until", metavar="TIME", help="ISO 8601 with a UTC offset")
    who = exempt.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--device")
    exempt.add_argument("--remove", action="store_true", help="end this exemption now")
    for action in (suspend, resume, exempt, overrides):
        action.add_argument("--json", action="store_true")
        _add_config(action)
        action.set_defaults(func=cmd_policy)

    store = sub.add_parser("store", help="the shared PostgreSQL store ([store] url)")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    migrate = store_sub.add_parser(
        "migrate",
        help="apply the schema migrations the store lacks (gateway serve also does at start)",
    )
    migrate.add_argument("--json", action="store_true")
    _add_config(migrate)
    migrate.set_defaults(func=cmd_store_migrate)

    test = sub.add_parser(
        "test",
        help="run policy test cases: described devices and the decisions expected (exit 1 on a failure)",
    )
    _completes(test.add_argument("policy_dir", help="the policy directory to test"), _DIRECTORY)
    _completes(
        test.add_argument("cases", help="a TOML file of [[case]] tables (docs/policies.md)"), _FILE
    )
    _completes(
        test.add_argument("--junit", metavar="FILE", help="also write JUnit XML for CI"), _FILE
    )
    test.add_argument("--json", action="store_true")
    _add_config(test)
    test.set_defaults(func=cmd_test)

    config = sub.add_parser(
        "config",
        help="print the effective configuration, defaults included, secrets masked",
    )
    config.add_argument(
        "-n",
        dest="changed_only",
        action="store_true",
        help="only the settings that differ from their defaults (as postconf -n)",
    )
    config.add_argument("--json", action="store_true")
    _add_config(config)
    config.set_defaults(func=cmd_config)

    status = sub.add_parser(
        "status",
        help="ask the running gateway for its state over the admin port (exit 1 if not ready)",
    )
    status.add_argument(
        "--admin", metavar="HOST:PORT", help="the admin listener (default: [admin] listen)"
    )
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.add_argument("--json", action="store_true")
    _add_config(status)
    status.set_defaults(func=cmd_status)

    admin = sub.add_parser("admin", help="admin API tokens (docs/admin.md)")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    token = admin_sub.add_parser("token", help="admin API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    token_add = token_sub.add_parser(
        "add", help="create a token: print it once, store only its hash in [admin] tokens_file"
    )
    token_add.add_argument("name", help="who holds it (shown in the audit trail)")
    token_add.add_argument("--role", choices=["viewer", "operator"], required=True)
    _completes(
        token_add.add_argument(
            "--file", metavar="PATH", help="the tokens file (default: [admin] tokens_file)"
        ),
        _FILE,
    )
    _add_config(token_add)
    token_add.set_defaults(func=cmd_admin_token_add)

    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or tcsh), generated from these options",
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    completion.set_defaults(func=cmd_completion)

    demo = sub.add_parser(
        "demo", help="play the story (ban, deadline, retraction) end to end on loopback"
    )
    demo.add_argument(
        "--dovecot",
        action="store_true",
        help="sync through a real Dovecot started from deploy/dovecot/ (Dovecot installed)",
    )
    demo.set_defaults(func=lambda args: _run_demo(dovecot=args.dovecot))
    return parser


# --- admin -------------------------------------------------------------------------------


def cmd_admin_token_add(args: argparse.Namespace) -> int:
    """The token goes to standard output once; only its SHA-256 is written to the file."""
    from gateway.admin.tokens import Role, add_token

    if args.file:
        path = Path(args.file)
    else:
        path_set = _settings(args).admin_tokens_file
        if path_set is None:
            raise CliError("no [admin] tokens_file in the configuration; set it, or give --file")
        path = path_set
    token = add_token(path, args.name, Role(args.role))
    print(token)
    print(
        f"token {args.name!r} ({args.role}) added to {path}; it is shown only now",
        file=sys.stderr,
    )
    return EXIT_OK


# --- impact ------------------------------------------------------------------------------


def cmd_impact(args: argparse.Namespace) -> int:
    from gateway.hold.backend import describe_store, open_store, read_preview_inputs
    from gateway.hold.store import HoldStore
    from gateway.policy.impact import LISTED_ROWS, preview_change, rollout_stages
    from gateway.policy.model import PolicySet

    settings = _settings(args)
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    live = compile_policy_set(load_policy_dir(settings.policy_dir, settings.groups))
    if args.candidate_dir:
        candidate = compile_policy_set(load_policy_dir(Path(args.candidate_dir), settings.groups))
    else:  # no candidate: what the live policies do, compared with having none
        candidate, live = live, compile_policy_set(PolicySet((), "none", settings.groups))
    shared = settings.store.url is not None and not args.inventory
    inventory = Path(args.inventory) if args.inventory else settings.hold.database
    since = now - settings.inventory_retention
    source = {
        "source": describe_store(settings) if shared else str(inventory),
        "seen_since": since.isoformat(),
        "retention_days": settings.inventory_retention.days,
    }
    if not shared and not inventory.is_file():
        return _impact_refused(
            args,
            source,
            f"no device inventory at {inventory}: it is the hold database a running gateway "
            "writes ([hold] database); run impact where the gateway runs, or give --inventory",
        )
    store: HoldBackend = open_store(settings) if shared else HoldStore(inventory)
    try:
        # As the gateway decides at --at: with the operator overrides then in force.
        both = live.source.policies + candidate.source.policies
        inputs = read_preview_inputs(store, since, now, both, settings.notices)
        devices = inputs.devices
        known = 0 if devices else len(store.devices(datetime.fromtimestamp(0, UTC)))
    finally:
        store.close()
    if not devices:
        older = f" ({known} seen before then)" if known else ""
        return _impact_refused(
            args,
            source,
            f"the inventory at {source['source']} has no device seen since {since:%Y-%m-%d}{older}: "
            "impact cannot say whom a change affects (the gateway records each device as it "
            "authenticates)",
        )
    change = preview_change(live, candidate, inputs, now, settings.max_newly_blocked_devices)
    report, told, refusal, overrides = change.report, change.told, change.refusal, inputs.overrides
    stages = rollout_stages(candidate, devices, now, overrides)
    code = EXIT_BAD if refusal is not None else EXIT_OK
    if args.json:
        _print_json(
            {
                "schema": 1,
                "ok": refusal is None,
                "at": now.isoformat(),
                "inventory": {**source, "devices": len(devices)},
                "live_version": live.version,
                "candidate_version": candidate.version,
                **report.as_dict(),
                "rollout_stages": [s.as_dict() for s in stages],
                # Who would be told: the announcement (each device once per policy: those
                # told before are not again) and the "disregard" notice of a withdrawal.
                "notices": {"enabled": settings.notices, **told.as_dict(LISTED_ROWS)},
                "overrides": {
                    "suspended": sorted(overrides.suspended),
                    "exempt": [{"policy_id": p, "subject": s} for p, s in sorted(overrides.exempt)],
                },
                "guard": {
                    "limit": settings.max_newly_blocked_devices,
                    "refused": refusal is not None,
                    "reason": refusal,
                },
            }
        )
        return code
    print(
        f"{report.devices} device(s) seen in the last {settings.inventory_retention.days} days, "
        f"at {now.isoformat()} (inventory: {inventory})"
    )
    if live.narrowed or candidate.narrowed:
        print(
            "access: some policies gate sending or syncing only; each device counts for what "
            "it was seen doing (devices recorded before that was tracked count as both)"
        )
    for title, key in (
        ("newly warned", "newly_warned"),
        ("newly deferred", "newly_deferred"),
        ("newly held", "newly_held"),
        ("newly rejected", "newly_rejected"),
        ("released", "released"),
    ):
        rows = report.as_dict()[key]
        assert isinstance(rows, list)
        devices_in = len({r["device_id"] for r in rows})
        print(f"{title + ':':<16} {devices_in} device(s), {len({r['user'] for r in rows})} user(s)")
        for row in rows:
            print(
                _terminal_safe(
                    f"    {row['device_id']:<24} {row['user']:<30} {'+'.join(row['access']):<10} "
                    f"{row['before']} -> {row['after']}  {','.join(row['policy_ids'])}"
                )
            )
    if not settings.notices:
        print("notices:         off ([gateway] notices = false): nobody is told")
    for title, rows_told, what in (
        ("announced to:", told.announced, "the warning, at once"),
        ("withdrawn to:", told.withdrawn, '"disregard the earlier notice"'),
    ):
        if not settings.notices:
            break
        print(
            f"{title:<16} {len({r.device_id for r in rows_told})} device(s), "
            f"{len({r.user for r in rows_told})} user(s) ({what}; each device once per policy)"
        )
        for row in rows_told[:LISTED_ROWS]:
            print(_terminal_safe(f"    {row.device_id:<24} {row.user:<30} {row.policy_id}"))
        if len(rows_told) > LISTED_ROWS:
            print(f"    ... and {len(rows_told) - LISTED_ROWS} more (--json lists {LISTED_ROWS})")
    if overrides:
        print(
            _terminal_safe(
                "overrides in force (counted): "
                + ", ".join(
                    [f"{p} suspended" for p in sorted(overrides.suspended)]
                    + [f"{p} exempts {s}" for p, s in sorted(overrides.exempt)]
                )
            )
        )
    for stage in stages:
        mark = "  <- now" if stage.current else ""
        print(
            _terminal_safe(
                f"rollout {stage.policy_id}: {stage.stage}: enforced on {stage.enforced} of "
                f"{stage.matching} matching device(s){mark}"
            )
        )
    if refusal is not None:
        print(f"guard: the reload will be refused: {refusal}")
    return code


def _impact_refused(args: argparse.Namespace, source: dict[str, object], reason: str) -> int:
    """No inventory to assess against: saying "0 devices affected" would be a lie."""
    if args.json:
        _print_json(
            {"schema": 1, "ok": False, "inventory": {**source, "devices": 0}, "error": reason}
        )
    else:
        print(f"gateway: impact: {reason}", file=sys.stderr)
    return EXIT_USAGE


# --- hold --------------------------------------------------------------------------------


def _hold_filter(args: argparse.Namespace) -> tuple[HoldFilter, list[str]]:
    from gateway.hold.store import HoldFilter

    return HoldFilter(
        user=getattr(args, "user", None),
        device_id=getattr(args, "device", None),
        policy_id=getattr(args, "policy", None),
    ), list(getattr(args, "ids", []) or [])


def _hold_line(held: HeldMessage) -> str:
    flag = " (release requested)" if held.release_requested else ""
    return _terminal_safe(
        f"{held.hold_id}  {held.received_at:%Y-%m-%d %H:%M}  {held.user:<28} {held.device_id:<16} "
        f"{','.join(held.policy_ids):<20} {held.size:>8} B{flag}"
    )


def _hold_show(store: HoldBackend, args: argparse.Namespace) -> int:
    message = store.get(args.hold_id)
    if message is None:
        print(
            f"gateway: no held message {_terminal_safe(repr(args.hold_id))} "
            "(gateway hold list shows the ids)",
            file=sys.stderr,
        )
        return EXIT_BAD
    if args.json:
        _print_json(
            {"schema": 1, "message": {**message.summary(), "claims": message.claims.summary()}}
        )
        return EXIT_OK
    for key, value in message.summary().items():
        print(_terminal_safe(f"{key + ':':<18} {value}"))
    for key, value in message.claims.summary().items():
        if key not in ("user", "device_id"):
            print(_terminal_safe(f"{key + ':':<18} {value}"))
    print()
    headers = (message.content or b"").split(b"\r\n\r\n", 1)[0]
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        print(_terminal_safe(line))
    return EXIT_OK


def cmd_hold(args: argparse.Namespace) -> int:
    from gateway.hold.backend import describe_store, open_store

    settings = _settings(args)
    store = open_store(settings)  # SQLite, or the shared PostgreSQL store ([store] url)
    try:
        if args.hold_command == "show":
            return _hold_show(store, args)
        where, ids = _hold_filter(args)
        if args.hold_command == "list":
            held = store.select(where)
            if args.json:
                _print_json({"schema": 1, "messages": [h.summary() for h in held]})
            else:
                for h in held:
                    print(_hold_line(h))
                print(f"{len(held)} held message(s)", file=sys.stderr)
            return EXIT_OK
        if not ids and where == type(where)() and not args.all:
            raise CliError("name hold ids, or a filter (--user, --device, --policy), or --all")
        if args.hold_command == "release":
            count = store.request_release(where, ids)
            text = f"{count} message(s) marked for release; the running gateway relays them within seconds"
        else:
            count = store.drop(where, ids)
            text = f"{count} message(s) dropped"
        _audit_hold(args, where, ids, count, describe_store(settings))
        if args.json:
            _print_json({"schema": 1, "action": args.hold_command, "count": count})
        else:
            print(text)
        return EXIT_OK
    finally:
        store.close()


def _audit_hold(
    args: argparse.Namespace, where: HoldFilter, ids: list[str], count: int, database: str
) -> None:
    """Who did what to held mail: one JSON line on stderr (the server logs each release
    it then makes as ``released`` with ``requested: true``)."""
    import getpass
    import os

    from gateway.ops import logs

    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        who = f"uid {os.getuid()}"
    chosen = {k: v for k, v in vars(where).items() if v is not None}
    logs.audit(
        f"admin_hold_{args.hold_command}",
        os_user=who,
        hold_ids=ids[:100],
        filter=chosen,
        all=bool(args.all),
        count=count,
        database=database,
    )


# --- policy overrides --------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``1d`` (or a number of seconds)."""
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _UNITS else (text, "s")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value > 0 or value * _UNITS[unit] > 366 * 86400:
        raise CliError(f"--for: {text!r} is not a duration such as 30m, 2h or 1d (at most 366d)")
    return timedelta(seconds=value * _UNITS[unit])


def _override_until(args: argparse.Namespace, now: datetime) -> datetime:
    if getattr(args, "until", None):
        until = _parse_time(args.until)
        if until <= now:
            raise CliError(f"--until: {args.until} is not in the future")
        return until
    if args.duration is None:
        raise CliError("say how long: --for 2h (or --until TIME)")
    return now + _parse_duration(args.duration)


def _known_policy(settings: Settings, policy_id: str) -> None:
    """Refuse a policy id the policy directory does not have (a typo would override
    nothing); a directory that does not load is only warned about."""
    try:
        ids = {p.id for p in load_policy_dir(settings.policy_dir, settings.groups).policies}
    except PolicyLoadError as exc:
        print(f"warning: policies in {settings.policy_dir} do not load: {exc}", file=sys.stderr)
        return
    if policy_id not in ids:
        raise CliError(
            f"no policy {policy_id!r} in {settings.policy_dir} (gateway check lists them)"
        )


def _os_user() -> str:
    import getpass
    import os

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return f"uid {os.getuid()}"


def cmd_policy(args: argparse.Namespace) -> int:
    """Suspend, resume and exempt from policies without editing files: written to the hold
    store, which the running gateways read within seconds (docs/policies.md)."""
    from gateway.hold.backend import describe_store, open_store
    from gateway.ops import logs

    settings = _settings(args)
    now = datetime.now(UTC)
    command = args.policy_command
    if command == "suspend" or (command == "exempt" and not args.remove):
        _known_policy(settings, args.policy_id)
        if not args.reason.strip():
            raise CliError("--reason: say why (it is shown with the override and audited)")
    store = open_store(settings)
    try:
        if command == "overrides":
            rows = store.policy_overrides(now)
            if args.json:
                _print_json({"schema": 1, "overrides": [r.as_dict() for r in rows]})
            else:
                for r in rows:
                    what = "suspended" if r.subject is None else f"exempt {r.subject}"
                    print(
                        _terminal_safe(
                            f"{r.policy_id:<24} {what:<32} until {r.until.isoformat()} "
                            f"by {r.actor}: {r.reason}"
                        )
                    )
                print(f"{len(rows)} override(s)", file=sys.stderr)
            return EXIT_OK
        actor = f"cli:{_os_user()}"
        fields: dict[str, object] = {"policy_id": args.policy_id}
        if command == "suspend":
            until = _override_until(args, now)
            store.suspend_policy(args.policy_id, until, args.reason, actor, now)
            fields |= {"until": until.isoformat(), "reason": args.reason}
            text = f"policy {args.policy_id} suspended until {until.isoformat()}"
        elif command == "resume":
            count = store.resume_policy(args.policy_id)
            fields["count"] = count
            text = (
                f"policy {args.policy_id} resumed"
                if count
                else f"policy {args.policy_id} was not suspended"
            )
        else:
            subject = f"user:{args.user.casefold()}" if args.user else f"device:{args.device}"
            if args.remove:
                count = store.remove_exemption(args.policy_id, subject)
                fields |= {"subject": subject, "removed": count}
                text = f"{count} exemption(s) of {subject} from {args.policy_id} removed"
            else:
                until = _override_until(args, now)
                store.exempt_from_policy(args.policy_id, subject, until, args.reason, actor, now)
                fields |= {"subject": subject, "until": until.isoformat(), "reason": args.reason}
                text = f"{subject} exempt from {args.policy_id} until {until.isoformat()}"
        logs.audit(
            f"admin_policy_{command}",
            os_user=_os_user(),
            database=describe_store(settings),
            **fields,
        )
        if args.json:
            _print_json({"schema": 1, "action": command, **fields})
        else:
            print(_terminal_safe(text) + "; running gateways apply it within seconds")
        return EXIT_OK
    finally:
        store.close()


# --- store -------------------------------------------------------------------------------


def cmd_store_migrate(args: argparse.Namespace) -> int:
    """Apply PostgreSQL schema migrations by hand (operators who do not let a starting
    gateway change the schema); idempotent, and safe beside running gateways."""
    import psycopg

    from gateway.hold.postgres import SCHEMA_VERSION, _connect_options, _failure, describe, migrate

    settings = _settings(args)
    if settings.store.url is None:
        raise CliError(
            "no [store] url: the SQLite store needs no migrations (a gateway applies its "
            "changes when it opens the file)"
        )
    server = describe(settings.store.url)
    try:
        with psycopg.connect(
            settings.store.url, autocommit=True, **_connect_options(settings.store)
        ) as conn:
            applied = migrate(conn, server)
    except psycopg.Error as exc:
        raise _failure(server, "migrating", exc, settings.store.connect_timeout) from exc
    if args.json:
        _print_json({"schema": 1, "store": server, "applied": applied, "version": SCHEMA_VERSION})
    elif applied:
        print(
            f"{server}: applied migration(s) {', '.join(map(str, applied))}; schema version {SCHEMA_VERSION}"
        )
    else:
        print(f"{server}: schema version {SCHEMA_VERSION}, nothing to apply")
    return EXIT_OK


# --- config ------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from gateway.config.show import effective, render

    settings = _settings(args)
    entries = effective(settings)
    if args.json:
        if args.changed_only:
            entries = [e for e in entries if not e.is_default and e.value is not None]
        _print_json(
            {"schema": 1, "config": str(settings.path), "settings": [e.as_dict() for e in entries]}
        )
        return EXIT_OK
    print(
        f"# effective configuration of {settings.path}"
        + (" (non-defaults only)" if args.changed_only else "")
    )
    sys.stdout.write(_terminal_safe_lines(render(entries, changed_only=args.changed_only)))
    return EXIT_OK


def _terminal_safe_lines(text: str) -> str:
    return "".join(_terminal_safe(line) + "\n" for line in text.splitlines())


# --- status ------------------------------------------------------------------------------


def _admin_address(args: argparse.Namespace) -> str:
    if args.admin:
        return str(args.admin)
    settings = _settings(args)
    if settings.admin_listen is None:
        raise CliError("no [admin] listen in the configuration: status asks the admin port")
    host, port = settings.admin_listen.host, settings.admin_listen.port
    if host in ("0.0.0.0", "::", ""):  # noqa: S104  # a wildcard listener: ask over loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    address = _admin_address(args)
    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(
            url, timeout=args.timeout
        ) as response:  # http to the admin port only
            status = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(
            f"gateway: status: {url} answered {exc.code}; is this a gateway's admin port?",
            file=sys.stderr,
        )
        return EXIT_BAD
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        print(f"gateway: status: no gateway answers at {address} ({reason})", file=sys.stderr)
        return EXIT_BAD
    code = EXIT_OK if status.get("ready") else EXIT_BAD
    if args.json:
        _print_json({**status, "admin": address})
        return code
    reload = status.get("last_reload") or {}
    outcome = {True: "ok", False: "FAILED (the last good set still serves)", None: "none yet"}[
        reload.get("ok")
    ]
    lines = [
        f"gateway {status.get('version')} at {address}: {status.get('readiness')}",
        f"policies:  version {status.get('policy_version')}; last reload {outcome}"
        f" ({reload.get('trigger')}); last good load {reload.get('last_success_at')}",
        f"held:      {status.get('held_messages')} message(s)",
        f"sessions:  {status.get('sessions_active')} open",
    ]
    upstreams = status.get("upstreams") or []
    if not upstreams:
        lines.append("upstreams: no per-target health reported by this gateway")
    for sample in upstreams:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(sample["labels"].items()))
        lines.append(f"upstream:  {sample['metric']}{{{labels}}} = {sample['value']:g}")
    for line in lines:
        print(_terminal_safe(line))
    return code


# --- completion --------------------------------------------------------------------------


def cmd_completion(args: argparse.Namespace) -> int:
    """The script comes from the parser itself (shtab), so it never drifts from the options.

    bash: ``source <(gateway completion bash)``; zsh: write it as ``_gateway`` on $fpath."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


# --- serve / demo ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.ops import logs
    from gateway.server import GatewayServer

    settings = _settings(args)
    workers = settings.workers if args.workers is None else args.workers
    if workers < 1:
        raise CliError(f"--workers must be 1 or more, not {workers}")
    logs.configure(args.log_level)
    logs.route_uncaught()
    if args.worker is None and workers > 1:
        from gateway.supervisor import Supervisor

        return Supervisor(settings, workers, args.grace, args.log_level).run()
    worker = _worker(args) if args.worker is not None else None

    async def serve() -> None:
        server = GatewayServer(settings, worker=worker)
        try:
            await server.start()
        except ListenError:
            await server.stop(grace=0)  # what did open (the hold store) is closed again
            raise
        server.install_signal_handlers()
        # What start-up loaded (modules, policies, keys, settings) lives as long as the
        # process: frozen out of the collector's way, full collections (which run while
        # SMTP waits) walk only what serving allocates; and the youngest generation is
        # collected every 10,000 allocations rather than 700, so connections' reference
        # cycles are found in fewer, larger passes. Phones' workload: p99 per message
        # 82-93 -> 27-44 ms (docs/performance.md, "The collector").
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        if worker is not None:
            from gateway.supervisor import supervisor_gone, worker_ready

            worker_ready(worker.channel)
            gone = server.spawn(supervisor_gone(worker.channel), "supervisor-watch")
            gone.add_done_callback(lambda _: server.request_stop())
        await server.wait_stopped()
        await server.stop(grace=args.grace)

    try:
        import uvloop  # optional: a faster event loop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
    return EXIT_OK


def _worker(args: argparse.Namespace) -> Worker:
    """The hidden options a supervisor gives each worker: ``--worker K/N``,
    ``--worker-run RUN_ID:RUN_DIR``, ``--worker-fds CHANNEL,SUBMISSION[,IMPLICIT_TLS]``."""
    import socket

    import structlog

    from gateway.ops.workers import WorkerRole
    from gateway.server import Worker

    index, count = (int(part) for part in args.worker.split("/"))
    run_id, run_dir = args.worker_run.split(":", 1)
    fds = [int(fd) for fd in args.worker_fds.split(",")]
    structlog.contextvars.bind_contextvars(worker=index)
    return Worker(
        WorkerRole(index, count, Path(run_dir), run_id),
        channel=socket.socket(fileno=fds[0]),
        submission=socket.socket(fileno=fds[1]),
        implicit_tls=socket.socket(fileno=fds[2]) if len(fds) > 2 else None,
    )


def _run_demo(*, dovecot: bool = False) -> int:
    from gateway.demo import run_demo
    from gateway.ops import logs

    logs.configure("error")  # the demo prints its own timeline
    return run_demo(dovecot=dovecot)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"gateway: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gateway ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BAD
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
