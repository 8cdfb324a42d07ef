"""The gateway's exception tree.

    GatewayError                      every error the gateway raises on purpose
    ├── ConfigError                   gateway.toml or a policy directory is unusable
    │   ├── SettingsError             gateway.toml: lists every problem found
    │   └── PolicyLoadError           policies/*.toml: lists every problem found
    ├── TokenError                    a device token is refused (reason code for metrics)
    │   ├── TokenTooLarge             over the size cap, refused before any parsing
    │   ├── MalformedToken            not compact JWS, bad base64url or JSON
    │   ├── UnsupportedAlgorithm      alg not in the allow-list (none, HS256, ...)
    │   ├── UnknownIssuer             iss names no configured issuer
    │   ├── UnknownKey                kid names no key of that issuer
    │   ├── BadSignature              signature does not verify
    │   ├── WrongTokenType            typ header is not the expected one
    │   ├── WrongAudience             aud does not name this gateway
    │   ├── TokenExpired              past exp (+ leeway)
    │   ├── TokenNotYetValid          before nbf, or iat in the future (- leeway)
    │   ├── MissingClaim              a required claim is absent
    │   └── InvalidClaim              a claim has the wrong type or value
    ├── HoldStoreError                the hold store cannot durably store or read
    │   ├── HoldStoreDamaged          the database file is corrupt (quick_check, or a read)
    │   └── HoldStoreInUse            another gateway is serving from the same store
    ├── ProxyHeaderError              a balancer's connection lacks a valid PROXY header
    └── RelayError                    the upstream could not take a message
        ├── RelayTemporaryError       4xx, timeout, disconnect: the client retries
        └── RelayPermanentError       5xx from the upstream: passed to the client

Third-party exceptions are translated at the boundary with ``raise ... from exc``;
their text never reaches an SMTP client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class GatewayError(Exception):
    """Base class: the message is meant for the person who can fix the problem."""


@dataclass(frozen=True)
class Problem:
    """One validation problem, located precisely enough for an admin to find it."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ListenError(GatewayError):
    """A listener could not bind (the port is taken, or needs privileges): one line for the
    operator naming the address and the setting, not a traceback."""


class ConfigError(GatewayError):
    """Configuration that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SettingsError(ConfigError):
    """gateway.toml is invalid."""


class PolicyLoadError(ConfigError):
    """A policy directory is invalid; the last good policy set stays in force."""


class TokenError(GatewayError):
    """A device-compliance token was refused.

    ``reason`` is a short stable code for metrics and logs; the message says what to fix.
    """

    reason = "invalid"


class TokenTooLarge(TokenError):
    reason = "oversized"


class MalformedToken(TokenError):
    reason = "malformed"


class UnsupportedAlgorithm(TokenError):
    reason = "algorithm"


class UnknownIssuer(TokenError):
    reason = "unknown_issuer"


class UnknownKey(TokenError):
    reason = "unknown_kid"


class BadSignature(TokenError):
    reason = "bad_signature"


class WrongTokenType(TokenError):
    reason = "wrong_typ"


class WrongAudience(TokenError):
    reason = "wrong_audience"


class TokenExpired(TokenError):
    reason = "expired"


class TokenNotYetValid(TokenError):
    reason = "not_yet_valid"


class MissingClaim(TokenError):
    reason = "missing_claim"


class InvalidClaim(TokenError):
    reason = "invalid_claim"


class HoldStoreError(GatewayError):
    """The hold store failed; the client gets 451 4.3.0 and keeps its message."""


class HoldStoreDamaged(HoldStoreError):
    """The database file is corrupt: restore it from a backup or move it aside."""


class HoldStoreLowOnSpace(HoldStoreError):
    """The store's disk is below its free-space floor: holds get 452 4.3.1 (as Postfix's
    queue_minfree) so that the disk never fills, and the client keeps its message."""


class HoldStoreInUse(HoldStoreError):
    """Another gateway holds the store's lock: one serving gateway per store."""


class ProxyHeaderError(GatewayError):
    """A connection from a `[smtp] proxy_protocol_from` network did not begin with a valid
    PROXY protocol header: it is closed without a greeting.

    ``reason`` is a short stable code for metrics and logs; the message says what to fix.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class RelayError(GatewayError):
    """The upstream did not accept a message."""

    def __init__(self, message: str, code: int = 451, enhanced: str = "4.4.0") -> None:
        super().__init__(message)
        self.code = code
        self.enhanced = enhanced


class RelayTemporaryError(RelayError):
    """Upstream trouble the client should retry: 4xx, timeouts, disconnects."""


class RelayPermanentError(RelayError):
    """The upstream refused for good (5xx); its reply is passed to the client."""
