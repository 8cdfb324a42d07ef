"""A byte-level SMTP client for tests that must send what no polite client would:
pipelined commands, bare line feeds, over-long lines, injected plaintext."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from types import TracebackType


class RawSmtp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, host: str = "127.0.0.1", source: str | None = None
    ) -> RawSmtp:
        """``source``: the client's own address (127.0.0.2, ...), to look like another host."""
        reader, writer = await asyncio.open_connection(
            host, port, limit=1 << 20, local_addr=None if source is None else (source, 0)
        )
        return cls(reader, writer)

    async def __aenter__(self) -> RawSmtp:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 5.0) -> tuple[int, str]:  # noqa: ASYNC109
        """One whole reply, multi-line ones joined with newlines; (0, "") at end of stream."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return (0, "\n".join(lines))
            text = line.decode("ascii", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return (int(text[:3]), "\n".join(lines))

    async def command(self, line: str | bytes) -> tuple[int, str]:
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """True when the server closes the connection (after any data still in flight)."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)  # read() returns at EOF only
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.writer.start_tls(context, server_hostname=server_hostname)
