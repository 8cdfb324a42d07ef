"""A fault-injecting TCP proxy for tests: put it between the gateway and its upstream.

Faults apply to new connections (refuse) and to the gateway-to-upstream direction (cut
after a number of bytes, delay each chunk). The upstream's replies are forwarded as they
come, so a cut loses a reply only when it was in flight: the real-world window in which
a message was delivered but its sender never heard so (RFC 1047).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class ProxyFaults:
    refuse: bool = False  # close new connections at once
    cut_after: int | None = None  # bytes of gateway->upstream traffic per connection
    delay: float = 0.0  # seconds before forwarding each gateway->upstream chunk


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = ProxyFaults()
        self.port = 0
        self.cuts = 0
        self.refused = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        # Connections first: from Python 3.12.1, Server.wait_closed() waits for them too.
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:  # stop() ends it, closing both sides
            self._tasks.add(handler)
            handler.add_done_callback(self._tasks.discard)
        faults = ProxyFaults(self.faults.refuse, self.faults.cut_after, self.faults.delay)
        if faults.refuse:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        reply_pump = asyncio.create_task(self._pump(up_reader, writer, None, 0.0))
        self._tasks.add(reply_pump)
        reply_pump.add_done_callback(self._tasks.discard)
        try:
            await self._pump(reader, up_writer, faults.cut_after, faults.delay)
        finally:
            reply_pump.cancel()
            for stream in (writer, up_writer):
                stream.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cut_after: int | None,
        delay: float,
    ) -> None:
        sent = 0
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                if cut_after is not None and sent + len(chunk) > cut_after:
                    writer.write(chunk[: cut_after - sent])
                    self.cuts += 1
                    return
                if delay:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
