"""A PostgreSQL server for the hold-store tests: one per module, started on a loop of its
own (a thread), so that synchronous and asynchronous tests both reach it and can restart
it; each test gets a fresh database."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.testing.postgres import (
    PostgresUnavailable,
    TemporaryPostgres,
    server_binaries,
    temporary_postgres,
)


def have_postgres() -> bool:
    try:
        server_binaries()
    except PostgresUnavailable:
        return False
    return True


@dataclass
class PostgresServer:
    server: TemporaryPostgres
    loop: asyncio.AbstractEventLoop

    def call(self, work: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run ``work`` on the server's loop from synchronous code (bounded)."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    async def run(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Run ``work`` on the server's loop from another event loop (bounded)."""
        future = asyncio.run_coroutine_threadsafe(work, self.loop)
        async with asyncio.timeout(60):
            return await asyncio.wrap_future(future)

    def database(self) -> str:
        """A fresh, empty database on the server; its URL."""
        name = f"t{uuid.uuid4().hex[:12]}"
        self.call(self.server.psql(f"CREATE DATABASE {name}"))
        return self.server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if not have_postgres():
        pytest.skip("PostgreSQL not installed (.ci/run does)")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="postgres-loop", daemon=True)
    thread.start()
    context = temporary_postgres(fsync=False)
    try:
        server = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(120)
        try:
            yield PostgresServer(server, loop)
        finally:
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.database()
