"""An aiohttp application served from the gateway's own event loop, with a bounded stop.

aiohttp parses HTTP/1.1 (keep-alive, pipelining, chunked bodies, size limits) so no
listener of ours does. It runs here without signal handlers of its own (the server's
lifecycle owns SIGTERM/SIGHUP) and without aiohttp's access log (the adapters log what
matters through structlog). Stopping never waits on a client: idle keep-alive
connections are closed at once, a request still running gets ``shutdown_timeout``
seconds, and the whole stop is bounded by ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway.ops.logs import printable

log = structlog.get_logger("gateway.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Request limits for every listener: these endpoints take short headers and small forms.
MAX_LINE_BYTES = 8190  # request line and each header line (aiohttp's default)
KEEPALIVE_SECONDS = 75.0  # idle keep-alive connections are closed after this


@web.middleware
async def contain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An unexpected exception becomes a bare 500 and one structured log line: aiohttp
    would otherwise print a traceback through stdlib logging, and a client must never
    see an internal exception's text."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        log.error("http_handler_failed", path=request.path, error=type(exc).__name__, exc_info=exc)
        return web.Response(status=500, text="internal error\n")


class _ToStructlog(logging.Handler):
    """aiohttp reports a client's broken HTTP (a control character in a header, a bad
    request line) through stdlib logging, with a traceback quoting the raw bytes. Here it
    becomes one structured event, its text escaped and bounded."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        log.warning(
            "http_error",
            message=printable(record.getMessage(), 200),
            error=type(error).__name__ if error else None,
            detail=printable(str(error), 300) if error else None,
        )


def _server_logger() -> logging.Logger:
    logger = logging.getLogger("gateway.http.server")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(_ToStructlog())
    return logger


class HttpListener:
    """One aiohttp application on one TCP listener; start() returns the bound port."""

    def __init__(
        self,
        app: web.Application,
        *,
        shutdown_timeout: float = 1.0,
        stop_timeout: float = 3.0,
    ) -> None:
        self.app = app
        self.stop_timeout = stop_timeout
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=KEEPALIVE_SECONDS,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            logger=_server_logger(),
        )
        self._started = False

    async def start(self, host: str, port: int) -> int:
        await self._runner.setup()
        self._started = True
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound: int = self._runner.addresses[0][1]
        return bound

    async def start_unix(self, path: str) -> None:
        await self._runner.setup()
        self._started = True
        await web.UnixSite(self._runner, path).start()

    async def stop(self) -> None:
        """Close the listener and every connection; never longer than ``stop_timeout``."""
        if not self._started:
            return
        self._started = False
        try:
            await asyncio.wait_for(self._runner.cleanup(), timeout=self.stop_timeout)
        except TimeoutError:
            log.warning("http_stop_timeout", note="connections still open were abandoned")
