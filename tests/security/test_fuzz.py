"""Short fuzz runs (hypothesis) in CI: the SASL parsers and the TOML readers either succeed
or fail with their own typed error, never with anything else. HYPOTHESIS_PROFILE=long
runs 2,000 examples each."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.config.settings import load_settings
from gateway.errors import PolicyLoadError, SettingsError
from gateway.policy.loader import load_policy_dir
from gateway.smtp.sasl import PARSERS, SaslSyntaxError

SASL_PIECES = st.sampled_from(
    [b"\x00", b"\x01", b"user=", b"auth=Bearer ", b"n,", b"a=", b",", b"=2C", b"=3D", b"=",
     b"alice@example.test", b"host=x", b"port=1", b"\xff", b"Bearer", b" ", b"\r\n"]
)  # fmt: skip
sasl_messages = st.one_of(
    st.binary(max_size=200), st.lists(SASL_PIECES | st.binary(max_size=5)).map(b"".join)
)


@pytest.mark.parametrize("mechanism", sorted(PARSERS))
@given(data=sasl_messages)
@example(data=b"")
@example(data=b"n,a=x=2,\x01auth=Bearer t\x01\x01")
@example(data=b"\x00\x00\x00")
def test_sasl_parsers_only_raise_their_own_error(mechanism: str, data: bytes) -> None:
    try:
        credentials = PARSERS[mechanism](data)
    except SaslSyntaxError:
        return
    assert credentials.mechanism == mechanism
    assert isinstance(credentials.token, str)
    assert credentials.token  # a parsed message always carries a token


TOML_PIECES = st.sampled_from(
    ["[[policy]]\n", 'id = "p"\n', 'action = "reject"\n', 'match.apps_any = ["a"]\n',
     "match.users = []\n", 'state = "retracted"\n', "enforce_at = 2020-01-01T00:00:00Z\n",
     'announce_at = "soon"\n', "[policy.match]\n", "x = [[[[1]]]]\n", '"""\n', "= = =\n",
     "99999999999999999999999\n", "\x00", "\ufeff", 'os_version = ">=1.0 <"\n',
     "platform = ['ios', 'ios']\n", "[[policy]]\nid = 'p'\n"]
)  # fmt: skip
policy_texts = st.one_of(st.text(max_size=300), st.lists(TOML_PIECES).map("".join))


@given(text=policy_texts)
def test_policy_loader_only_raises_its_own_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "fuzz.toml").write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            policies = load_policy_dir(Path(tmp))
        except PolicyLoadError as exc:
            problems = exc.problems
        else:
            assert all(p.id for p in policies.policies)
            return
    assert problems
    assert all(p.file.endswith("fuzz.toml") for p in problems)


SETTINGS_PIECES = st.sampled_from(
    ["[tokens]\n", 'audience = "a"\n', "[[tokens.issuers]]\n", 'issuer = "i"\n',
     'keys = ["k.json"]\n', "[smtp]\n", 'listen = "127.0.0.1:99999"\n', "max_recipients = -1\n",
     "[limits]\n", "command_call_limit = { NOOP = 0 }\n", "[upstream]\n", 'mode = "mx"\n',
     "[[upstream.smarthosts]]\n", "port = 0\n", "[groups]\n", "g = [1]\n", "[aliases]\n"]
)  # fmt: skip


@given(text=st.lists(SETTINGS_PIECES).map("".join), environ=st.dictionaries(
    st.sampled_from(["GATEWAY_SMTP__LISTEN", "GATEWAY_X__Y", "GATEWAY_LIMITS__MAX_ERRORS",
                     "GATEWAY_UPSTREAM__SMARTHOSTS__3__HOST", "GATEWAY___"]),
    st.text(max_size=20), max_size=3))  # fmt: skip
def test_settings_loader_only_raises_its_own_error(text: str, environ: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gateway.toml"
        path.write_text(text)
        try:
            load_settings(path, environ)
        except SettingsError as exc:
            problems = exc.problems
        else:
            return
    assert problems  # never an empty error


def test_base64_of_fuzzed_sasl_never_reaches_the_token_verifier_unparsed() -> None:
    """A bearer message without auth= is a syntax error, not an empty token."""
    with pytest.raises(SaslSyntaxError):
        PARSERS["XOAUTH2"](base64.b64decode(base64.b64encode(b"user=a\x01\x01")))
