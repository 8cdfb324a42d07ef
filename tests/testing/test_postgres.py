"""The test kit's throwaway PostgreSQL: a real server, started, restarted and removed."""

from __future__ import annotations

import asyncio

import pytest

from gateway.testing.postgres import PostgresUnavailable, server_binaries, temporary_postgres


def _have_postgres() -> bool:
    try:
        server_binaries()
    except PostgresUnavailable:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _have_postgres(), reason="PostgreSQL not installed (.ci/run does)"),
]


async def test_a_server_starts_keeps_data_across_a_restart_and_is_removed() -> None:
    async with temporary_postgres() as server:
        await server.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        assert (await server.psql("SELECT v FROM t")).strip() == "42"
        await server.restart(down_for=0.2)
        assert (await server.psql("SELECT v FROM t")).strip() == "42"
        root = server.root
        assert await server.psql("SHOW listen_addresses") == "127.0.0.1\n"
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.port)
