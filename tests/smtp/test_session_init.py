"""SubmissionSMTP sets itself up without aiosmtpd's per-connection introspection: the state
it ends with must be what aiosmtpd's own ``SMTP.__init__`` makes of the same arguments (so
that an aiosmtpd upgrade that adds or changes a field fails here, not in production)."""

from __future__ import annotations

import asyncio
import ssl
import types
import weakref
from collections.abc import Mapping
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP

from gateway.config.settings import LimitSettings, SmtpSettings
from gateway.smtp import session as session_module
from gateway.smtp.session import SubmissionSMTP


class _AiosmtpdInit(SubmissionSMTP):
    """The reference: the same session class, set up by aiosmtpd's own __init__."""

    def _init_protocol(
        self,
        settings: SmtpSettings,
        tls_context: ssl.SSLContext | None,
        command_call_limit: int | dict[str, int],
    ) -> None:
        SMTP.__init__(
            self,
            session_module._HOOKS,
            data_size_limit=settings.max_message_size,
            hostname=settings.hostname,
            ident="Compliance Gateway ESMTP",
            tls_context=tls_context,
            timeout=settings.idle_timeout,
            auth_required=True,
            auth_require_tls=True,
            command_call_limit=command_call_limit,
            loop=asyncio.get_running_loop(),
        )


def _comparable(value: Any, owner: object) -> Any:
    """A value with the instance it belongs to factored out (bound methods, the stream
    reader, futures), so that two sessions' states can be compared."""
    if isinstance(value, types.MethodType):
        return ("method", value.__func__, value.__self__ is owner or value.__self__)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # aiosmtpd's NamedTuples
        return (type(value), tuple(_comparable(v, owner) for v in value))
    if isinstance(value, Mapping):  # aiosmtpd's dicts; the session binds on lookup
        return {key: _comparable(v, owner) for key, v in value.items()}
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit)  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future | weakref.ref | asyncio.AbstractEventLoop):
        return type(value)
    return value


@pytest.fixture(scope="module")
def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("gateway.test").configure_cert(context)
    return context


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit-tls"])
@pytest.mark.parametrize(
    "call_limit", [1000, {"*": 50, "NOOP": 5}, {"NOOP": 5}], ids=["one", "table", "no-default"]
)
async def test_the_session_is_set_up_as_aiosmtpd_would(
    tls_context: ssl.SSLContext, implicit_tls: bool, call_limit: int | dict[str, int]
) -> None:
    settings = SmtpSettings(hostname="mx.example.test", idle_timeout=42)
    limits = LimitSettings(command_call_limit=call_limit)
    ours = SubmissionSMTP(
        None,  # type: ignore[arg-type]  # not used while setting up
        settings,
        tls_context=tls_context,
        implicit_tls=implicit_tls,
        limits=limits,
    )
    reference = _AiosmtpdInit(
        None,  # type: ignore[arg-type]
        settings,
        tls_context=tls_context,
        implicit_tls=implicit_tls,
        limits=limits,
    )
    assert set(vars(ours)) == set(vars(reference))
    for name, value in vars(reference).items():
        assert _comparable(getattr(ours, name), ours) == _comparable(value, reference), name
    # The tables aiosmtpd dispatches through, spelled out once.
    assert set(ours._smtp_methods) >= {"EHLO", "HELO", "AUTH", "MAIL", "RCPT", "DATA", "STARTTLS"}
    assert set(ours._handle_hooks) == {"MAIL", "RCPT", "RSET", "exception"}
    assert {"PLAIN", "LOGIN"} <= set(ours._auth_methods)
