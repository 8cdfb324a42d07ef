"""Admin tokens: bearer secrets whose SHA-256 is all the gateway keeps.

The tokens file has one line per admin, ``name role sha256-hex`` (``#`` starts a comment).
A token is 32 random bytes, URL-safe base64; it is shown once, by
``gateway admin token add``, and only its hash is written. A high-entropy random secret
needs no slow password hash: SHA-256 of it cannot be searched back. Comparison is in
constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import GatewayError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class Role(enum.Enum):
    VIEWER = "viewer"  # reads everything under /api/v1
    OPERATOR = "operator"  # also releases and drops held mail

    def may(self, needed: Role) -> bool:
        return self is Role.OPERATOR or needed is Role.VIEWER


class TokensFileError(GatewayError):
    """The tokens file cannot be read or has a bad line."""


@dataclass(frozen=True)
class Admin:
    """Who made a request: a token's name and role."""

    name: str
    role: Role
    token_hash: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_tokens(text: str, source: str) -> list[Admin]:
    admins: list[Admin] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise TokensFileError(f"{source}:{number}: expected `name role sha256-hex`")
        name, role, digest = fields
        if not NAME_RE.match(name):
            raise TokensFileError(f"{source}:{number}: bad name (letters, digits, . _ @ -)")
        if role not in {r.value for r in Role}:
            raise TokensFileError(f"{source}:{number}: role must be viewer or operator")
        if not _HASH_RE.match(digest):
            raise TokensFileError(f"{source}:{number}: the hash must be 64 lowercase hex digits")
        admins.append(Admin(name, Role(role), digest))
    return admins


class TokensFile:
    """The tokens file, read again when it changes (mtime, size): adding or removing a
    token takes effect on the next request, without a restart."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._admins: list[Admin] = []

    @property
    def configured(self) -> bool:
        return self.path is not None

    def admins(self) -> list[Admin]:
        if self.path is None:
            return []
        try:
            info = self.path.stat()
        except OSError as exc:
            raise TokensFileError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            try:
                text = self.path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise TokensFileError(f"cannot read {self.path}: {exc}") from exc
            self._admins = parse_tokens(text, str(self.path))
            self._stamp = stamp
        return self._admins

    def find(self, token: str) -> Admin | None:
        digest = token_hash(token)
        found = None
        for admin in self.admins():  # no early return: the time does not say which line
            if hmac.compare_digest(admin.token_hash, digest):
                found = admin
        return found


def add_token(path: Path, name: str, role: Role) -> str:
    """Append a new admin to the tokens file (created 0600) and return its token, which
    is not stored anywhere: the caller shows it once."""
    if not NAME_RE.match(name):
        raise TokensFileError(f"bad token name {name!r}: letters, digits, . _ @ - (at most 64)")
    existing = parse_tokens(path.read_text(), str(path)) if path.exists() else []
    if any(admin.name == name for admin in existing):
        raise TokensFileError(f"{path} already has a token named {name!r}; remove its line first")
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{name} {role.value} {token_hash(token)}\n".encode())
    finally:
        os.close(fd)
    return token
