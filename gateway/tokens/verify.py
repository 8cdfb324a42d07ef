"""Verify a compact JWS device token into DeviceClaims. Pure: the caller passes ``now``.

Order of checks, cheapest and most hostile-proof first:
size cap -> shape -> header JSON -> alg in the fixed allow-list -> issuer (from the
unverified payload, used only to pick keys) -> alg allowed for that issuer -> typ -> kid
looked up in that issuer's configured keys -> signature (joserfc, with a registry holding
only our algorithms) -> claims, validated into a typed value.

The token never picks its algorithm: the allow-list is fixed here and narrowed per
issuer, and the key's type must fit the algorithm.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.errors import BadSignatureError, InvalidKeyCurveError, JoseError
from joserfc.jwa import ESAlgorithm, JWSAlgModel
from joserfc.jwk import ECKey, OKPKey
from joserfc.jws import JWSRegistry

from gateway.config.keys import PublicKey
from gateway.config.settings import ALLOWED_ALGORITHMS, Issuer, VerifierSettings
from gateway.domain import Device, DeviceClaims, DeviceClass, Platform
from gateway.errors import (
    BadSignature,
    InvalidClaim,
    MalformedToken,
    MissingClaim,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenTooLarge,
    UnknownIssuer,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongTokenType,
)
from gateway.tokens.keyring import KeyRing


class Ed25519Algorithm(JWSAlgModel):
    """EdDSA over Ed25519 only (RFC 8037 ``EdDSA`` restricted to Ed25519 = RFC 9864 ``Ed25519``).

    joserfc's ``EdDSA`` also accepts Ed448 keys and warns that the name is deprecated;
    restricting it to Ed25519 makes both names mean the same, well-defined thing.
    """

    key_type = "OKP"

    def __init__(self, name: str) -> None:
        self.name = name
        self.description = f"{name}: EdDSA using Ed25519"

    def check_key(self, key: Any) -> None:
        super().check_key(key)
        if key.curve_name != "Ed25519":
            raise InvalidKeyCurveError(f"'{self.name}' needs an Ed25519 key")

    def sign(self, msg: bytes, key: Any) -> bytes:
        private: Ed25519PrivateKey = key.get_op_key("sign")
        return private.sign(msg)

    def verify(self, msg: bytes, sig: bytes, key: Any) -> bool:
        public: Ed25519PublicKey = key.get_op_key("verify")
        try:
            public.verify(sig, msg)
        except InvalidSignature:
            return False
        return True


_ALGORITHM_IMPLEMENTATIONS: dict[str, JWSAlgModel] = {
    "EdDSA": Ed25519Algorithm("EdDSA"),
    "Ed25519": Ed25519Algorithm("Ed25519"),
    "ES256": ESAlgorithm("ES256", "P-256", 256),
}

# The fixed allow-list is declared with the settings (issuers may narrow it, never widen
# it); every name on it has exactly one implementation here.
assert frozenset(_ALGORITHM_IMPLEMENTATIONS) == ALLOWED_ALGORITHMS
_KEY_TYPE_FOR = {"EdDSA": OKPKey, "Ed25519": OKPKey, "ES256": ECKey}


class GatewayRegistry(JWSRegistry):
    """A JWS registry that knows our three algorithms and nothing else (no none, no HMAC).

    joserfc ignores its ``algorithms=`` argument when a registry is passed, so the
    verifier builds one registry per algorithm, each allowing exactly that one.
    """

    algorithms = dict(_ALGORITHM_IMPLEMENTATIONS)  # noqa: RUF012  # joserfc's class-level table
    recommended: list[str] = []  # noqa: RUF012

    def __init__(self, allowed: frozenset[str] | None = None) -> None:
        super().__init__(algorithms=sorted(allowed or ALLOWED_ALGORITHMS))


MAX_APPS = 5000
_B64URL_RE = re.compile(rb"^[A-Za-z0-9_-]*$")
_SUBJECT_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
# Token text reaches SMTP replies, the notice mail's headers, logs and the admin's
# terminal: C0 controls (CR LF among them), DEL, C1 controls and the Unicode line and
# paragraph separators are refused at the door rather than escaped at each exit.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# NumericDates (RFC 7519 s 2) are accepted from 1970 to 3000: far enough from the
# calendar's ends (year 1, year 9999) that adding the leeway never overflows.
_LATEST_DATE = datetime(3000, 1, 1, tzinfo=UTC).timestamp()


def _b64json(segment: bytes, what: str) -> dict[str, Any]:
    if not _B64URL_RE.match(segment):
        raise MalformedToken(f"token {what} is not base64url")
    try:
        decoded = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedToken(f"token {what} is not valid base64url") from exc
    try:
        value = json.loads(decoded)
    except (ValueError, RecursionError) as exc:
        raise MalformedToken(f"token {what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise MalformedToken(f"token {what} is not a JSON object")
    return value


def _check_extensions(header: Mapping[str, Any]) -> None:
    """Refuse ``crit`` and ``b64``: we implement no JWS extension (RFC 7515 s 4.1.11 says
    a critical one we do not understand makes the token invalid), and under RFC 7797's
    ``b64: false`` the JOSE library would verify a payload other than the one we read."""
    for name in ("crit", "b64"):
        if name in header:
            raise MalformedToken(
                f"token header has '{name}': no JWS extension is accepted (RFC 7515 s 4.1.11, RFC 7797)"
            )


def _printable(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _numeric_date(claims: Mapping[str, Any], name: str, required: bool) -> datetime | None:
    if name not in claims:
        if required:
            raise MissingClaim(f"token has no '{name}' claim")
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidClaim(
            f"claim '{name}' must be a number of seconds since the epoch, got {_printable(value)}"
        )
    if not (math.isfinite(value) and 0 <= value < _LATEST_DATE):
        raise InvalidClaim(
            f"claim '{name}' is out of range: {_printable(value)} "
            "(seconds since 1970 and before the year 3000)"
        )
    return datetime.fromtimestamp(value, UTC)


def _check_controls(value: str, label: str) -> None:
    found = _CONTROL_RE.search(value)
    if found is not None:
        raise InvalidClaim(
            f"claim '{label}' contains a control character (U+{ord(found.group()):04X}) "
            f"at offset {found.start()}; the MDM must send printable text"
        )


def _text(
    obj: Mapping[str, Any], name: str, label: str, *, required: bool, limit: int = 256
) -> str | None:
    if name not in obj or obj[name] is None:
        if required:
            raise MissingClaim(f"token has no '{label}' claim")
        return None
    value = obj[name]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidClaim(
            f"claim '{label}' must be a non-empty string of at most {limit} characters"
        )
    _check_controls(value, label)
    return value


def _enum(
    obj: Mapping[str, Any], name: str, label: str, kind: type[Platform] | type[DeviceClass]
) -> Any:
    value = _text(obj, name, label, required=True)
    allowed = [m.value for m in kind]
    if value not in allowed:
        raise InvalidClaim(
            f"claim '{label}' is {_printable(value)}; expected one of {', '.join(allowed)}"
        )
    return kind(value)


def claims_from_payload(
    payload: Mapping[str, Any],
) -> tuple[str, Device, frozenset[str], dict[str, bool], str | None]:
    """Validate the gateway-specific claims (sub, device, apps, posture, jti)."""
    subject = _text(payload, "sub", "sub", required=True, limit=320)
    assert subject is not None
    if not _SUBJECT_RE.match(subject):
        raise InvalidClaim(f"claim 'sub' must be a mail address, got {_printable(subject)}")
    device_obj = payload.get("device")
    if device_obj is None:
        raise MissingClaim("token has no 'device' claim")
    if not isinstance(device_obj, dict):
        raise InvalidClaim("claim 'device' must be an object")
    managed = device_obj.get("managed")
    if managed is not None and not isinstance(managed, bool):
        raise InvalidClaim("claim 'device.managed' must be true or false")
    device_id = _text(device_obj, "id", "device.id", required=True)
    assert device_id is not None
    device = Device(
        id=device_id,
        platform=_enum(device_obj, "platform", "device.platform", Platform),
        device_class=_enum(device_obj, "class", "device.class", DeviceClass),
        model=_text(device_obj, "model", "device.model", required=False),
        os_version=_text(device_obj, "os_version", "device.os_version", required=False, limit=64),
        managed=managed,
    )
    apps_raw = payload.get("apps", [])
    if not isinstance(apps_raw, list) or not all(
        isinstance(a, str) and 0 < len(a) <= 256 for a in apps_raw
    ):
        raise InvalidClaim("claim 'apps' must be a list of app identifiers (strings)")
    if len(apps_raw) > MAX_APPS:
        raise InvalidClaim(f"claim 'apps' lists more than {MAX_APPS} apps")
    for app in apps_raw:
        _check_controls(app, "apps")
    posture_raw = payload.get("posture", {})
    if not isinstance(posture_raw, dict) or not all(
        isinstance(v, bool) for v in posture_raw.values()
    ):
        raise InvalidClaim("claim 'posture' must be an object of true/false flags")
    for flag in posture_raw:
        _check_controls(flag, "posture")
    token_id = _text(payload, "jti", "jti", required=False)
    return subject, device, frozenset(apps_raw), dict(posture_raw), token_id


class TokenVerifier:
    """Verifies tokens against the configured issuers.

    Not side-effect free: it keeps a bounded cache of tokens whose signature verified, so
    that a device reconnecting with the same token skips the signature check. The time
    claims are checked again on every use. Meant to be shared by the sessions of one event
    loop (the cache is not locked).
    """

    def __init__(
        self,
        settings: VerifierSettings,
        cache_size: int | None = None,
        keyring: KeyRing | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring if keyring is not None else KeyRing(settings.issuers)
        self._generation = self.keyring.generation
        self._registries = {alg: GatewayRegistry(frozenset([alg])) for alg in ALLOWED_ALGORITHMS}
        # Verified tokens: a device reconnecting with the same token skips the signature
        # check (about 60 µs for Ed25519) but never the time checks.
        # Least recently used first: a fleet of devices larger than the cache keeps the
        # ones that reconnect, instead of a FIFO evicting every device in turn.
        self._verified: OrderedDict[bytes, DeviceClaims] = OrderedDict()
        self._cache_size = settings.cache_entries if cache_size is None else cache_size

    def verify(self, token: str | bytes, now: datetime) -> DeviceClaims:
        settings = self.settings
        raw = token.encode("ascii", "replace") if isinstance(token, str) else token
        if len(raw) > settings.max_token_bytes:
            raise TokenTooLarge(
                f"token is {len(raw)} bytes; the limit is {settings.max_token_bytes}"
            )
        raw = raw.strip()
        if self._generation != self.keyring.generation:
            # Keys were rotated: a token whose key was withdrawn must not live on here.
            self._verified.clear()
            self._generation = self.keyring.generation
        cached = self._verified.get(raw)
        if cached is not None:
            self._verified.move_to_end(raw)
            self._check_times(cached.expires_at, cached.issued_at, cached.not_before, now)
            return cached
        claims = self._verify_uncached(raw, now)
        if not self._cache_size:
            return claims
        if len(self._verified) >= self._cache_size:
            self._verified.popitem(last=False)
        self._verified[raw] = claims
        return claims

    def _verify_uncached(self, raw: bytes, now: datetime) -> DeviceClaims:
        settings = self.settings
        parts = raw.split(b".")
        if len(parts) != 3 or not parts[0]:
            raise MalformedToken(
                "token is not a compact JWS (three base64url parts separated by dots)"
            )
        header = _b64json(parts[0], "header")
        _check_extensions(header)
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise UnsupportedAlgorithm(
                f"token algorithm {_printable(alg)} is not accepted; sign with EdDSA (Ed25519) or ES256"
            )
        if not parts[1] or not parts[2]:
            raise MalformedToken("token has an empty payload or signature")
        payload = _b64json(parts[1], "payload")
        issuer_name = payload.get("iss")
        if issuer_name is None:
            raise MissingClaim("token has no 'iss' claim")
        if not isinstance(issuer_name, str):
            raise InvalidClaim("claim 'iss' must be a string")
        issuer = settings.issuers.get(issuer_name)
        if issuer is None:
            raise UnknownIssuer(f"issuer {_printable(issuer_name)} is not trusted by this gateway")
        if alg not in issuer.algorithms:
            raise UnsupportedAlgorithm(f"issuer {issuer_name} is not allowed to sign with {alg}")
        self._check_type(header.get("typ"), issuer)
        key = self._select_key(header, issuer)
        if not isinstance(key, _KEY_TYPE_FOR[alg]):
            raise UnsupportedAlgorithm(
                f"key {_printable(header.get('kid'))} of {issuer_name} cannot verify {alg}"
            )
        try:
            jws.deserialize_compact(raw, key, registry=self._registries[alg])
        except BadSignatureError as exc:
            raise BadSignature(
                f"signature does not verify with key {_printable(header.get('kid'))} of {issuer_name}"
            ) from exc
        except JoseError as exc:
            raise MalformedToken(
                f"token rejected by the JWS parser: {exc.error or type(exc).__name__}"
            ) from exc
        return self._claims(payload, issuer_name, now)

    def _check_times(
        self, expires_at: datetime, issued_at: datetime, not_before: datetime | None, now: datetime
    ) -> None:
        leeway = self.settings.leeway
        if now >= expires_at + leeway:
            raise TokenExpired(f"token expired at {_iso(expires_at)}")
        if not_before is not None and now < not_before - leeway:
            raise TokenNotYetValid(f"token is not valid before {_iso(not_before)}")
        if issued_at > now + leeway:
            raise TokenNotYetValid(
                f"token was issued in the future ({_iso(issued_at)}); check the MDM's clock"
            )

    @staticmethod
    def _check_type(typ: object, issuer: Issuer) -> None:
        if issuer.token_type is not None:
            if typ != issuer.token_type:
                raise WrongTokenType(
                    f"token typ is {_printable(typ)}; {issuer.issuer} tokens must say {issuer.token_type!r}"
                )
        elif typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise WrongTokenType(f"token typ is {_printable(typ)}; expected JWT")

    def unknown_key(self, token: str | bytes) -> tuple[str, str] | None:
        """(issuer, kid) when the token names a kid that a JWKS-publishing issuer has not
        shown us yet: worth one fetch before verifying. Nothing is trusted from here on:
        this only reads which issuer to ask; the full verification follows."""
        raw = token.encode("ascii", "replace") if isinstance(token, str) else token
        if len(raw) > self.settings.max_token_bytes:
            return None
        raw = raw.strip()
        if self._generation == self.keyring.generation and raw in self._verified:
            return None  # verified with a key we hold: the usual case, two JSON parses saved
        parts = raw.split(b".")
        if len(parts) != 3:
            return None
        try:
            kid = _b64json(parts[0], "header").get("kid")
            issuer_name = _b64json(parts[1], "payload").get("iss")
        except TokenError:
            return None
        if not isinstance(kid, str) or not isinstance(issuer_name, str):
            return None
        issuer = self.settings.issuers.get(issuer_name)
        if issuer is None or issuer.jwks_url is None or self.keyring.knows(issuer_name, kid):
            return None
        return issuer_name, kid

    def _select_key(self, header: Mapping[str, Any], issuer: Issuer) -> PublicKey:
        keys = self.keyring.keys_of(issuer.issuer)
        kid = header.get("kid")
        if kid is None:
            if len(keys) == 1:
                return next(iter(keys.values()))
            raise UnknownKey(f"token has no kid and issuer {issuer.issuer} has {len(keys)} keys")
        if not isinstance(kid, str):
            raise UnknownKey("token kid must be a string")
        # kid is only ever a dictionary key: never a path, URL or query.
        key = keys.get(kid)
        if key is None:
            raise UnknownKey(f"unknown kid {_printable(kid, 60)} for issuer {issuer.issuer}")
        return key

    def _claims(self, payload: Mapping[str, Any], issuer_name: str, now: datetime) -> DeviceClaims:
        expires_at = _numeric_date(payload, "exp", required=True)
        issued_at = _numeric_date(payload, "iat", required=True)
        not_before = _numeric_date(payload, "nbf", required=False)
        assert expires_at is not None
        assert issued_at is not None
        self._check_times(expires_at, issued_at, not_before, now)
        audience_raw = payload.get("aud")
        if audience_raw is None:
            raise MissingClaim("token has no 'aud' claim")
        audience = (audience_raw,) if isinstance(audience_raw, str) else audience_raw
        if not isinstance(audience, list | tuple) or not all(isinstance(a, str) for a in audience):
            raise InvalidClaim("claim 'aud' must be a string or a list of strings")
        if self.settings.audience not in audience:
            raise WrongAudience(
                f"token audience {_printable(audience_raw)} does not name this gateway ({self.settings.audience})"
            )
        subject, device, apps, posture, token_id = claims_from_payload(payload)
        return DeviceClaims(
            issuer=issuer_name,
            subject=subject,
            audience=tuple(audience),
            issued_at=issued_at,
            expires_at=expires_at,
            not_before=not_before,
            token_id=token_id,
            device=device,
            apps=apps,
            posture=posture,
        )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
