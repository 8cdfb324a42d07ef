"""The fast path for <dot-atom@domain> must parse exactly as aiosmtpd's own parser does."""

from __future__ import annotations

from types import SimpleNamespace

from aiosmtpd.smtp import SMTP
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.smtp.session import parse_plain_path

ATOM_CHARS = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
atoms = st.text(ATOM_CHARS, min_size=1, max_size=8)
labels = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
plain = st.builds(
    lambda local, domain, rest: f"<{'.'.join(local)}@{'.'.join(domain)}>{rest}",
    st.lists(atoms, min_size=1, max_size=3),
    st.lists(labels, min_size=1, max_size=4),
    st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SMTPUTF8", "  "]),
)
noise = st.text(ATOM_CHARS + '<>@.":[] \\()', max_size=30)


def reference(arg: str) -> tuple[str | None, str | None]:
    result: tuple[str | None, str | None] = SMTP._getaddr(SimpleNamespace(local_part_limit=0), arg)
    return result


@given(st.one_of(plain, noise))
@example("<alice@example.test> SIZE=100")
@example('<"quoted local"@example.test>')
@example("<@relay.test:alice@example.test>")
@example("<alice@[192.0.2.1]>")
@example("<a..b@example.test>")
@example("<alice@-bad.test>")
def test_fast_path_agrees_with_aiosmtpd(arg: str) -> None:
    plain = parse_plain_path(arg)
    if plain is not None:
        assert plain == reference(arg)


@given(plain)
def test_plain_addresses_take_the_fast_path(arg: str) -> None:
    assert parse_plain_path(arg) is not None
