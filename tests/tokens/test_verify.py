"""Token verification: one distinct typed error per way a token can be wrong."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway.domain import DeviceClass, Platform
from gateway.errors import (
    BadSignature,
    InvalidClaim,
    MalformedToken,
    MissingClaim,
    TokenExpired,
    TokenNotYetValid,
    TokenTooLarge,
    UnknownIssuer,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongTokenType,
)
from gateway.testing.issuer import TestIssuer
from gateway.tokens.keyring import KeyRing
from gateway.tokens.verify import TokenVerifier

NOW = datetime(2020, 7, 11, 10, 0, tzinfo=UTC)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: object) -> str:
    return b64(json.dumps(value).encode())


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@pytest.fixture(scope="module")
def verifier(issuer: TestIssuer) -> TokenVerifier:
    return TokenVerifier(issuer.verifier_settings())


def test_valid_token_gives_typed_claims(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.token(
        subject="Alice@Example.test",
        apps=["com.zhiliaoapp.musically", "com.apple.mobilesafari"],
        posture={"jailbroken": False},
        model="iPhone15,2",
        os_version="17.2",
        managed=True,
        issued_at=NOW,
    )
    claims = verifier.verify(token, NOW)
    assert claims.subject == "Alice@Example.test"
    assert claims.user == "alice@example.test"
    assert claims.device.platform is Platform.IOS
    assert claims.device.device_class is DeviceClass.MOBILE
    assert claims.device.model == "iPhone15,2"
    assert claims.device.managed is True
    assert claims.apps == frozenset({"com.zhiliaoapp.musically", "com.apple.mobilesafari"})
    assert claims.posture == {"jailbroken": False}
    assert claims.expires_at == NOW + timedelta(minutes=15)


def test_es256_issuer_is_accepted() -> None:
    es = TestIssuer.generate("ec-1", curve="P-256")
    claims = TokenVerifier(es.verifier_settings()).verify(es.token(issued_at=NOW), NOW)
    assert claims.device.id == "phone-1"


def test_bad_signature(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    header, _payload, signature = issuer.token(issued_at=NOW).split(".")
    forged_payload = b64json({**issuer.claims(issued_at=NOW), "sub": "mallory@example.test"})
    with pytest.raises(BadSignature, match="does not verify"):
        verifier.verify(f"{header}.{forged_payload}.{signature}", NOW)


def test_alg_none_is_refused(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = f"{b64json({'alg': 'none', 'kid': 'k1'})}.{b64json(issuer.claims(issued_at=NOW))}."
    with pytest.raises(UnsupportedAlgorithm, match="'none' is not accepted"):
        verifier.verify(token, NOW)


def test_hs256_signed_with_the_public_key_is_refused(
    issuer: TestIssuer, verifier: TokenVerifier
) -> None:
    # The classic key-confusion attack: HMAC keyed with the issuer's *public* key.
    public = issuer.key.as_dict(private=False)["x"].encode()
    signing_input = (
        f"{b64json({'alg': 'HS256', 'kid': 'k1'})}.{b64json(issuer.claims(issued_at=NOW))}"
    )
    mac = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(UnsupportedAlgorithm, match="HS256"):
        verifier.verify(f"{signing_input}.{b64(mac)}", NOW)


def test_alg_that_does_not_fit_the_key_is_refused(
    issuer: TestIssuer, verifier: TokenVerifier
) -> None:
    header = b64json({"alg": "ES256", "kid": "k1"})
    token = f"{header}.{b64json(issuer.claims(issued_at=NOW))}.{b64(b'x' * 64)}"
    with pytest.raises(UnsupportedAlgorithm, match="cannot verify ES256"):
        verifier.verify(token, NOW)


def test_issuer_can_narrow_algorithms() -> None:
    es = TestIssuer.generate("ec-1", curve="P-256", algorithms=frozenset({"EdDSA"}))
    with pytest.raises(UnsupportedAlgorithm, match="not allowed to sign with ES256"):
        TokenVerifier(es.verifier_settings()).verify(es.token(issued_at=NOW), NOW)


def test_unknown_kid(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.sign(issuer.claims(issued_at=NOW), header={"kid": "../../etc/passwd"})
    with pytest.raises(
        UnknownKey, match=r"unknown kid '../../etc/passwd' for issuer https://mdm.example.test"
    ):
        verifier.verify(token, NOW)


def test_wrong_issuer(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    other = TestIssuer.generate("k1", issuer="https://evil.example")
    with pytest.raises(UnknownIssuer, match=r"evil\.example"):
        verifier.verify(other.token(issued_at=NOW), NOW)


def test_wrong_audience(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.sign(issuer.claims(issued_at=NOW, extra={"aud": "some-other-service"}))
    with pytest.raises(WrongAudience, match="some-other-service"):
        verifier.verify(token, NOW)


def test_audience_list_naming_the_gateway_is_accepted(
    issuer: TestIssuer, verifier: TokenVerifier
) -> None:
    token = issuer.sign(issuer.claims(issued_at=NOW, extra={"aud": ["x", issuer.audience]}))
    assert verifier.verify(token, NOW).audience == ("x", issuer.audience)


def test_wrong_typ(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.sign(issuer.claims(issued_at=NOW), header={"typ": "at+jwt"})
    with pytest.raises(WrongTokenType):
        verifier.verify(token, NOW)


@pytest.mark.parametrize(
    ("offset", "valid"),
    [(timedelta(seconds=59), True), (timedelta(seconds=60), False), (timedelta(seconds=61), False)],
)
def test_expiry_at_the_leeway_boundary(
    issuer: TestIssuer, verifier: TokenVerifier, offset: timedelta, valid: bool
) -> None:
    token = issuer.token(issued_at=NOW - timedelta(minutes=15))  # exp == NOW
    if valid:
        verifier.verify(token, NOW + offset)
    else:
        with pytest.raises(TokenExpired, match="token expired at 2020-07-11T10:00:00Z"):
            verifier.verify(token, NOW + offset)


@pytest.mark.parametrize(
    ("offset", "valid"), [(timedelta(seconds=60), True), (timedelta(seconds=61), False)]
)
def test_not_before_at_the_leeway_boundary(
    issuer: TestIssuer, verifier: TokenVerifier, offset: timedelta, valid: bool
) -> None:
    nbf = int(NOW.timestamp())
    token = issuer.sign(issuer.claims(issued_at=NOW - timedelta(minutes=5), extra={"nbf": nbf}))
    if valid:
        verifier.verify(token, NOW - offset)
    else:
        with pytest.raises(TokenNotYetValid, match="not valid before 2020-07-11T10:00:00Z"):
            verifier.verify(token, NOW - offset)


def test_issued_in_the_future(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.token(issued_at=NOW + timedelta(minutes=5))
    with pytest.raises(TokenNotYetValid, match="issued in the future"):
        verifier.verify(token, NOW)


def test_missing_exp(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    claims = issuer.claims(issued_at=NOW)
    del claims["exp"]
    with pytest.raises(MissingClaim, match="'exp'"):
        verifier.verify(issuer.sign(claims), NOW)


def test_string_exp_is_invalid(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    claims = issuer.claims(issued_at=NOW)
    claims["exp"] = "2099-01-01"
    with pytest.raises(InvalidClaim, match="'exp' must be a number"):
        verifier.verify(issuer.sign(claims), NOW)


def test_oversized_token_is_refused_before_parsing(verifier: TokenVerifier) -> None:
    with pytest.raises(TokenTooLarge, match="limit is 16384"):
        verifier.verify("a" * 16385, NOW)
    with pytest.raises(TokenTooLarge):
        verifier.verify("{" * (2 * 1024 * 1024), NOW)  # 2 MB of JSON-bomb never reaches a parser


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "a.b",
        "a.b.c.d",
        "!!!!.eyJhIjoxfQ.c2ln",  # header not base64url
        f"{b64(b'not json')}.{b64(b'{}')}.c2ln",
        f"{b64(b'[1,2]')}.{b64(b'{}')}.c2ln",  # header not an object
    ],
)
def test_malformed_tokens(verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(MalformedToken):
        verifier.verify(token, NOW)


def test_malformed_payload_json(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = f"{b64json({'alg': 'EdDSA', 'kid': 'k1'})}.{b64(b'{not json')}.c2ln"
    with pytest.raises(MalformedToken, match="payload is not valid JSON"):
        verifier.verify(token, NOW)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": {"id": "p", "platform": "tvos", "class": "mobile"}}, "device.platform"),
        ({"device": {"id": "p", "platform": "ios", "class": "watch"}}, "device.class"),
        ({"device": "phone"}, "'device' must be an object"),
        ({"apps": "com.zhiliaoapp.musically"}, "'apps' must be a list"),
        ({"apps": [1, 2]}, "'apps' must be a list"),
        ({"posture": {"jailbroken": "no"}}, "'posture'"),
        ({"sub": 42}, "'sub'"),
        ({"sub": "not-an-address"}, "mail address"),
        ({"aud": 7}, "'aud'"),
        ({"iat": True}, "'iat'"),
    ],
)
def test_claims_of_the_wrong_type(
    issuer: TestIssuer, verifier: TokenVerifier, change: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidClaim, match=message):
        verifier.verify(issuer.sign({**issuer.claims(issued_at=NOW), **change}), NOW)


def test_missing_device_id(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.sign(
        {**issuer.claims(issued_at=NOW), "device": {"platform": "ios", "class": "mobile"}}
    )
    with pytest.raises(MissingClaim, match=r"device\.id"):
        verifier.verify(token, NOW)


def test_a_cached_token_is_still_refused_once_it_expires(issuer: TestIssuer) -> None:
    verifier = TokenVerifier(issuer.verifier_settings())
    token = issuer.token(issued_at=NOW - timedelta(minutes=15))  # exp == NOW
    first = verifier.verify(token, NOW - timedelta(minutes=1))
    assert verifier.verify(token, NOW) is first  # served from the cache of verified tokens
    with pytest.raises(TokenExpired):
        verifier.verify(token, NOW + timedelta(seconds=61))  # after exp + leeway


def test_the_cache_never_admits_a_token_that_failed(issuer: TestIssuer) -> None:
    verifier = TokenVerifier(issuer.verifier_settings(), cache_size=2)
    good = issuer.token(issued_at=NOW)
    forged = good[: good.rindex(".") + 1] + b64(b"\0" * 64)
    for _ in range(2):
        with pytest.raises(BadSignature):
            verifier.verify(forged, NOW)
    for index in range(3):  # the cache stays bounded
        verifier.verify(issuer.token(issued_at=NOW, device_id=f"d{index}"), NOW)
    assert len(verifier._verified) == 2


def test_the_verified_token_cache_keeps_the_devices_that_reconnect() -> None:
    """Least recently used is dropped first: with room for two, a device that keeps
    reconnecting stays cached while new devices come and go (a FIFO would evict it)."""
    from unittest import mock

    issuer = TestIssuer.generate("lru")
    verifier = TokenVerifier(issuer.verifier_settings(), cache_size=2)
    now = datetime.now(UTC)
    busy, *others = [issuer.token(device_id=f"device-{n}") for n in range(4)]
    with mock.patch.object(
        verifier, "_verify_uncached", wraps=verifier._verify_uncached
    ) as signature_checks:
        verifier.verify(busy, now)
        for other in others:
            verifier.verify(other, now)
            verifier.verify(busy, now)  # reconnects between every other device
        assert signature_checks.call_count == 1 + len(others)  # busy verified once only
        verifier.verify(others[0], now)  # long evicted
        assert signature_checks.call_count == 2 + len(others)


def test_the_cache_is_sized_by_configuration() -> None:
    issuer = TestIssuer.generate("size")
    settings = dataclasses.replace(issuer.verifier_settings(), cache_entries=0)
    verifier = TokenVerifier(settings)
    token = issuer.token()
    now = datetime.now(UTC)
    verifier.verify(token, now)
    verifier.verify(token, now)
    assert len(verifier._verified) == 0


def test_a_cached_tokens_kid_is_looked_up_again_once_the_keys_change(issuer: TestIssuer) -> None:
    """unknown_key skips parsing a token verified with the keys in force (the usual
    reconnect). That shortcut ends at a rotation: a token whose key was withdrawn asks
    for a JWKS fetch again and no longer verifies, and a cached token's time claims are
    checked on every use."""
    published = issuer.verifier_settings()
    config = published.issuers[issuer.issuer]
    key = config.keys["k1"]
    settings = dataclasses.replace(
        published,
        issuers={issuer.issuer: dataclasses.replace(config, keys={}, jwks_url="https://idp.test/")},
    )
    keyring = KeyRing(settings.issuers)
    keyring.set_fetched(issuer.issuer, {"k1": key})
    verifier = TokenVerifier(settings, keyring=keyring)
    token = issuer.token(issued_at=NOW)
    verifier.verify(token, NOW)  # cached from now on
    assert verifier.unknown_key(token) is None
    keyring.set_fetched(issuer.issuer, {})  # the issuer withdrew k1
    assert verifier.unknown_key(token) == (issuer.issuer, "k1")
    with pytest.raises(UnknownKey):
        verifier.verify(token, NOW)
    keyring.set_fetched(issuer.issuer, {"k1": key})  # and published it again
    verifier.verify(token, NOW)
    assert verifier.unknown_key(token) is None
    with pytest.raises(TokenExpired):
        verifier.verify(token, NOW + timedelta(hours=1))
