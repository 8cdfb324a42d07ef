"""gateway.toml, parsed once into typed, validated settings.

Every problem is reported at once with file, line and key. Relative paths are relative
to the directory of gateway.toml. Nothing else in the gateway reads the raw TOML.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal, get_args

from gateway.config.keys import KeyFileError, PublicKey, load_key_file
from gateway.config.toml import KeyPath, Table, TomlFile, read_toml
from gateway.errors import Problem, SettingsError

CONFIG_ENV = "GATEWAY_CONFIG"
ENV_PREFIX = "GATEWAY_"
ENV_SEPARATOR = "__"  # GATEWAY_SMTP__MAX_RECIPIENTS: [smtp] max_recipients
DEFAULT_CONFIG = Path("config/gateway.toml")
_HOSTPORT_RE = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})$"
)


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: The fixed allow-list of token signature algorithms (SPEC s 2: EdDSA over Ed25519, and
#: ES256). Issuers may narrow it, never widen it; a token never picks its own algorithm.
Algorithm = Literal["EdDSA", "Ed25519", "ES256"]
ALLOWED_ALGORITHMS: frozenset[str] = frozenset(get_args(Algorithm))
DEFAULT_MAX_TOKEN_BYTES = 16 * 1024
DEFAULT_LEEWAY = timedelta(seconds=60)


@dataclass(frozen=True)
class Issuer:
    """One trusted issuer: its keys by kid and the algorithms it may use."""

    issuer: str
    keys: Mapping[str, PublicKey]
    algorithms: frozenset[str] = ALLOWED_ALGORITHMS
    token_type: str | None = None  # when set, typ must equal it; otherwise absent or "JWT"

    def __post_init__(self) -> None:
        unknown = self.algorithms - ALLOWED_ALGORITHMS
        if unknown:
            raise ValueError(f"algorithms not allowed: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class VerifierSettings:
    audience: str
    issuers: Mapping[str, Issuer]
    leeway: timedelta = DEFAULT_LEEWAY
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES


@dataclass(frozen=True)
class LimitSettings:
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    messages_per_user_per_minute: int = 60
    auth_failures_per_ip: int = 20
    auth_failure_window: float = 300.0  # seconds
    max_errors: int = 10  # 5xx replies in one session before 421 and close
    command_call_limit: int | dict[str, int] = 1000  # per command and connection (aiosmtpd)


@dataclass(frozen=True)
class SmtpSettings:
    hostname: str = "localhost"
    listen: Endpoint = Endpoint("127.0.0.1", 2587)
    implicit_tls_listen: Endpoint | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_auth: bool = False
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_auth_bytes: int = 24 * 1024  # an AUTH line or SASL response, base64 included
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    bare_linefeeds: str = "reject"  # "reject" | "normalize"
    greeting_delay: float = 0.0  # wait before the greeting; clients that talk first get 554

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class Smarthost:
    host: str
    port: int = 25
    tls: str = "starttls"  # "none" | "starttls" | "tls"
    verify: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamSettings:
    mode: str = "smarthost"  # "smarthost" | "mx"
    smarthosts: tuple[Smarthost, ...] = ()
    timeout: float = 60.0
    pool_size: int = 4
    mx_port: int = 25
    nameservers: tuple[Endpoint, ...] = ()  # mode "mx": resolvers to ask; () = the system's
    helo_name: str | None = None


@dataclass(frozen=True)
class HoldSettings:
    database: Path = Path("/var/lib/gateway/hold.db")
    expire_after: timedelta = timedelta(days=5)
    release_concurrency: int = 8  # devices whose held mail is relayed at once


@dataclass(frozen=True)
class Settings:
    path: Path
    policy_dir: Path
    tokens: VerifierSettings
    smtp: SmtpSettings
    upstream: UpstreamSettings
    hold: HoldSettings
    limits: LimitSettings = field(default_factory=LimitSettings)
    admin_listen: Endpoint | None = None  # /livez, /readyz, /metrics
    reload_interval: float = 30.0  # seconds between periodic checks of the policy directory
    max_newly_blocked_devices: int | None = None  # reload guard; None: no guard
    inventory_retention: timedelta = timedelta(days=30)
    notices: bool = True  # notice mails to users (warn, hold, released)
    notice_sender: str | None = None  # default: compliance-gateway@<smtp.hostname>
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    aliases: Mapping[str, frozenset[str]] = field(default_factory=dict)  # user -> extra senders

    def may_send_as(self, user: str, sender: str) -> bool:
        """MAIL FROM must be the authenticated user or one of their configured aliases."""
        user, sender = user.casefold(), sender.casefold()
        return sender == user or sender in self.aliases.get(user, frozenset())


def _endpoint(table: Table, key: str) -> Endpoint | None:
    text = table.text(key)
    if text is None:
        return None
    found = _HOSTPORT_RE.match(text)
    if not found or not 0 <= int(found.group("port")) < 65536:  # 0: any free port
        table.problem(key, f"'{text}' is not host:port (e.g. 127.0.0.1:2587 or [::1]:2587)")
        return None
    return Endpoint(found.group("v6") or found.group("host"), int(found.group("port")))


def _path(table: Table, key: str, base: Path, *, must_exist: bool = False) -> Path | None:
    text = table.text(key)
    if text is None:
        return None
    path = (base / text) if not Path(text).is_absolute() else Path(text)
    if must_exist and not path.exists():
        table.problem(key, f"file {path} does not exist")
        return None
    return path


def _secret(table: Table, key: str, base: Path) -> str | None:
    """Secrets live in files (mounted secrets), never inline in gateway.toml."""
    path = _path(table, key, base, must_exist=True)
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        table.problem(key, f"cannot read {path}: {exc.strerror or exc}")
        return None


def _read_smtp(table: Table | None, base: Path) -> SmtpSettings:
    if table is None:
        return SmtpSettings()
    d = SmtpSettings()
    tls_cert = _path(table, "tls_cert", base, must_exist=True)
    tls_key = _path(table, "tls_key", base, must_exist=True)
    if (tls_cert is None) != (tls_key is None) and not table.problems:
        table.problem("tls_cert", "tls_cert and tls_key go together")
    settings = SmtpSettings(
        hostname=table.text("hostname") or d.hostname,
        listen=_endpoint(table, "listen") or d.listen,
        implicit_tls_listen=_endpoint(table, "implicit_tls_listen"),
        tls_cert=tls_cert,
        tls_key=tls_key,
        allow_plaintext_auth=bool(table.flag("allow_plaintext_auth")),
        max_message_size=table.integer("max_message_size", minimum=1024) or d.max_message_size,
        max_recipients=table.integer("max_recipients", minimum=1) or d.max_recipients,
        max_auth_bytes=table.integer("max_auth_bytes", minimum=1024) or d.max_auth_bytes,
        idle_timeout=table.number("idle_timeout", minimum=1) or d.idle_timeout,
        data_timeout=table.number("data_timeout", minimum=1) or d.data_timeout,
        bare_linefeeds=table.choice("bare_linefeeds", ["reject", "normalize"]) or d.bare_linefeeds,
        greeting_delay=table.number("greeting_delay") or d.greeting_delay,
    )
    if settings.implicit_tls_listen and not settings.tls_enabled:
        table.problem("implicit_tls_listen", "implicit TLS needs tls_cert and tls_key")
    table.finish()
    return settings


def _read_limits(table: Table | None) -> LimitSettings:
    if table is None:
        return LimitSettings()
    d = LimitSettings()
    call_limit: int | dict[str, int] | None
    if isinstance(table.data.get("command_call_limit"), dict):
        raw = table.mapping(
            "command_call_limit",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
            "a whole number of at least 1",
        )
        call_limit = {command.upper(): count for command, count in (raw or {}).items()}
    else:
        call_limit = table.integer("command_call_limit", minimum=1)
    settings = LimitSettings(
        max_connections=table.integer("max_connections", minimum=1) or d.max_connections,
        max_connections_per_ip=table.integer("max_connections_per_ip", minimum=1)
        or d.max_connections_per_ip,
        messages_per_user_per_minute=table.integer("messages_per_user_per_minute", minimum=1)
        or d.messages_per_user_per_minute,
        auth_failures_per_ip=table.integer("auth_failures_per_ip", minimum=1)
        or d.auth_failures_per_ip,
        auth_failure_window=table.number("auth_failure_window_seconds", minimum=1)
        or d.auth_failure_window,
        max_errors=table.integer("max_errors", minimum=1) or d.max_errors,
        command_call_limit=call_limit or d.command_call_limit,
    )
    table.finish()
    return settings


def _env_value(text: str) -> object:
    """TOML syntax when it parses as a TOML value (42, true, ["a"], "x"); else the raw text."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except (tomllib.TOMLDecodeError, ValueError):
        return text


def apply_environment(source: TomlFile, environ: Mapping[str, str]) -> list[Problem]:
    """Overlay GATEWAY_<SECTION>__<KEY>[__<KEY>...] variables on the parsed file.

    Only names with the double-underscore separator are overrides, so variables such as
    GATEWAY_CONFIG, or the GATEWAY_PORT a Kubernetes Service injects, are left alone.
    A number in the path indexes an array of tables: GATEWAY_UPSTREAM__SMARTHOSTS__0__HOST.
    """
    problems: list[Problem] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_SEPARATOR)
        if not all(parts):
            problems.append(Problem(f"environment {name}", None, "", "empty key in the name"))
            continue
        path: KeyPath = tuple(int(p) if p.isdigit() else p for p in parts)
        node: object = source.data
        for part, following in itertools.pairwise(path):
            node = _child(node, part, following)
            if node is None:
                break
        last = path[-1]
        if isinstance(node, dict) and isinstance(last, str):
            node[last] = _env_value(environ[name])
            source.overrides[path] = f"environment {name}"
        else:
            problems.append(
                Problem(
                    f"environment {name}",
                    None,
                    ".".join(str(p) for p in path),
                    "does not name a setting (GATEWAY_<SECTION>__<KEY>, e.g. GATEWAY_SMTP__LISTEN)",
                )
            )
    return problems


def _child(node: object, part: str | int, following: str | int) -> object:
    """Step into (creating where missing) a table or an existing array-of-tables element."""
    if isinstance(node, dict) and isinstance(part, str):
        if part not in node:
            node[part] = [] if isinstance(following, int) else {}
        return node[part]
    if isinstance(node, list) and isinstance(part, int):
        if part == len(node):
            node.append({})
        return node[part] if part < len(node) else None
    return None


def _nameservers(table: Table) -> tuple[Endpoint, ...]:
    """IP addresses, each with an optional port (host:port as for listen; default 53)."""
    found = []
    for index, text in enumerate(table.texts("nameservers") or []):
        with_port = _HOSTPORT_RE.match(text)
        address, port = (
            (with_port.group("v6") or with_port.group("host"), int(with_port.group("port")))
            if with_port
            else (text, 53)
        )
        try:
            ipaddress.ip_address(address)
        except ValueError:
            table.problems.append(
                table.source.problem(
                    (*table.path, "nameservers", index),
                    f"'{text}' is not an IP address (with an optional :port)",
                )
            )
            continue
        if not 0 < port < 65536:
            table.problem("nameservers", f"'{text}' has an invalid port")
            continue
        found.append(Endpoint(address, port))
    return tuple(found)


def _read_upstream(table: Table | None, base: Path) -> UpstreamSettings:
    if table is None:
        return UpstreamSettings()
    d = UpstreamSettings()
    mode = table.choice("mode", ["smarthost", "mx"]) or d.mode
    hosts = []
    for host_table in table.tables("smarthosts"):
        host = host_table.text("host", required=True)
        port = host_table.integer("port", minimum=1)
        hosts.append(
            Smarthost(
                host=host or "",
                port=port or 25,
                tls=host_table.choice("tls", ["none", "starttls", "tls"]) or "starttls",
                verify=host_table.flag("verify") is not False,
                ca_file=_path(host_table, "ca_file", base, must_exist=True),
                username=host_table.text("username"),
                password=_secret(host_table, "password_file", base),
            )
        )
        host_table.finish()
    settings = UpstreamSettings(
        mode=mode,
        smarthosts=tuple(hosts),
        timeout=table.number("timeout", minimum=1) or d.timeout,
        pool_size=table.integer("pool_size", minimum=1) or d.pool_size,
        mx_port=table.integer("mx_port", minimum=1) or d.mx_port,
        nameservers=_nameservers(table),
        helo_name=table.text("helo_name"),
    )
    if mode == "smarthost" and not hosts:
        table.problem("smarthosts", 'mode = "smarthost" needs at least one [[upstream.smarthosts]]')
    table.finish()
    return settings


def _read_tokens(table: Table | None, base: Path) -> VerifierSettings | None:
    if table is None:
        return None
    audience = table.text("audience", required=True)
    leeway = table.number("leeway_seconds")
    max_bytes = table.integer("max_token_bytes", minimum=256)
    issuers: dict[str, Issuer] = {}
    for issuer_table in table.tables("issuers"):
        name = issuer_table.text("issuer", required=True)
        key_files = issuer_table.texts("keys", required=True) or []
        algorithms = issuer_table.texts("algorithms")
        token_type = issuer_table.text("token_type")
        keys: dict[str, PublicKey] = {}
        for index, key_file in enumerate(key_files):
            path = base / key_file if not Path(key_file).is_absolute() else Path(key_file)
            try:
                loaded = load_key_file(path)
            except KeyFileError as exc:
                issuer_table.problem("keys", str(exc))
                continue
            for kid in loaded:
                if kid in keys:
                    issuer_table.problem(
                        "keys",
                        f"kid {kid!r} appears in more than one key file ({key_files[index]})",
                    )
            keys.update(loaded)
        if algorithms is not None:
            bad = sorted(set(algorithms) - ALLOWED_ALGORITHMS)
            if bad:
                issuer_table.problem(
                    "algorithms",
                    f"{', '.join(bad)} not allowed; choose from {', '.join(sorted(ALLOWED_ALGORITHMS))}",
                )
                algorithms = None
        issuer_table.finish()
        if name is None:
            continue
        if name in issuers:
            issuer_table.problem("issuer", f"issuer {name!r} is configured twice")
            continue
        issuers[name] = Issuer(
            issuer=name,
            keys=keys,
            algorithms=frozenset(algorithms) if algorithms else ALLOWED_ALGORITHMS,
            token_type=token_type,
        )
    if not issuers:
        table.problem("issuers", "configure at least one [[tokens.issuers]]")
    table.finish()
    if audience is None:
        return None
    return VerifierSettings(
        audience=audience,
        issuers=issuers,
        leeway=timedelta(seconds=leeway if leeway is not None else 60),
        max_token_bytes=max_bytes or DEFAULT_MAX_TOKEN_BYTES,
    )


def _string_lists(table: Table, key: str) -> dict[str, frozenset[str]]:
    raw = table.mapping(
        key,
        lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "a list of mail addresses",
    )
    return {
        name.casefold() if key == "aliases" else name: frozenset(m.casefold() for m in members)
        for name, members in (raw or {}).items()
    }


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate gateway.toml plus GATEWAY_… overrides from ``environ``
    (default: the process environment); raises SettingsError naming file, line and key."""
    parsed = read_toml(path)
    if isinstance(parsed, Problem):
        raise SettingsError([parsed])
    base = path.parent
    problems = apply_environment(parsed, os.environ if environ is None else environ)
    root = Table(parsed, parsed.data, (), problems)
    gateway = root.table("gateway")
    policy_dir = _path(gateway, "policy_dir", base) if gateway else None
    reload_interval = gateway.number("reload_interval", minimum=0.1) if gateway else None
    max_blocked = gateway.integer("max_newly_blocked_devices", minimum=0) if gateway else None
    retention_days = gateway.number("inventory_retention_days", minimum=0.01) if gateway else None
    notices_flag = gateway.flag("notices") if gateway else None
    notice_sender = gateway.text("notice_sender") if gateway else None
    if gateway:
        gateway.finish()
    tokens = _read_tokens(root.table("tokens", required=True), base)
    smtp = _read_smtp(root.table("smtp"), base)
    upstream = _read_upstream(root.table("upstream"), base)
    limits = _read_limits(root.table("limits"))
    hold_table = root.table("hold")
    hold = HoldSettings()
    if hold_table is not None:
        expire_hours = hold_table.number("expire_after_hours", minimum=0.01)
        hold = HoldSettings(
            database=_path(hold_table, "database", base) or hold.database,
            expire_after=timedelta(hours=expire_hours) if expire_hours else hold.expire_after,
            release_concurrency=hold_table.integer("release_concurrency", minimum=1)
            or hold.release_concurrency,
        )
        hold_table.finish()
    admin_table = root.table("admin")
    admin_listen = _endpoint(admin_table, "listen") if admin_table else None
    if admin_table:
        admin_table.finish()
    groups = _string_lists(root, "groups")
    aliases = _string_lists(root, "aliases")
    root.finish()
    if problems or tokens is None:
        raise SettingsError(problems)
    return Settings(
        path=path,
        policy_dir=policy_dir or base / "policies",
        reload_interval=reload_interval or 30.0,
        max_newly_blocked_devices=max_blocked,
        inventory_retention=timedelta(days=retention_days or 30),
        notices=notices_flag is not False,
        notice_sender=notice_sender,
        tokens=tokens,
        smtp=smtp,
        upstream=upstream,
        hold=hold,
        limits=limits,
        admin_listen=admin_listen,
        groups=groups,
        aliases=aliases,
    )
