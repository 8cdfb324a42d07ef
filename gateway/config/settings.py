"""gateway.toml, parsed once into typed, validated settings.

Every problem is reported at once with file, line and key. Relative paths are relative
to the directory of gateway.toml. Nothing else in the gateway reads the raw TOML.

Each setting is declared once, on its dataclass field: the field's default is the default,
its ``Literal`` type (if any) the allowed values, and ``metadata=setting(kind, doc, ...)``
says how an admin writes it (TOML key and section, type, what leaving it out means) and
what it does. The readers below take everything from these declarations, and so does the
configuration reference in docs/configuration.md (``python -m gateway.config.reference``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import os
import re
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

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

BareLinefeeds = Literal["reject", "normalize"]
UpstreamMode = Literal["smarthost", "mx"]
SmarthostTls = Literal["none", "starttls", "tls"]
HoldAtLogin = Literal["quarantine", "refuse"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- How an admin writes a value ---------------------------------------------------------


def _toml_literal(value: object) -> str:
    """A value as an admin writes it in gateway.toml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str | Path | Endpoint):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


class Kind:
    """How an admin writes one setting: read from its table, shown in the reference."""

    def written(self) -> str:
        """The type, as an admin writes it."""
        raise NotImplementedError

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        """The value of ``key``, or None when it is absent or wrong (a problem is recorded)."""
        raise NotImplementedError

    def default(self, value: Any, base: Path) -> Any:
        """The field's default as the settings hold it."""
        return value

    def show(self, value: Any) -> str | None:
        """``value`` as TOML; None when only leaving the key out says it."""
        return None if value is None else _toml_literal(value)


def _at_least(minimum: float | None) -> str:
    if minimum is None:
        return ""
    return f", ≥ {_toml_literal(float(minimum))}"


@dataclass(frozen=True)
class Text(Kind):
    blank_is_unset: bool = False  # "" means the default

    def written(self) -> str:
        return "string"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        value = table.text(key, required=required)
        return (value or None) if self.blank_is_unset else value


@dataclass(frozen=True)
class Integer(Kind):
    minimum: int | None = None
    unit: str | None = None

    def written(self) -> str:
        return "integer" + (f" ({self.unit})" if self.unit else "") + _at_least(self.minimum)

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return table.integer(key, required=required, minimum=self.minimum)


@dataclass(frozen=True)
class Number(Kind):
    minimum: float = 0.0
    unit: str = "seconds"

    def written(self) -> str:
        return f"number ({self.unit})" + _at_least(self.minimum)

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return table.number(key, required=required, minimum=self.minimum)


@dataclass(frozen=True)
class Duration(Number):
    """A timedelta, written as a number of ``unit`` (the unit is part of the key's name)."""

    unit: Literal["seconds", "hours", "days"] = "seconds"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        value = super().read(table, key, base, required=required)
        return None if value is None else timedelta(**{self.unit: value})

    def show(self, value: Any) -> str | None:
        if value is None:
            return None
        return _toml_literal(value / timedelta(**{self.unit: 1}))


@dataclass(frozen=True)
class Flag(Kind):
    def written(self) -> str:
        return "true or false"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return table.flag(key, required=required)


@dataclass(frozen=True)
class Choice(Kind):
    """One of the values of a ``Literal`` type: the field's type states them once."""

    choices: tuple[str, ...]

    @classmethod
    def of(cls, literal: object) -> Choice:
        return cls(get_args(literal))

    def written(self) -> str:
        return "one of " + ", ".join(_toml_literal(c) for c in self.choices)

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return table.choice(key, list(self.choices), required=required)


@dataclass(frozen=True)
class HostPort(Kind):
    def written(self) -> str:
        return '"host:port"'

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return _endpoint(table, key)


@dataclass(frozen=True)
class PathKind(Kind):
    """A path; relative ones (defaults too) are relative to the directory of gateway.toml."""

    must_exist: bool = False

    def written(self) -> str:
        return "path of an existing file" if self.must_exist else "path"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return _path(table, key, base, must_exist=self.must_exist)

    def default(self, value: Any, base: Path) -> Any:
        return None if value is None else base / value


@dataclass(frozen=True)
class SecretFile(Kind):
    """A secret, read from a file (a mounted secret), never written inline in gateway.toml."""

    def written(self) -> str:
        return "path of a file holding it"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return _secret(table, key, base)


@dataclass(frozen=True)
class Nameservers(Kind):
    def written(self) -> str:
        return 'list of "IP address" or "IP address:port"'

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        return _nameservers(table, key)

    def show(self, value: Any) -> str | None:
        return _toml_literal([str(v) for v in value]) if value else None


@dataclass(frozen=True)
class Networks(Kind):
    """A list of networks in CIDR notation (a bare address is a /32 or /128)."""

    def written(self) -> str:
        return 'list of "network/prefix" (IPv4 or IPv6)'

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        texts = table.texts(key, required=required, allow_empty=True)
        if texts is None:
            return None
        networks: list[IPNetwork] = []
        for text in texts:
            try:
                networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                table.problem(key, f'{text!r} is not a network such as "10.0.0.0/24" ({exc})')
                return None
        return tuple(networks)

    def show(self, value: Any) -> str | None:
        return _toml_literal([str(v) for v in value]) if value else None


@dataclass(frozen=True)
class CallLimit(Kind):
    """aiosmtpd's command_call_limit: one limit for every command, or a table per command."""

    def written(self) -> str:
        return 'integer, ≥ 1; or a table such as { "*" = 1000, NOOP = 20 }'

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        if isinstance(table.data.get(key), dict):
            raw = table.mapping(
                key,
                lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "a whole number of at least 1",
            )
            return {command.upper(): count for command, count in (raw or {}).items()} or None
        return table.integer(key, required=required, minimum=1)


@dataclass(frozen=True)
class KeyFiles(Kind):
    def written(self) -> str:
        return "list of paths (JWKS or PEM files)"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        key_files = table.texts(key, required=required)
        if key_files is None:
            return None
        keys: dict[str, PublicKey] = {}
        for key_file in key_files:
            path = base / key_file if not Path(key_file).is_absolute() else Path(key_file)
            try:
                loaded = load_key_file(path)
            except KeyFileError as exc:
                table.problem(key, str(exc))
                continue
            for kid in loaded:
                if kid in keys:
                    table.problem(
                        key, f"kid {kid!r} appears in more than one key file ({key_file})"
                    )
            keys.update(loaded)
        return keys

    def show(self, value: Any) -> str | None:
        return None  # the keys are files an admin names; there is no default to show


def jwks_url_problem(url: str) -> str | None:
    """Why ``url`` may not be fetched for keys, or None. Plain http is allowed to loopback
    only (a JWKS proxy beside the gateway, or a test): anywhere else a network attacker
    could hand us keys."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https" and parsed.hostname:
        return None
    if parsed.scheme == "http" and parsed.hostname:
        host = parsed.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return None
        return f"'{url[:200]}': http is allowed to loopback addresses only; use https"
    return f"'{url[:200]}' is not an https:// URL"


@dataclass(frozen=True)
class Algorithms(Kind):
    """A non-empty subset of ALLOWED_ALGORITHMS, written as a list."""

    def written(self) -> str:
        return "list from " + ", ".join(_toml_literal(a) for a in get_args(Algorithm))

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        algorithms = table.texts(key, required=required)
        if algorithms is None:
            return None
        bad = sorted(set(algorithms) - ALLOWED_ALGORITHMS)
        if bad:
            table.problem(
                key,
                f"{', '.join(bad)} not allowed; choose from {', '.join(sorted(ALLOWED_ALGORITHMS))}",
            )
            return None
        return frozenset(algorithms)

    def show(self, value: Any) -> str | None:
        return _toml_literal([a for a in get_args(Algorithm) if a in value])


@dataclass(frozen=True)
class MailLists(Kind):
    """A table of free-form names, each with a list of mail addresses ([groups], [aliases])."""

    placeholder: str  # the keys, as the reference shows them
    casefold_names: bool = False

    def written(self) -> str:
        return "list of mail addresses"

    def read(self, table: Table, key: str, base: Path, *, required: bool) -> Any:
        raw = table.mapping(
            key,
            lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
            "a list of mail addresses",
        )
        return {
            name.casefold() if self.casefold_names else name: frozenset(
                m.casefold() for m in members
            )
            for name, members in (raw or {}).items()
        }

    def show(self, value: Any) -> str | None:
        return None


@dataclass(frozen=True)
class Setting:
    """One key of gateway.toml, declared on the settings field it fills."""

    kind: Kind
    doc: str  # what it does (Markdown, one paragraph)
    key: str | None = None  # the TOML key when it differs from the field name
    section: str | None = None  # the TOML section when it differs from the class's
    unset: str | None = None  # what leaving it out means, when no value says it


def setting(
    kind: Kind,
    doc: str,
    *,
    key: str | None = None,
    section: str | None = None,
    unset: str | None = None,
) -> dict[str, Setting]:
    """``metadata`` for a settings field: ``field(default=..., metadata=setting(...))``."""
    return {"setting": Setting(kind, " ".join(doc.split()), key, section, unset)}


# --- The settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    """One trusted issuer: its keys by kid and the algorithms it may use."""

    toml_section: ClassVar[str] = "tokens.issuers"

    issuer: str = field(metadata=setting(Text(), 'Must equal the token\'s "iss".'))
    keys: Mapping[str, PublicKey] = field(
        default_factory=dict,
        metadata=setting(
            KeyFiles(),
            """The issuer's public keys: JWKS files (kid from the file) or PEM files (kid =
            the file's name without extension). A kid may appear in one file only. SIGHUP
            re-reads them. Required unless `jwks_url` is given.""",
            unset="no key files (then `jwks_url` is required)",
        ),
    )
    jwks_url: str | None = field(
        default=None,
        metadata=setting(
            Text(),
            """Where the issuer publishes its JWKS (RFC 7517): fetched at start, every
            ``jwks_refresh_seconds``, and at once when a token names an unknown kid (at most
            once per 10 s). The last good set is kept when a fetch fails. https, or http to
            a loopback address only. Keys for other algorithms in it (RSA, HMAC) are
            skipped; a key never chooses its algorithm.""",
            unset="the key files only",
        ),
    )
    jwks_refresh: timedelta = field(
        default=timedelta(minutes=5),
        metadata=setting(
            Duration(minimum=1, unit="seconds"),
            "How often the JWKS is fetched again.",
            key="jwks_refresh_seconds",
        ),
    )
    algorithms: frozenset[str] = field(
        default=ALLOWED_ALGORITHMS,
        metadata=setting(
            Algorithms(), "Narrows the signature algorithms this issuer may use, never widens."
        ),
    )
    token_type: str | None = field(
        default=None,
        metadata=setting(
            Text(),
            'When set, the token\'s "typ" header must equal it.',
            unset='"typ" absent or "JWT"',
        ),
    )

    def __post_init__(self) -> None:
        unknown = self.algorithms - ALLOWED_ALGORITHMS
        if unknown:
            raise ValueError(f"algorithms not allowed: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class VerifierSettings:
    toml_section: ClassVar[str] = "tokens"

    audience: str = field(metadata=setting(Text(), 'Tokens must name this in "aud".'))
    issuers: Mapping[str, Issuer]  # [[tokens.issuers]]
    leeway: timedelta = field(
        default=timedelta(seconds=60),
        metadata=setting(
            Duration(unit="seconds"),
            'Clock skew allowed for "exp", "nbf" and "iat".',
            key="leeway_seconds",
        ),
    )
    max_token_bytes: int = field(
        default=16 * 1024,
        metadata=setting(
            Integer(minimum=256, unit="bytes"),
            "Longer tokens are refused before any parsing.",
        ),
    )
    cache_entries: int = field(
        default=10_000,
        metadata=setting(
            Integer(minimum=0, unit="tokens"),
            """Verified tokens remembered (least recently used dropped first), so that a
            device reconnecting with the same token skips the signature check; time claims
            are checked on every use. Size it to the devices that connect within a token's
            lifetime; about 2 KB per entry for a 600-byte token. 0 turns the cache off.""",
            key="cache_entries",
        ),
    )


@dataclass(frozen=True)
class LimitSettings:
    toml_section: ClassVar[str] = "limits"

    max_connections: int = field(
        default=1000,
        metadata=setting(
            Integer(minimum=1), "Open SMTP sessions in total; beyond: 421 4.3.2 at connect."
        ),
    )
    max_connections_per_ip: int = field(
        default=100,
        metadata=setting(
            Integer(minimum=1),
            """Open sessions from one client address; beyond: 421 4.7.0 at connect. Phones
            behind carrier NAT share addresses: keep it generous.""",
        ),
    )
    max_unauthenticated_connections: int = field(
        default=500,
        metadata=setting(
            Integer(minimum=1),
            """Open sessions that have not authenticated yet (at most `max_connections`).
            When this, `max_connections` or an address's share is full, a new connection
            sheds the unauthenticated session idle the longest (421 4.3.2 to it) instead
            of being refused; authenticated sessions are never shed. Idle sockets cannot
            lock out devices with valid tokens.""",
        ),
    )
    pre_auth_timeout_under_load: float = field(
        default=10.0,
        metadata=setting(
            Number(minimum=1),
            """Idle timeout before AUTH while at least half of
            `max_unauthenticated_connections` are in use (else `[smtp] idle_timeout`).
            A phone needs a few round trips to authenticate, never seconds of silence.""",
            key="pre_auth_timeout_under_load_seconds",
        ),
    )
    messages_per_user_per_minute: int = field(
        default=60,
        metadata=setting(
            Integer(minimum=1),
            """Messages per user: a burst of this many, then this many a minute; beyond: 450
            4.7.1 at MAIL FROM.""",
        ),
    )
    auth_failures_per_session: int = field(
        default=3,
        metadata=setting(
            Integer(minimum=1),
            """Failed AUTHs in one session; the last one is followed by 421 4.7.0 and the
            session closes. Counted per session, never per address: phones behind carrier
            NAT share addresses, and one stale phone must not lock out its neighbours.""",
        ),
    )
    auth_failure_delay: float = field(
        default=0.5,
        metadata=setting(
            Number(),
            """Wait before answering a session's first failed AUTH; it doubles with each
            further failure in that session, up to `auth_failure_delay_max_seconds`.""",
            key="auth_failure_delay_seconds",
        ),
    )
    auth_failure_delay_max: float = field(
        default=4.0,
        metadata=setting(
            Number(),
            "The longest wait before answering a failed AUTH.",
            key="auth_failure_delay_max_seconds",
        ),
    )
    data_bytes_in_flight: int = field(
        default=256 * 1024 * 1024,
        metadata=setting(
            Integer(minimum=64 * 1024, unit="bytes"),
            """Message bytes held in memory across all sessions, counted as DATA arrives
            (or as `SIZE=` declares): a message is kept once while it arrives and is
            relayed, and counts twice when it is held (the copy written to the hold
            store). Beyond: 452 4.3.1 at `MAIL … SIZE=` or after the final dot. The
            default, 256 MiB, with the process's own 60 MiB and allocator slack stays
            well below the 512 MiB memory limit of deploy/kubernetes, so clients can
            fill the budget but never get the gateway OOM-killed; raise both together.""",
        ),
    )
    max_errors: int = field(
        default=10,
        metadata=setting(
            Integer(minimum=1), "5xx replies in one session; then 421 4.7.0 and close."
        ),
    )
    command_call_limit: int | dict[str, int] = field(
        default=1000,
        metadata=setting(
            CallLimit(),
            """Calls of each command in one session (aiosmtpd's limit). A table sets it per
            command; `"*"` covers the commands it does not name (without `"*"`: 20).""",
        ),
    )


@dataclass(frozen=True)
class SmtpSettings:
    toml_section: ClassVar[str] = "smtp"

    hostname: str = field(
        default="localhost",
        metadata=setting(
            Text(blank_is_unset=True), "The gateway's name in the greeting and Received header."
        ),
    )
    listen: Endpoint = field(
        default=Endpoint("127.0.0.1", 2587),
        metadata=setting(
            HostPort(),
            "Submission listener (587 in production); offers STARTTLS when `tls_cert` is set.",
        ),
    )
    implicit_tls_listen: Endpoint | None = field(
        default=None,
        metadata=setting(
            HostPort(),
            "Submissions listener, implicit TLS (RFC 8314; 465 in production).",
            unset="no such listener",
        ),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=setting(
            PathKind(must_exist=True),
            "Certificate chain (PEM) for STARTTLS and implicit TLS; goes with `tls_key`.",
            unset="no TLS",
        ),
    )
    tls_key: Path | None = field(
        default=None,
        metadata=setting(
            PathKind(must_exist=True), "Private key (PEM) of `tls_cert`.", unset="no TLS"
        ),
    )
    allow_plaintext_auth: bool = field(
        default=False,
        metadata=setting(
            Flag(),
            """Allow AUTH without TLS: for loopback tests and the demo. Refused when `listen`
            is not a loopback address (as Postfix's `smtpd_tls_auth_only`).""",
        ),
    )
    max_message_size: int = field(
        default=25 * 1024 * 1024,
        metadata=setting(
            Integer(minimum=1024, unit="bytes"),
            "Largest message; beyond: 552 5.3.4 (at `SIZE=` or after the final dot).",
        ),
    )
    max_recipients: int = field(
        default=100,
        metadata=setting(Integer(minimum=1), "Recipients per message; the excess gets 452 4.5.3."),
    )
    max_auth_bytes: int = field(
        default=24 * 1024,
        metadata=setting(
            Integer(minimum=1024, unit="bytes"),
            "Longest AUTH line or SASL response, base64 included; beyond: 500 5.5.6.",
        ),
    )
    idle_timeout: float = field(
        default=300.0,
        metadata=setting(
            Number(minimum=1), "Silence allowed between commands; then 421 4.4.2 and close."
        ),
    )
    data_timeout: float = field(
        default=600.0,
        metadata=setting(
            Number(minimum=1), "Silence allowed inside DATA; then 421 4.4.2 and close."
        ),
    )
    bare_linefeeds: BareLinefeeds = field(
        default="reject",
        metadata=setting(
            Choice.of(BareLinefeeds),
            """A line ending in a bare LF inside DATA (SMTP smuggling): `"reject"` with 550
            5.5.2, or `"normalize"` to CRLF.""",
        ),
    )
    greeting_delay: float = field(
        default=0.0,
        metadata=setting(
            Number(), "Wait before the greeting; clients that talk first get 554 5.5.0."
        ),
    )
    proxy_protocol_from: tuple[IPNetwork, ...] = field(
        default=(),
        metadata=setting(
            Networks(),
            """The load balancer's networks: a connection from one of them must begin with a
            PROXY protocol header (v2, or v1 text), whose source address then counts for
            the per-address limits, the early-talker check, logs and the Received header.
            Without a valid header it is closed. Others are never asked for one
            (docs/operations.md#behind-a-load-balancer).""",
            unset="no PROXY protocol",
        ),
    )
    proxy_protocol_timeout: float = field(
        default=5.0,
        metadata=setting(
            Number(minimum=0.1),
            "Time a connection from `proxy_protocol_from` has to send its whole PROXY header.",
        ),
    )

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class Smarthost:
    toml_section: ClassVar[str] = "upstream.smarthosts"

    host: str = field(metadata=setting(Text(), "Host name or address of the relay."))
    port: int = field(default=25, metadata=setting(Integer(minimum=1), "Its port."))
    tls: SmarthostTls = field(
        default="starttls",
        metadata=setting(
            Choice.of(SmarthostTls),
            """`"none"`: plain; `"starttls"`: STARTTLS, required; `"tls"`: implicit TLS
            (usually port 465).""",
        ),
    )
    verify: bool = field(
        default=True, metadata=setting(Flag(), "Verify the relay's certificate and name.")
    )
    ca_file: Path | None = field(
        default=None,
        metadata=setting(
            PathKind(must_exist=True),
            "CA certificates (PEM) to verify the relay with.",
            unset="the system's CAs",
        ),
    )
    username: str | None = field(
        default=None,
        metadata=setting(
            Text(), "Log in (AUTH) as this user, with `password_file`.", unset="no AUTH"
        ),
    )
    password: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            SecretFile(),
            "The password for `username`, read from this file (a mounted secret).",
            key="password_file",
            unset="no password",
        ),
    )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamSettings:
    toml_section: ClassVar[str] = "upstream"

    mode: UpstreamMode = field(
        default="smarthost",
        metadata=setting(
            Choice.of(UpstreamMode),
            """`"smarthost"`: relay through the `[[upstream.smarthosts]]`; `"mx"`: deliver
            directly to each recipient domain's MX hosts, with opportunistic TLS.""",
        ),
    )
    smarthosts: tuple[Smarthost, ...] = ()  # [[upstream.smarthosts]]
    timeout: float = field(
        default=60.0,
        metadata=setting(
            Number(minimum=1), "How long to wait for an upstream to connect or to reply."
        ),
    )
    pool_size: int = field(
        default=4,
        metadata=setting(
            Integer(minimum=1),
            """Idle connections kept per upstream; set it to the peak of concurrent
            transactions, or connections churn.""",
        ),
    )
    mx_port: int = field(
        default=25, metadata=setting(Integer(minimum=1), 'Mode `"mx"`: port of the MX hosts.')
    )
    nameservers: tuple[Endpoint, ...] = field(
        default=(),
        metadata=setting(
            Nameservers(),
            'Mode `"mx"`: the DNS resolvers to ask (port 53 unless given).',
            unset="the system's (resolv.conf)",
        ),
    )
    helo_name: str | None = field(
        default=None,
        metadata=setting(Text(), "The name to give in EHLO upstream.", unset="`smtp.hostname`"),
    )


@dataclass(frozen=True)
class HoldSettings:
    toml_section: ClassVar[str] = "hold"

    database: Path = field(
        default=Path("/var/lib/gateway/hold.db"),
        metadata=setting(PathKind(), "SQLite database of held mail and the device inventory."),
    )
    expire_after: timedelta = field(
        default=timedelta(days=5),
        metadata=setting(
            Duration(minimum=0.01, unit="hours"),
            "Held mail not released within this time is bounced to its sender.",
            key="expire_after_hours",
        ),
    )
    release_concurrency: int = field(
        default=8,
        metadata=setting(Integer(minimum=1), "Devices whose held mail is relayed at once."),
    )
    busy_timeout: float = field(
        default=5.0,
        metadata=setting(
            Number(minimum=0.01, unit="seconds"),
            "How long a write waits for another connection's lock on the store (a `gateway "
            "hold` command, a backup) before it fails: a hold then gets 451, and release "
            "stops until the store takes writes again.",
            key="busy_timeout_seconds",
        ),
    )
    min_free_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=setting(
            Integer(minimum=0),
            "Free space to keep on the store's disk: a hold that would leave less is "
            "refused with 452 4.3.1 and the client keeps its message (as Postfix's "
            "queue_minfree). It keeps room for release, expiry and the database's own "
            "growth; 0 turns the check off.",
        ),
    )
    release_interval: float = field(
        default=5.0,
        metadata=setting(
            Number(minimum=0.01, unit="seconds"),
            "Time between periodic release passes (retries, admin releases, expiry, the "
            "store's write probe). Reloads and a device's new token start a pass at once.",
            key="release_interval_seconds",
        ),
    )
    retry_min: float = field(
        default=5.0,
        metadata=setting(
            Number(minimum=0.01, unit="seconds"),
            "Wait before retrying held mail the upstream deferred (4xx); doubles with each "
            "attempt up to `retry_max_seconds` (as Postfix's minimal_backoff_time).",
            key="retry_min_seconds",
        ),
    )
    retry_max: float = field(
        default=600.0,
        metadata=setting(
            Number(minimum=0.01, unit="seconds"),
            "Longest wait between retries of deferred held mail.",
            key="retry_max_seconds",
        ),
    )


@dataclass(frozen=True)
class StoreSettings:
    """Where held mail, the device inventory and notice memory live: SQLite at [hold]
    database (one gateway), or a PostgreSQL server that several gateways share
    (docs/operations.md#running-on-postgresql)."""

    toml_section: ClassVar[str] = "store"

    url: str | None = field(
        default=None,
        metadata=setting(
            Text(blank_is_unset=True),
            """A `postgresql://user@host:port/database` URL (libpq's form; `?sslmode=`
            and other parameters pass through). No password in it: give `password_file`,
            or set `PGPASSWORD` in the environment.""",
            unset="SQLite at `[hold] database`",
        ),
    )
    password: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            SecretFile(),
            "The PostgreSQL user's password, read from this file (never logged).",
            key="password_file",
            unset="`PGPASSWORD` from the environment, or none (peer, certificate or trust)",
        ),
    )
    pool_size: int = field(
        default=8,
        metadata=setting(
            Integer(minimum=1),
            """Connections each gateway's pool keeps to PostgreSQL (one more listens for
            the other gateways): N gateways need N times (pool_size + 1) connections,
            plus one per running CLI command.""",
        ),
    )
    connect_timeout: float = field(
        default=5.0,
        metadata=setting(
            Number(minimum=0.1, unit="seconds"),
            """How long connecting, or waiting for a free connection, may take before the
            operation fails (a hold then gets 451 and the client retries).""",
            key="connect_timeout_seconds",
        ),
    )
    claim_lease: float = field(
        default=300.0,
        metadata=setting(
            Number(minimum=1.0, unit="seconds"),
            """A gateway's (or worker's, with `[gateway] workers`) claim on a device's
            held mail while it relays it: another gateway or worker leaves that device
            alone until the claim is settled or this time has passed since it was last
            renewed (every third of it), so a crashed gateway's claims expire. Keep it
            well above the upstream timeout.""",
            key="claim_lease_seconds",
        ),
    )

    @property
    def postgres(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class SyncSettings:
    """The sync decision endpoint that Dovecot and nginx call at every IMAP/POP3 login
    (docs/sync.md)."""

    toml_section: ClassVar[str] = "sync"

    enabled: bool = field(
        default=False,
        metadata=setting(
            Flag(),
            """Serve the sync decision endpoint (Dovecot's oauth2 passdb, nginx's
            `auth_http`) on `listen`.""",
        ),
    )
    listen: Endpoint = field(
        default=Endpoint("127.0.0.1", 9588),
        metadata=setting(
            HostPort(),
            """Its HTTP listener. Off a loopback address it needs client credentials
            (`client_id` and `client_secret_file`, or `nginx_secret_file`).""",
        ),
    )
    client_id: str | None = field(
        default=None,
        metadata=setting(
            Text(),
            """Dovecot's `client_id`: accepted in the form body or HTTP Basic auth, with
            `client_secret_file`; other clients get 401.""",
            unset="no client authentication for Dovecot (loopback only)",
        ),
    )
    client_secret: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            SecretFile(),
            "Dovecot's `client_secret`, read from this file; goes with `client_id`.",
            key="client_secret_file",
            unset="no client authentication for Dovecot (loopback only)",
        ),
    )
    nginx_secret: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            SecretFile(),
            """The secret nginx sends in the `X-Gateway-Secret` header (`auth_http_header`),
            read from this file.""",
            key="nginx_secret_file",
            unset="no client authentication for nginx (loopback only)",
        ),
    )
    hold: HoldAtLogin = field(
        default="quarantine",
        metadata=setting(
            Choice.of(HoldAtLogin),
            """What a `hold` decision does to a login: `"quarantine"` logs the device in to
            the user's quarantine mailbox (`quarantine+<local>@<domain>`), `"refuse"`
            refuses the login with the policy's message.""",
        ),
    )
    imap_backend: Endpoint | None = field(
        default=None,
        metadata=setting(
            HostPort(),
            """nginx `auth_http`: the IMAP server (an IP address, as nginx requires) that
            allowed logins are proxied to.""",
            unset="no nginx endpoint",
        ),
    )
    backend_password: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            SecretFile(),
            """nginx `auth_http`: the password nginx logs in to `imap_backend` with, in place
            of the token (which never goes back to nginx). Required with `imap_backend`.""",
            key="backend_password_file",
            unset="none",
        ),
    )
    backend_master_user: str | None = field(
        default=None,
        metadata=setting(
            Text(),
            """nginx `auth_http`: log in to the backend as `<mailbox user>*<this>`, a Dovecot
            master user (`auth_master_user_separator = *`) whose password is
            `backend_password_file`.""",
            unset="the mailbox user itself",
        ),
    )
    auth_wait: int = field(
        default=3,
        metadata=setting(
            Integer(minimum=0, unit="seconds"),
            "nginx `auth_http`: `Auth-Wait` sent with a temporary refusal (`defer`).",
            key="auth_wait_seconds",
        ),
    )
    doveadm_url: str | None = field(
        default=None,
        metadata=setting(
            Text(blank_is_unset=True),
            """Dovecot's doveadm HTTP API (`http://127.0.0.1:8080/doveadm/v1`): after a
            reload that changes a device's sync decision, the gateway ends its user's open
            IMAP/POP3 sessions there (`doveadm kick`), so a ban reaches an IDLE session and a
            retraction brings a quarantined phone back to its inbox at its next login.""",
            unset="open sessions are not ended after a reload",
        ),
    )
    doveadm_api_key: str | None = field(
        default=None,
        repr=False,
        metadata=setting(
            SecretFile(),
            """The doveadm HTTP API key (Dovecot's `doveadm_api_key`), read from this file;
            required with `doveadm_url`.""",
            key="doveadm_api_key_file",
            unset="none",
        ),
    )
    kick_attempts: int = field(
        default=5,
        metadata=setting(
            Integer(minimum=1),
            """Attempts to end a user's sessions through the doveadm HTTP API before giving
            up (with backoff: 0.5 s, 1 s, 2 s, ... at most 10 s between attempts).""",
        ),
    )
    lmtp: Endpoint | None = field(
        default=None,
        metadata=setting(
            HostPort(),
            """Dovecot's LMTP listener: the gateway delivers the sync notices there (the
            warning in the real inbox, the notice in the quarantine mailbox, the notice that
            a ban was withdrawn), once per device, policy and phase.""",
            unset="no notices in mailboxes",
        ),
    )
    timeout: float = field(
        default=5.0,
        metadata=setting(
            Number(minimum=0.1),
            """Timeout of each call to Dovecot (a doveadm HTTP request, an LMTP delivery).
            A notice is delivered before the login is answered, so a Dovecot whose LMTP
            hangs delays a device's first login under a policy by at most this.""",
            key="timeout_seconds",
        ),
    )

    @property
    def on_loopback(self) -> bool:
        return is_loopback(self.listen.host)


def is_loopback(host: str) -> bool:
    """A listener only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    toml_section: ClassVar[str] = "gateway"

    path: Path
    tokens: VerifierSettings  # [tokens]
    smtp: SmtpSettings  # [smtp]
    upstream: UpstreamSettings  # [upstream]
    hold: HoldSettings  # [hold]
    limits: LimitSettings = field(default_factory=LimitSettings)  # [limits]
    sync: SyncSettings = field(default_factory=SyncSettings)  # [sync]
    store: StoreSettings = field(default_factory=StoreSettings)  # [store]
    policy_dir: Path = field(
        default=Path("policies"),
        metadata=setting(PathKind(), "Directory of the policy files; watched for changes."),
    )
    workers: int = field(
        default=1,
        metadata=setting(
            Integer(minimum=1),
            """Processes serving SMTP: more than 1 starts a supervisor and that many workers
            sharing the SMTP ports (SO_REUSEPORT) and the hold store; per-process limits
            then apply per worker (docs/operations.md#workers). `gateway serve
            --workers N` overrides it.""",
        ),
    )
    reload_interval: float = field(
        default=30.0,
        metadata=setting(
            Number(minimum=0.1),
            """How often the policy directory is checked for changes, besides watching it
            (SIGHUP reloads at once).""",
        ),
    )
    overrides_poll: float = field(
        default=1.0,
        metadata=setting(
            Number(minimum=0.1),
            """How often the operator overrides (`gateway policy suspend`, `exempt`) are
            read from the hold store, for those another process or replica wrote; this
            gateway's own admin API and, on PostgreSQL, a NOTIFY act at once.""",
            key="overrides_poll_seconds",
        ),
    )
    max_newly_blocked_devices: int | None = field(
        default=None,
        metadata=setting(
            Integer(minimum=0),
            """Reload guard: refuse a policy change that newly blocks more devices than this
            (docs/lifecycle.md).""",
            unset="no guard",
        ),
    )
    inventory_retention: timedelta = field(
        default=timedelta(days=30),
        metadata=setting(
            Duration(minimum=0.01, unit="days"),
            "How long a device seen stays in the inventory that impact previews count.",
            key="inventory_retention_days",
        ),
    )
    notices: bool = field(
        default=True,
        metadata=setting(
            Flag(),
            "Send notice mails to users (warn, hold, released): one per device, policy and phase.",
        ),
    )
    announce_rate: float = field(
        default=10.0,
        metadata=setting(
            Number(minimum=0.01, unit="notices per second"),
            """Announcements and "withdrawn" notices sent to the device inventory when a
            policy enters its announce phase or is retracted: at most this many per second.""",
            key="announce_notices_per_second",
        ),
    )
    notice_sender: str | None = field(
        default=None,
        metadata=setting(
            Text(),
            "Sender address of notice mails.",
            unset="`compliance-gateway@<smtp.hostname>`",
        ),
    )
    admin_listen: Endpoint | None = field(
        default=None,
        metadata=setting(
            HostPort(),
            """The admin HTTP listener: /livez, /readyz, /metrics, /status (gateway status),
            and the admin API under /api/v1 (tokens required, docs/admin.md).""",
            key="listen",
            section="admin",
            unset="no admin port",
        ),
    )
    admin_tokens_file: Path | None = field(
        default=None,
        metadata=setting(
            PathKind(),
            """Admin API tokens, one per line: `name role sha256-hex` (role `viewer` or
            `operator`); written by `gateway admin token add` (docs/admin.md). Read again
            on every request that presents a token, so adding one needs no restart.""",
            key="tokens_file",
            section="admin",
            unset="no tokens: every /api/v1 request is refused with 401",
        ),
    )
    groups: Mapping[str, frozenset[str]] = field(
        default_factory=dict,
        metadata=setting(
            MailLists("<group name>"), "The group's members.", section="groups", unset="no groups"
        ),
    )
    aliases: Mapping[str, frozenset[str]] = field(  # user -> extra senders
        default_factory=dict,
        metadata=setting(
            MailLists('"<user address>"', casefold_names=True),
            "Further addresses the user may use in MAIL FROM, besides their own.",
            section="aliases",
            unset="no aliases",
        ),
    )

    def may_send_as(self, user: str, sender: str) -> bool:
        """MAIL FROM must be the authenticated user or one of their configured aliases."""
        user, sender = user.casefold(), sender.casefold()
        return sender == user or sender in self.aliases.get(user, frozenset())


# --- The sections of gateway.toml, and the keys in each ---------------------------------


@dataclass(frozen=True)
class Section:
    """One TOML table of gateway.toml."""

    name: str  # dotted, as in its header
    doc: str
    array: bool = False  # [[name]]: any number of these tables
    free_form: bool = False  # its keys are names chosen by the admin
    required: bool = False


SECTIONS: tuple[Section, ...] = (
    Section("gateway", "Policies, their reloading, the device inventory and notices."),
    Section("tokens", "Device-compliance tokens: who may sign them, and for whom.", required=True),
    Section(
        "tokens.issuers",
        "One table per trusted issuer; at least one.",
        array=True,
        required=True,
    ),
    Section("smtp", "The submission listeners, facing the devices."),
    Section("upstream", "Where accepted mail goes."),
    Section(
        "upstream.smarthosts",
        'The relays of mode `"smarthost"`, tried in order (failover); at least one in that mode.',
        array=True,
    ),
    Section("hold", "Mail held by policies until the device complies."),
    Section(
        "store",
        "The shared store for several gateways (PostgreSQL); without it, SQLite at "
        "`[hold] database` (docs/operations.md#running-on-postgresql).",
    ),
    Section(
        "limits",
        "Limits per client, user and session. Replies and reasoning: docs/operations.md#limits.",
    ),
    Section(
        "admin", "The admin HTTP port, for probes and metrics; keep it off the public network."
    ),
    Section(
        "sync",
        "The sync decision endpoint: IMAP and POP3 logins decided by the same tokens and "
        "policies (docs/sync.md).",
    ),
    Section(
        "groups",
        "Named lists of addresses, for policies' `groups` and `exempt.groups`.",
        free_form=True,
    ),
    Section("aliases", "Extra MAIL FROM addresses a user may use.", free_form=True),
)

SETTINGS_CLASSES: tuple[type[Any], ...] = (
    Settings,
    VerifierSettings,
    Issuer,
    SmtpSettings,
    UpstreamSettings,
    Smarthost,
    HoldSettings,
    StoreSettings,
    LimitSettings,
    SyncSettings,
)


@dataclass(frozen=True)
class Key:
    """A documented key: where it is written, and the field it fills."""

    section: Section
    owner: type[Any]
    field: dataclasses.Field[Any]
    setting: Setting

    @property
    def name(self) -> str:
        return self.setting.key or self.field.name

    @property
    def required(self) -> bool:
        return _is_required(self.field)

    @property
    def default(self) -> Any:
        """The field's default (before paths are resolved against gateway.toml's directory)."""
        return _field_default(self.field)


def _declared(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    for each in dataclasses.fields(cls):
        declared = each.metadata.get("setting")
        if isinstance(declared, Setting):
            yield each, declared


def _section_of(cls: type[Any], declared: Setting) -> str:
    section: str = declared.section or cls.toml_section
    return section


def _is_required(each: dataclasses.Field[Any]) -> bool:
    return each.default is dataclasses.MISSING and each.default_factory is dataclasses.MISSING


def _field_default(each: dataclasses.Field[Any]) -> Any:
    if each.default_factory is not dataclasses.MISSING:
        return each.default_factory()
    return None if each.default is dataclasses.MISSING else each.default


def documented_keys() -> list[Key]:
    """Every key of gateway.toml, section by section in SECTIONS order."""
    return [
        Key(section, cls, each, declared)
        for section in SECTIONS
        for cls in SETTINGS_CLASSES
        for each, declared in _declared(cls)
        if _section_of(cls, declared) == section.name
    ]


# --- Reading -------------------------------------------------------------------------------


def _read_keys(
    table: Table | None, cls: type[Any], base: Path, section: str | None = None
) -> dict[str, Any]:
    """The declared fields of ``cls`` that live in ``section`` (default: the class's own),
    each read as its kind says, or the field's default when the key is absent. A required
    key that is missing or wrong is None (and a problem has been recorded)."""
    wanted = section or cls.toml_section
    values: dict[str, Any] = {}
    for each, declared in _declared(cls):
        if _section_of(cls, declared) != wanted:
            continue
        required = _is_required(each)
        value = None
        if table is not None:
            value = declared.kind.read(table, declared.key or each.name, base, required=required)
        if value is None and not required:
            value = declared.kind.default(_field_default(each), base)
        values[each.name] = value
    return values


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


def _nameservers(table: Table, key: str) -> tuple[Endpoint, ...]:
    """IP addresses, each with an optional port (host:port as for listen; default 53)."""
    found = []
    for index, text in enumerate(table.texts(key) or []):
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
                    (*table.path, key, index),
                    f"'{text}' is not an IP address (with an optional :port)",
                )
            )
            continue
        if not 0 < port < 65536:
            table.problem(key, f"'{text}' has an invalid port")
            continue
        found.append(Endpoint(address, port))
    return tuple(found)


def _read_smtp(table: Table | None, base: Path) -> SmtpSettings:
    settings = SmtpSettings(**_read_keys(table, SmtpSettings, base))
    if table is None:
        return settings
    # One of the two given and the other absent (a given one that failed is reported already).
    if (settings.tls_cert is None) != (settings.tls_key is None) and (
        table.has("tls_cert") != table.has("tls_key")
    ):
        table.problem("tls_cert", "tls_cert and tls_key go together")
    if settings.implicit_tls_listen and not settings.tls_enabled:
        table.problem("implicit_tls_listen", "implicit TLS needs tls_cert and tls_key")
    if settings.allow_plaintext_auth and not is_loopback(settings.listen.host):
        # As Postfix's smtpd_tls_auth_only: a token sent in clear on a network is a
        # token anyone on the path can replay (RFC 4954 s 4, RFC 8314 s 3).
        table.problem(
            "allow_plaintext_auth",
            f"AUTH without TLS on {settings.listen}, which other hosts can reach: tokens "
            "would cross the network in clear. Remove allow_plaintext_auth and set "
            "tls_cert and tls_key (AUTH after STARTTLS), or listen on a loopback address",
        )
    table.finish()
    return settings


def _read_sync(table: Table | None, base: Path) -> SyncSettings:
    settings = SyncSettings(**_read_keys(table, SyncSettings, base))
    if table is None:
        return settings
    for key, secret in (
        ("client_secret_file", settings.client_secret),
        ("nginx_secret_file", settings.nginx_secret),
        ("backend_password_file", settings.backend_password),
    ):
        if secret == "":
            table.problem(key, "the file is empty")
    if (settings.client_id is None) != (settings.client_secret is None) and (
        table.has("client_id") != table.has("client_secret_file")
    ):
        table.problem("client_id", "client_id and client_secret_file go together")
    backend = settings.imap_backend
    if backend is not None:
        try:
            ipaddress.ip_address(backend.host)
        except ValueError:
            table.problem(
                "imap_backend",
                f"'{backend.host}' is not an IP address; nginx connects to the address it is given",
            )
        if settings.backend_password is None and not table.has("backend_password_file"):
            table.problem(
                "backend_password_file",
                "imap_backend needs backend_password_file (nginx never gets the token back)",
            )
    if settings.doveadm_url is not None:
        scheme = urllib.parse.urlsplit(settings.doveadm_url).scheme
        if scheme not in ("http", "https"):
            table.problem("doveadm_url", f"'{settings.doveadm_url[:200]}' is not an http(s) URL")
        if settings.doveadm_api_key is None and not table.has("doveadm_api_key_file"):
            table.problem("doveadm_api_key_file", "doveadm_url needs doveadm_api_key_file")
    if settings.doveadm_api_key == "":
        table.problem("doveadm_api_key_file", "the file is empty")
    has_credentials = settings.client_secret is not None or settings.nginx_secret is not None
    if settings.enabled and not settings.on_loopback and not has_credentials:
        table.problem(
            "listen",
            f"the sync listener {settings.listen} is reachable from other hosts, and anyone "
            "who reaches it can ask about any token: set client_id and client_secret_file "
            "(Dovecot) or nginx_secret_file (nginx), or listen on a loopback address",
        )
    table.finish()
    return settings


def _read_store(table: Table | None, base: Path) -> StoreSettings:
    settings = StoreSettings(**_read_keys(table, StoreSettings, base))
    if table is None:
        return settings
    if settings.url is not None:
        parsed = urllib.parse.urlsplit(settings.url)
        if parsed.scheme not in ("postgresql", "postgres") or not parsed.netloc:
            table.problem("url", "not a postgresql:// URL (postgresql://user@host:5432/gateway)")
        elif parsed.password is not None:
            table.problem(
                "url",
                "the URL holds a password: put it in password_file or PGPASSWORD instead "
                "(gateway.toml is not a secret)",
            )
    if settings.password == "":
        table.problem("password_file", "the file is empty")
    table.finish()
    return settings


def _read_section(table: Table | None, cls: type[Any], base: Path) -> Any:
    """A section whose every key is a declared field of ``cls``."""
    values = _read_keys(table, cls, base)
    if table is not None:
        table.finish()
    return cls(**values)


def _read_smarthost(table: Table, base: Path) -> Smarthost:
    host: Smarthost = _read_section(table, Smarthost, base)
    credentials = table.has("username") or table.has("password_file")
    if host.tls == "none" and credentials:
        table.problem(
            "tls",
            f'smarthost {host} has credentials (username, password_file) and tls = "none": '
            'the password would go over plain TCP. Use tls = "starttls" or "tls"',
        )
    return host


def _read_upstream(table: Table | None, base: Path) -> UpstreamSettings:
    if table is None:
        return UpstreamSettings()
    values = _read_keys(table, UpstreamSettings, base)
    hosts = tuple(_read_smarthost(t, base) for t in table.tables("smarthosts"))
    settings = UpstreamSettings(**values, smarthosts=hosts)
    if settings.mode == "smarthost" and not hosts:
        table.problem("smarthosts", 'mode = "smarthost" needs at least one [[upstream.smarthosts]]')
    table.finish()
    return settings


def _read_tokens(table: Table | None, base: Path) -> VerifierSettings | None:
    if table is None:
        return None
    values = _read_keys(table, VerifierSettings, base)
    issuers: dict[str, Issuer] = {}
    for issuer_table in table.tables("issuers"):
        issuer = _read_keys(issuer_table, Issuer, base)
        issuer_table.finish()
        name = issuer["issuer"]
        if name is None:
            continue
        if name in issuers:
            issuer_table.problem("issuer", f"issuer {name!r} is configured twice")
            continue
        url = issuer["jwks_url"]
        if url is not None and (problem := jwks_url_problem(url)):
            issuer_table.problem("jwks_url", problem)
            continue
        if not issuer["keys"] and url is None and not issuer_table.has("keys"):
            issuer_table.problem("keys", "give key files (keys) or a jwks_url")
            continue
        issuers[name] = Issuer(**issuer)
    if not issuers:
        table.problem("issuers", "configure at least one [[tokens.issuers]]")
    table.finish()
    if values["audience"] is None:
        return None
    return VerifierSettings(**values, issuers=issuers)


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
    values = _read_keys(gateway, Settings, base)
    if gateway:
        gateway.finish()
    tokens = _read_tokens(root.table("tokens", required=True), base)
    smtp = _read_smtp(root.table("smtp"), base)
    upstream = _read_upstream(root.table("upstream"), base)
    limits: LimitSettings = _read_section(root.table("limits"), LimitSettings, base)
    hold: HoldSettings = _read_section(root.table("hold"), HoldSettings, base)
    sync = _read_sync(root.table("sync"), base)
    store = _read_store(root.table("store"), base)
    admin = root.table("admin")
    values |= _read_keys(admin, Settings, base, "admin")
    if admin:
        admin.finish()
    values |= _read_keys(root, Settings, base, "groups")
    values |= _read_keys(root, Settings, base, "aliases")
    root.finish()
    if problems or tokens is None:
        raise SettingsError(problems)
    return Settings(
        path=path,
        tokens=tokens,
        smtp=smtp,
        upstream=upstream,
        hold=hold,
        limits=limits,
        sync=sync,
        store=store,
        **values,
    )
