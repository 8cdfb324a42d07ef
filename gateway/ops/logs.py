"""Structured logging (structlog, JSON lines). Tokens and secrets never reach a log line."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = {"token", "password", "authorization", "auth", "secret"}
_JWS_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


def printable(text: str | None, limit: int = 256) -> str | None:
    """Client-supplied text as it may appear in a log line or a metric: control and other
    unprintable characters escaped (``\\x1b``), at most ``limit`` characters."""
    if text is None:
        return None
    cleaned = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop secret-named fields and mask anything that looks like a compact JWS."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "<redacted>"
        elif isinstance(event[key], str) and "eyJ" in event[key]:
            event[key] = _JWS_RE.sub("<redacted-token>", event[key])
    return event


def configure(level: str = "info", stream: Any = None, json: bool = True) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    # aiosmtpd logs every command at INFO through stdlib logging: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    # aiohttp's access log is off (gateway/ops/http.py); its server logger reports only
    # what our error middleware cannot catch (a client's broken HTTP is logged at DEBUG).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
