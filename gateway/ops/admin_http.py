"""The admin HTTP port, served from the event loop: /livez, /readyz, /metrics, /status,
and the admin API mounted under /api/v1 (gateway/admin).

HTTP is aiohttp's (gateway/ops/http.py), not ours. Each route is a plain function that
returns (status, content type, body): probes and scrapes need nothing more.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.ops.http import HttpListener, contain_errors

Answer = tuple[int, str, bytes]  # (status, content type, body)
# A plain function, or a coroutine function for a route that waits (the merged /metrics
# of several workers asks each of them).
Route = Callable[[], Answer | Awaitable[Answer]]


def _handler(route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        answer = route()
        if inspect.isawaitable(answer):
            answer = await answer
        status, content_type, body = answer
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    return handle


def admin_app(routes: dict[str, Route]) -> web.Application:
    """GET (and HEAD) on each route; aiohttp answers 404 and 405 for the rest."""
    app = web.Application(middlewares=[contain_errors], client_max_size=16 * 1024)
    for path, route in routes.items():
        app.router.add_get(path, _handler(route))
    return app


class AdminServer:
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._listener = HttpListener(admin_app(routes))

    def mount(self, prefix: str, app: web.Application) -> None:
        """Serve ``app`` under ``prefix`` (before start): its own middlewares (the admin
        API's authentication) apply to its routes only, so the probes stay open."""
        self._listener.app.add_subapp(prefix, app)

    async def start(self, host: str, port: int) -> int:
        return await self._listener.start(host, port)

    async def start_unix(self, path: str) -> None:
        """Listen on a unix socket instead (a worker's /metrics, for its supervisor's
        worker 0 to merge)."""
        await self._listener.start_unix(path)

    async def stop(self) -> None:
        await self._listener.stop()
