"""The effective configuration, as `gateway config` prints it (like Postfix's ``postconf``).

Every documented key of gateway.toml with the value the gateway would use: what the file
(and GATEWAY_* variables) say, else the default. Walks the same declarations as the
reference (gateway/config/reference.py), so a new setting shows up here without edits.
Secrets (the ``*_file`` keys whose contents are passwords) are never shown, only whether
they are set.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.settings import (
    SECTIONS,
    CallLimit,
    HoldSettings,
    Issuer,
    Key,
    KeyFiles,
    LimitSettings,
    MailLists,
    SecretFile,
    Section,
    Settings,
    Smarthost,
    SmtpSettings,
    StoreSettings,
    SyncSettings,
    UpstreamSettings,
    VerifierSettings,
    _toml_literal,
    documented_keys,
)

MASKED = "<masked>"


@dataclass(frozen=True)
class Entry:
    """One key as the gateway uses it. ``value`` is a TOML literal; None when unset."""

    section: Section
    index: int | None  # which table of an array section ([[upstream.smarthosts]])
    key: str
    value: str | None
    is_default: bool
    masked: bool = False
    unset: str | None = None  # what leaving it out means
    note: str | None = None  # said after the value, as a comment

    def as_dict(self) -> dict[str, object]:
        return {
            "section": self.section.name,
            "index": self.index,
            "key": self.key,
            "value": None if self.value is None or self.masked else _from_toml(self.value),
            "default": self.is_default,
            "masked": self.masked,
        }


def _from_toml(literal: str) -> object:
    return tomllib.loads(f"v = {literal}")["v"]


def _instances(settings: Settings) -> Mapping[type[Any], list[Any]]:
    return {
        Settings: [settings],
        VerifierSettings: [settings.tokens],
        Issuer: list(settings.tokens.issuers.values()),
        SmtpSettings: [settings.smtp],
        UpstreamSettings: [settings.upstream],
        Smarthost: list(settings.upstream.smarthosts),
        HoldSettings: [settings.hold],
        LimitSettings: [settings.limits],
        SyncSettings: [settings.sync],
        StoreSettings: [settings.store],
    }


def _shown(key: Key, value: Any) -> str | None:
    kind = key.setting.kind
    if isinstance(kind, KeyFiles):
        # The key files are loaded into public keys; show their kids, not a path we lost.
        return _toml_literal(sorted(value)) if value else None
    if isinstance(kind, CallLimit) and isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_literal(k)} = {v}" for k, v in value.items()) + " }"
    return kind.show(value)


def _mail_lists(section: Section, key: Key, value: Mapping[str, frozenset[str]]) -> list[Entry]:
    return [
        Entry(section, None, _toml_literal(name), _toml_literal(sorted(members)), False)
        for name, members in sorted(value.items())
    ]


def effective(settings: Settings) -> list[Entry]:
    """Every key in reference order; for array sections, each table's keys in turn."""
    base = settings.path.parent
    instances = _instances(settings)
    keys = documented_keys()
    entries: list[Entry] = []
    for section in SECTIONS:
        owners = [k for k in keys if k.section == section]
        if not owners:
            continue
        count = len(instances[owners[0].owner]) if section.array else 1
        for index in range(count):
            for key in owners:
                holder = instances[key.owner][index]
                value = getattr(holder, key.field.name)
                if isinstance(key.setting.kind, MailLists):
                    entries += _mail_lists(section, key, value)
                    continue
                default = key.setting.kind.default(key.default, base)
                is_default = not key.required and value == default
                masked = isinstance(key.setting.kind, SecretFile) and value is not None
                note = (
                    "the kids of the keys loaded from the key files"
                    if isinstance(key.setting.kind, KeyFiles)
                    else None
                )
                entries.append(
                    Entry(
                        section,
                        index if section.array else None,
                        key.name,
                        MASKED if masked else _shown(key, value),
                        is_default,
                        masked,
                        key.setting.unset,
                        note,
                    )
                )
    return entries


def render(entries: list[Entry], *, changed_only: bool) -> str:
    """TOML-shaped text: a header per table, ``key = value``; unset keys as comments."""
    lines: list[str] = []
    current: tuple[str, int | None] | None = None
    for entry in entries:
        if changed_only and (entry.is_default or entry.value is None):
            continue
        where = (entry.section.name, entry.index)
        if where != current:
            current = where
            header = entry.section.name
            lines += ["", f"[[{header}]]" if entry.section.array else f"[{header}]"]
        if entry.value is None:
            meaning = f": {entry.unset}" if entry.unset else ""
            lines.append(f"# {entry.key} not set{meaning}")
        elif entry.masked:
            lines.append(f'{entry.key} = "{MASKED}"  # secret, not shown')
        else:
            note = f"  # {entry.note}" if entry.note else ""
            lines.append(f"{entry.key} = {entry.value}{note}")
    return "\n".join(lines).lstrip("\n") + "\n"
