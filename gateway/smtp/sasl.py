"""Pure parsers for the three SASL mechanisms that carry a device token.

PLAIN (RFC 4616): ``[authzid] NUL authcid NUL passwd``; the token is the password.
XOAUTH2 (Google/Microsoft): ``user=U ^A auth=Bearer T ^A ^A``.
OAUTHBEARER (RFC 7628 s 3.1): ``gs2-header ^A *(key=value ^A) ^A`` with ``auth=Bearer T``.

No I/O here, so they can be fuzzed directly.
"""

from __future__ import annotations

import json
import re

from gateway.domain import Credentials

MECHANISMS = ("OAUTHBEARER", "PLAIN", "XOAUTH2")
_BEARER_RE = re.compile(r"^[Bb]earer +([A-Za-z0-9\-._~+/]+=*)$")  # RFC 6750 s 2.1 b64token


class SaslSyntaxError(ValueError):
    """The client's SASL message does not follow its mechanism's grammar."""


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslSyntaxError("SASL message is not UTF-8") from exc


def parse_plain(data: bytes) -> Credentials:
    parts = data.split(b"\x00")
    if len(parts) != 3:
        raise SaslSyntaxError("PLAIN needs authzid NUL authcid NUL password")
    authzid, authcid, password = (_text(p) for p in parts)
    if not authcid or not password:
        raise SaslSyntaxError("PLAIN needs a user name and a password")
    if authzid and authzid != authcid:
        raise SaslSyntaxError("PLAIN: acting for another user (authzid) is not supported")
    return Credentials("PLAIN", authcid, password)


def _bearer(value: str) -> str:
    found = _BEARER_RE.match(value)
    if not found:
        raise SaslSyntaxError("auth= must be 'Bearer <token>'")
    return found.group(1)


def parse_xoauth2(data: bytes) -> Credentials:
    text = _text(data)
    if not text.endswith("\x01\x01"):
        raise SaslSyntaxError("XOAUTH2 message must end with ^A^A")
    fields: dict[str, str] = {}
    for item in text[:-2].split("\x01"):
        key, eq, value = item.partition("=")
        if not eq or key in fields:
            raise SaslSyntaxError("XOAUTH2 message has a malformed or repeated field")
        fields[key] = value
    if set(fields) != {"user", "auth"} or not fields["user"]:
        raise SaslSyntaxError("XOAUTH2 needs exactly user= and auth=")
    return Credentials("XOAUTH2", fields["user"], _bearer(fields["auth"]))


def _gs2_authzid(header: str) -> str | None:
    # gs2-header = gs2-cbind-flag "," [ "a=" saslname ] ","   (RFC 5801 s 4)
    flag, sep, rest = header.partition(",")
    if not sep or (flag not in ("n", "y") and not flag.startswith("p=")):
        raise SaslSyntaxError("OAUTHBEARER gs2 header must start with n, or y,")
    if flag.startswith("p="):
        raise SaslSyntaxError("OAUTHBEARER channel binding is not supported")
    authzid, sep, tail = rest.partition(",")
    if not sep or tail:
        raise SaslSyntaxError("OAUTHBEARER gs2 header is malformed")
    if not authzid:
        return None
    if not authzid.startswith("a="):
        raise SaslSyntaxError("OAUTHBEARER gs2 header is malformed")
    name = authzid[2:]
    # saslname escapes: "=2C" is ",", "=3D" is "="; any other "=" is an error.
    if re.search(r"=(?!2C|3D)", name):
        raise SaslSyntaxError("OAUTHBEARER authzid has a bad escape")
    return name.replace("=2C", ",").replace("=3D", "=") or None


def parse_oauthbearer(data: bytes) -> Credentials:
    text = _text(data)
    header, sep, rest = text.partition("\x01")
    if not sep or (not rest.endswith("\x01\x01") and rest != "\x01"):
        raise SaslSyntaxError("OAUTHBEARER message must be gs2-header ^A key=value ^A ... ^A")
    user = _gs2_authzid(header)
    fields: dict[str, str] = {}
    body = rest[:-2] if rest.endswith("\x01\x01") else ""
    for item in body.split("\x01") if body else []:
        key, eq, value = item.partition("=")
        if not eq or not key.isalpha() or key in fields:
            raise SaslSyntaxError("OAUTHBEARER has a malformed or repeated key=value pair")
        fields[key] = value
    if "auth" not in fields:
        raise SaslSyntaxError("OAUTHBEARER needs auth=Bearer <token>")
    return Credentials("OAUTHBEARER", user, _bearer(fields["auth"]))


PARSERS = {"PLAIN": parse_plain, "XOAUTH2": parse_xoauth2, "OAUTHBEARER": parse_oauthbearer}


def error_challenge(mechanism: str, scope: str) -> bytes | None:
    """The JSON error a bearer mechanism sends (as a 334 challenge) before 535.

    RFC 7628 s 3.2.2 for OAUTHBEARER; Google's documented form for XOAUTH2.
    PLAIN has none.
    """
    if mechanism == "OAUTHBEARER":
        return json.dumps({"status": "invalid_token", "schemes": "bearer", "scope": scope}).encode()
    if mechanism == "XOAUTH2":
        return json.dumps({"status": "401", "schemes": "bearer", "scope": scope}).encode()
    return None


def plain_response(user: str, token: str) -> bytes:
    return b"\x00" + user.encode() + b"\x00" + token.encode()


def xoauth2_response(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer_response(user: str | None, token: str, host: str = "", port: int = 0) -> bytes:
    authzid = "a=" + user.replace("=", "=3D").replace(",", "=2C") if user else ""
    pairs = ""
    if host:
        pairs += f"host={host}\x01"
    if port:
        pairs += f"port={port}\x01"
    return f"n,{authzid},\x01{pairs}auth=Bearer {token}\x01\x01".encode()
