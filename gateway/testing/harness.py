"""Run a real gateway on free loopback ports with a given config and policy directory."""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.config.settings import Settings, load_settings
from gateway.domain import Clock, utc_now
from gateway.server import GatewayServer
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

TEST_GROUPS = {"it-staff": ["it@example.test"], "executives": ["ceo@example.test"]}


def write_config(
    directory: Path,
    *,
    issuer: TestIssuer,
    upstream_port: int,
    policies: Mapping[str, str] | None = None,
    smtp: Mapping[str, object] | None = None,
    extra: str = "",
    notices: bool = False,
    limits: Mapping[str, object] | None = None,
    upstream: Mapping[str, object] | None = None,
    hold: Mapping[str, object] | None = None,
    sync: Mapping[str, object] | None = None,
    admin: Mapping[str, object] | None = None,
    sections: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """Write gateway.toml, the issuer's JWKS and policy files; returns the config path.

    ``sections`` sets keys of any section, merged over what is written otherwise:
    ``{"groups": {"sales": ["bob@example.test"]}, "gateway": {"notices": True}}``; a
    nested table or a list of tables (``{"upstream": {"smarthosts": [{...}]}}``) replaces
    the one written.

    Notice mails are off unless ``notices=True``, so tests count only their own mail.

    ``smtp``, ``limits``, ``upstream`` and ``hold`` entries override keys of those sections
    (values are written as TOML literals); ``extra`` is written into ``[hold]``. ``sync``
    turns the sync endpoint on (a free loopback port) with these keys; ``admin`` adds
    keys to ``[admin]`` (its listener is always on a free loopback port). The message rate
    limit is lifted unless ``limits`` sets it, so that
    tests which send a lot are not throttled.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies").mkdir(exist_ok=True)
    for name, text in (policies or {}).items():
        (directory / "policies" / name).write_text(text)
    issuer.write_jwks(directory / "issuer.jwks.json")
    smtp_values: dict[str, object] = {
        "hostname": "gateway.test",
        "listen": "127.0.0.1:0",
        "allow_plaintext_auth": True,
        "idle_timeout": 30,
    }
    smtp_values.update(smtp or {})
    limit_values: dict[str, object] = {"messages_per_user_per_minute": 100_000}
    limit_values.update(limits or {})
    upstream_values: dict[str, object] = {"timeout": 10}
    upstream_values.update(upstream or {})
    hold_values: dict[str, object] = {"database": "hold.db"}
    hold_values.update(hold or {})
    admin_values: dict[str, object] = {"listen": "127.0.0.1:0"}
    admin_values.update(admin or {})
    sync_section = ""
    if sync is not None:
        sync_values: dict[str, object] = {"enabled": True, "listen": "127.0.0.1:0"}
        sync_values.update(sync)
        sync_section = f"[sync]\n{_toml_lines(sync_values)}\n"
    groups = "\n".join(f"{name} = {json.dumps(members)}" for name, members in TEST_GROUPS.items())
    config = directory / "gateway.toml"
    config.write_text(
        f"""
[gateway]
policy_dir = "policies"
notices = {"true" if notices else "false"}

[smtp]
{_toml_lines(smtp_values)}

[limits]
{_toml_lines(limit_values)}

[tokens]
audience = "{issuer.audience}"

[[tokens.issuers]]
issuer = "{issuer.issuer}"
keys = ["issuer.jwks.json"]

[upstream]
{_toml_lines(upstream_values)}

[[upstream.smarthosts]]
host = "127.0.0.1"
port = {upstream_port}
tls = "none"

[groups]
{groups}

[aliases]
"alice@example.test" = ["a.smith@example.test"]

[admin]
{_toml_lines(admin_values)}

[hold]
{_toml_lines(hold_values)}
{extra}

{sync_section}
"""
    )
    if sections:
        merged = tomllib.loads(config.read_text())
        for name, values in sections.items():
            merged.setdefault(name, {}).update(values)
        config.write_text(dump_toml(merged))
    return config


def dump_toml(data: Mapping[str, object]) -> str:
    """Enough TOML for a gateway.toml: tables, arrays of tables, strings, numbers,
    booleans, lists and inline tables (the standard library reads TOML only)."""
    lines: list[str] = []

    def is_tables(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    def table(path: str, values: Mapping[str, object], header: str) -> None:
        lines.append(f"\n{header}")
        for key, value in values.items():
            if not isinstance(value, dict) and not is_tables(value):
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in values.items():
            child = f"{path}.{_toml_key(key)}"
            if isinstance(value, dict):
                table(child, value, f"[{child}]")
            elif is_tables(value):
                assert isinstance(value, list)
                for item in value:
                    table(child, item, f"[[{child}]]")

    for name, values in data.items():
        assert isinstance(values, dict), f"[{name}] must be a table"
        table(_toml_key(name), values, f"[{_toml_key(name)}]")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _toml_lines(values: Mapping[str, object]) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())


@dataclass
class RunningGateway:
    server: GatewayServer
    settings: Settings
    config_path: Path
    host: str
    port: int
    implicit_tls_port: int | None
    admin_port: int | None = None
    sync_port: int | None = None

    @property
    def policy_dir(self) -> Path:
        return self.settings.policy_dir


@asynccontextmanager
async def running_gateway(
    config_path: Path, *, clock: Clock = utc_now, grace: float = 2.0, release_tick: float = 0.2
) -> AsyncIterator[RunningGateway]:
    """Start ``gateway serve`` in this event loop from a config file; stop it afterwards."""
    settings = load_settings(config_path)
    server = GatewayServer(settings, clock=clock, release_tick=release_tick)
    addresses = await server.start()
    try:
        yield RunningGateway(
            server,
            settings,
            config_path,
            addresses.submission.host,
            addresses.submission.port,
            addresses.implicit_tls.port if addresses.implicit_tls else None,
            server.admin_port,
            server.sync_port,
        )
    finally:
        await server.stop(grace=grace)


@asynccontextmanager
async def gateway_with_upstream(
    directory: Path,
    issuer: TestIssuer,
    policies: Mapping[str, str] | None = None,
    *,
    clock: Clock = utc_now,
    smtp: Mapping[str, object] | None = None,
    extra: str = "",
    limits: Mapping[str, object] | None = None,
    sync: Mapping[str, object] | None = None,
    hold: Mapping[str, object] | None = None,
    release_tick: float = 0.2,
) -> AsyncIterator[tuple[RunningGateway, FakeUpstream]]:
    """The usual pair: a fake upstream, and a gateway relaying to it."""
    async with FakeUpstream.running() as upstream:
        config = write_config(
            directory,
            issuer=issuer,
            upstream_port=upstream.port,
            policies=policies,
            smtp=smtp,
            extra=extra,
            limits=limits,
            sync=sync,
            hold=hold,
        )
        async with running_gateway(config, clock=clock, release_tick=release_tick) as gateway:
            yield gateway, upstream
