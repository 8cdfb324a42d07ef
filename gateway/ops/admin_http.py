"""The admin HTTP port, served from the event loop: /livez, /readyz, /metrics.

HTTP/1.1 parsing is h11's (the state machine under httpx and uvicorn), not ours. One
request per connection is plenty for probes and scrapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h11
import structlog

log = structlog.get_logger("gateway.admin")
MAX_REQUEST_BYTES = 16 * 1024

Route = Callable[[], tuple[int, str, bytes]]  # -> (status, content type, body)


class AdminServer:
    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            request = await asyncio.wait_for(self._read_request(reader, connection), timeout=10)
            if request is None:
                return
            status, content_type, body = self._respond(request)
            headers = [
                ("content-type", content_type),
                ("content-length", str(len(body))),
                ("connection", "close"),
            ]
            writer.write(connection.send(h11.Response(status_code=status, headers=headers)) or b"")
            if request.method != b"HEAD":
                writer.write(connection.send(h11.Data(data=body)) or b"")
            writer.write(connection.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_request(
        reader: asyncio.StreamReader, connection: h11.Connection
    ) -> h11.Request | None:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(4096)
                connection.receive_data(data)
                if not data:
                    return None
                continue
            if isinstance(event, h11.Request):
                return event
            return None

    def _respond(self, request: h11.Request) -> tuple[int, str, bytes]:
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        route = self.routes.get(path)
        if route is None:
            return 404, "text/plain", b"not found\n"
        return route()
