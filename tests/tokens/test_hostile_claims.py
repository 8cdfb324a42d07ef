"""Tokens whose text would reach headers, replies, logs or a terminal, whose dates sit at
the calendar's edges, or whose header asks for JWS extensions we do not implement: each
is refused with a typed token error (535 with a reason on the wire), never accepted and
never a crash (451)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import InvalidClaim, MalformedToken, TokenError
from gateway.testing.device import FakeDevice, SendResult
from gateway.testing.harness import gateway_with_upstream
from gateway.testing.issuer import TestIssuer
from gateway.tokens.verify import TokenVerifier

NOW = datetime(2020, 7, 11, 10, 0, tzinfo=UTC)

CONTROLS = [
    "\r\n",  # header injection into the notice mail
    "\x00",
    "\x07",  # BEL
    "\x1b[2J",  # ESC: clears the admin's terminal
    "\x7f",  # DEL
    "\x85",  # NEL, a C1 control
    "\x9b",  # CSI, a C1 control
    "\u2028",  # LINE SEPARATOR
    "\u2029",  # PARAGRAPH SEPARATOR
]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(issuer: TestIssuer, header: dict[str, Any], payload: dict[str, Any]) -> str:
    """A token signed over exactly this header (the minting library would refuse some)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = issuer.key.get_op_key("sign").sign(signing_input.encode())
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer.generate("k1")


@pytest.fixture(scope="module")
def verifier(issuer: TestIssuer) -> TokenVerifier:
    return TokenVerifier(issuer.verifier_settings(), cache_size=0)


def with_claim(claims: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    if path.startswith("device."):
        claims["device"] = {**claims["device"], path.removeprefix("device."): value}
    else:
        claims[path] = value
    return claims


@pytest.mark.parametrize("control", CONTROLS, ids=repr)
@pytest.mark.parametrize(
    ("claim", "clean"),
    [
        ("device.id", "phone-1"),
        ("device.model", "iPhone15,2"),
        ("device.os_version", "17.2"),
        ("sub", "alice@example.test"),
        ("jti", "token-1"),
    ],
)
def test_control_characters_in_text_claims_are_refused(
    issuer: TestIssuer, verifier: TokenVerifier, claim: str, clean: str, control: str
) -> None:
    value = clean.replace("-", control + "-", 1) if "-" in clean else clean + control
    if claim == "sub":
        value = "alice" + control + "@example.test"
    token = issuer.sign(with_claim(issuer.claims(issued_at=NOW), claim, value))
    with pytest.raises(InvalidClaim, match=rf"'{claim}' contains a control character") as caught:
        verifier.verify(token, NOW)
    assert control not in str(caught.value)  # the message escapes what it quotes


@pytest.mark.parametrize("control", ["\r\n", "\x1b[31m", "\u2028"], ids=repr)
def test_control_characters_in_apps_and_posture_are_refused(
    issuer: TestIssuer, verifier: TokenVerifier, control: str
) -> None:
    apps = issuer.claims(issued_at=NOW, apps=["com.example" + control + "x"])
    with pytest.raises(InvalidClaim, match="'apps' contains a control character"):
        verifier.verify(issuer.sign(apps), NOW)
    posture = issuer.claims(issued_at=NOW, posture={"jail" + control: False})
    with pytest.raises(InvalidClaim, match="'posture' contains a control character"):
        verifier.verify(issuer.sign(posture), NOW)


def test_printable_unicode_is_still_accepted(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    token = issuer.token(issued_at=NOW, device_id="Zoë\u2019s iPhone", model="Pixel 8 Pro")
    assert verifier.verify(token, NOW).device.id == "Zoë\u2019s iPhone"


YEAR_9999 = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
YEAR_1 = int(datetime(1, 1, 1, tzinfo=UTC).timestamp())


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    [YEAR_9999, YEAR_9999 + 1, YEAR_1, YEAR_1 - 1, 10**30, -(10**30), 1e300, -1, -0.5],
    ids=["9999", "10000", "year-1", "year-0", "huge", "-huge", "1e300", "-1", "-0.5"],
)
def test_dates_at_the_calendars_edges_are_invalid_claims(
    issuer: TestIssuer, verifier: TokenVerifier, claim: str, value: float
) -> None:
    token = issuer.sign(with_claim(issuer.claims(issued_at=NOW), claim, value))
    with pytest.raises(InvalidClaim, match=rf"claim '{claim}' is out of range"):
        verifier.verify(token, NOW)


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["b64"], "b64": False},  # RFC 7797: the payload would be read unencoded
        {"b64": True},
        {"b64": False},
        {"crit": ["exp"], "exp": 1},
        {"crit": []},
    ],
    ids=json.dumps,
)
def test_critical_and_b64_headers_are_refused(
    issuer: TestIssuer, verifier: TokenVerifier, extra: dict[str, Any]
) -> None:
    header = {"alg": "EdDSA", "kid": "k1", **extra}
    token = signed(issuer, header, issuer.claims(issued_at=NOW))
    with pytest.raises(MalformedToken, match="header"):
        verifier.verify(token, NOW)


def test_the_signing_helper_makes_tokens_that_verify(
    issuer: TestIssuer, verifier: TokenVerifier
) -> None:
    """The refusals above are about the header, not about the helper's signatures."""
    token = signed(issuer, {"alg": "EdDSA", "kid": "k1"}, issuer.claims(issued_at=NOW))
    assert verifier.verify(token, NOW).device.id == "phone-1"


# --- over a real SMTP session ---------------------------------------------------------


async def send_token(tmp_path: Path, issuer: TestIssuer, token: str) -> SendResult:
    async with gateway_with_upstream(tmp_path, issuer) as (gateway, upstream):
        result = await FakeDevice(issuer).send(gateway.port, token=token)
        assert upstream.messages == []
    return result


async def test_crlf_in_device_id_is_535_over_smtp(tmp_path: Path, issuer: TestIssuer) -> None:
    token = issuer.token(device_id="phone-1\r\nBcc: mallory@example.test")
    result = await send_token(tmp_path, issuer, token)
    assert result.auth == (535, "5.7.8 Device token refused (invalid_claim)")
    assert result.mail is None


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize("value", [YEAR_9999, YEAR_1], ids=["9999", "year-1"])
async def test_dates_at_the_calendars_edges_are_535_over_smtp(
    tmp_path: Path, issuer: TestIssuer, claim: str, value: int
) -> None:
    token = issuer.sign(with_claim(issuer.claims(), claim, value))
    result = await send_token(tmp_path, issuer, token)
    assert result.auth == (535, "5.7.8 Device token refused (invalid_claim)")


async def test_b64_header_is_535_over_smtp(tmp_path: Path, issuer: TestIssuer) -> None:
    header = {"alg": "EdDSA", "kid": "k1", "crit": ["b64"], "b64": False}
    result = await send_token(tmp_path, issuer, signed(issuer, header, issuer.claims()))
    assert result.auth == (535, "5.7.8 Device token refused (malformed)")


def test_every_refusal_here_is_a_token_error() -> None:
    assert issubclass(InvalidClaim, TokenError)
    assert issubclass(MalformedToken, TokenError)
