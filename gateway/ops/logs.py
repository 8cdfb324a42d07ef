"""Structured logging: every line on the log stream (stderr) is one JSON object.

structlog renders the gateway's own events; the standard library's loggers (aiosmtpd's
``mail.log``, asyncio's "Task exception was never retrieved", aiohttp) are routed through
the same processors, so a client cannot put a raw CR, ESC or NUL into the stream to forge
or garble a line: text is escaped, and tracebacks are rendered into an ``exception`` field.
Tokens and secrets never reach a log line.
"""

from __future__ import annotations

import json as jsonlib
import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from types import TracebackType
from typing import Any

import structlog

_SECRET_KEYS = {"token", "password", "authorization", "auth", "secret"}
# A compact JWS (RFC 7515 s 7.1): three base64url segments joined by dots, whatever its
# header says (not only the usual ``eyJ``, which is '{"' encoded). The payload segment of
# any real token is long; a hostname's labels rarely are.
_JWS_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}\.(?:[A-Za-z0-9_-]{8,})?"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # '{"': short ones too
    r")(?![A-Za-z0-9_-])"
)
FIELD_LIMIT = 4096  # characters of one logged text field
MESSAGE_ID_LIMIT = 256
_HEADER_SCAN = 64 * 1024  # bytes of a message searched for its Message-ID
_MESSAGE_ID_RE = re.compile(rb"^message-id[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def printable(text: str | None, limit: int = 256) -> str | None:
    """Client-supplied text as it may appear in a log line or a metric: control and other
    unprintable characters escaped (``\\x1b``), at most ``limit`` characters."""
    if text is None:
        return None
    if text.isprintable() and len(text) <= limit:
        return text
    cleaned = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def message_id(content: bytes | bytearray) -> str | None:
    """The Message-ID of a message (RFC 5322 s 3.6.4) for the decision log: from the header
    section only, unfolded, escaped and bounded; None when it has none."""
    head = content[:_HEADER_SCAN]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    found = _MESSAGE_ID_RE.search(head if end < 0 else head[: end + 2])
    if found is None:
        return None
    value = " ".join(found.group(1).decode("utf-8", "replace").split())
    return printable(value, MESSAGE_ID_LIMIT) or None


_SHORTEST_JWS = 13  # "eyJ" + 4 + "." + 4 + ".": nothing shorter can match _JWS_RE


def _guard(value: Any) -> Any:
    """One field made safe to log: anything shaped like a compact JWS masked, then control
    characters escaped. The regex runs only on text with two dots that is long enough, so
    the usual fields (ids, addresses, replies) cost two cheap checks."""
    if isinstance(value, str):
        if len(value) >= _SHORTEST_JWS and value.count(".") >= 2:
            value = _JWS_RE.sub("<redacted-token>", value)
        return (
            value
            if len(value) <= FIELD_LIMIT and value.isprintable()
            else printable(value, FIELD_LIMIT)
        )
    if isinstance(value, list | tuple):
        return [_guard(item) for item in value] if value else value
    return value


def guard_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Secret-named fields dropped, token-shaped text masked and control characters escaped
    in every field, in one pass, so each line stays one line and holds no secret (the
    rendered ``exception`` keeps its newlines: JSON escapes them)."""
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "<redacted>"
        elif key == "exception" and isinstance(value, str):
            event[key] = _JWS_RE.sub("<redacted-token>", value)  # newlines kept: JSON escapes
        elif key != "exc_info":
            event[key] = _guard(value)
    return event


class StdlibToStructlog(logging.Handler):
    """Hands the standard library's log records to structlog (one writer, one format)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                fields["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, "library_log", **fields)
        except Exception:  # a logging failure must never take a session down
            self.handleError(record)


def _processors(json: bool) -> Iterable[Any]:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    exceptions = [structlog.processors.format_exc_info] if json else []
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *exceptions,  # rendered first, so that the guard masks tokens in the traceback too
        guard_fields,
        renderer,
    ]


def configure(level: str = "info", stream: Any = None, json: bool = True) -> None:
    """JSON lines on ``stream`` (default stderr), the standard library's loggers included."""
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=list(_processors(json)),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StdlibToStructlog) or handler.__class__ is logging.StreamHandler:
            root.removeHandler(handler)
    root.addHandler(StdlibToStructlog())
    # Libraries speak at WARNING and above unless debugging: aiosmtpd logs every command at
    # INFO, and watchfiles every change it sees.
    root.setLevel(logging.DEBUG if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    logging.getLogger("mail.log").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.WARNING
    )
    # aiohttp's access log is off (gateway/ops/http.py); its server logger reports only
    # what our error middleware cannot catch (a client's broken HTTP is logged at DEBUG).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def route_uncaught() -> None:
    """For ``gateway serve``: uncaught exceptions (main thread, other threads) and Python
    warnings are logged as JSON events too, not printed as raw text."""
    log = structlog.get_logger("gateway")

    def excepthook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        log.critical("uncaught_exception", error=kind.__name__, exc_info=(kind, value, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        log.error(
            "thread_exception",
            thread=args.thread.name if args.thread else None,
            error=args.exc_type.__name__,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    logging.captureWarnings(True)


def audit(action: str, **fields: Any) -> None:
    """An admin action taken outside the server (``gateway hold release``/``drop``), as
    one JSON line on stderr in the log format, whatever the logging set-up."""
    event: MutableMapping[str, Any] = {"event": action, "audit": True, **fields}
    for processor in (
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        guard_fields,
    ):
        event = processor(None, "info", event)
    sys.stderr.write(jsonlib.dumps(dict(event), default=repr) + "\n")
    sys.stderr.flush()
