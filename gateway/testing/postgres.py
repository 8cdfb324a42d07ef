"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, a free
loopback port, started and always stopped by the test (as pytest-postgresql's
``postgresql_proc`` does).

PostgreSQL refuses to run as root, and CI runs as root: the server then runs as an
unprivileged user (``postgres`` where Debian's package created it, else ``nobody``),
with a directory of its own that only that user can enter.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine; the message says how to get them."""


def server_binaries() -> Path:
    """The directory holding initdb and postgres (Debian keeps them out of PATH)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent  # often a symlink into Debian's directory
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does)"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and no unprivileged user to run PostgreSQL as")


@dataclass
class TemporaryPostgres:
    """One server. ``url`` is a libpq connection URL for the superuser ``gateway``."""

    root: Path
    port: int
    binaries: Path
    user: pwd.struct_passwd | None
    fsync: bool = True
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://gateway@127.0.0.1:{self.port}/postgres"

    @property
    def _uid(self) -> int | None:
        return None if self.user is None else self.user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self.user is None else self.user.pw_gid

    @property
    def _groups(self) -> list[int] | None:
        return None if self.user is None else []

    def initdb(self) -> None:
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        result = subprocess.run(  # noqa: S603 - fixed argv, our own binaries
            [
                str(self.binaries / "initdb"), "-D", str(self.data), "-U", "gateway",
                "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions",
            ],
            capture_output=True, text=True, timeout=120, check=False, cwd=self.root,
            user=self._uid, group=self._gid, extra_groups=self._groups,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr.strip()[-2000:]}")

    async def start(self) -> None:
        """Start the server and wait until it accepts connections (bounded)."""
        self.process = await asyncio.create_subprocess_exec(
            str(self.binaries / "postgres"), "-D", str(self.data),
            "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root),
            "-c", f"fsync={'on' if self.fsync else 'off'}",
            "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, cwd=self.root,
            user=self._uid, group=self._gid, extra_groups=self._groups,
        )  # fmt: skip
        ready = str(self.binaries / "pg_isready")
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"postgres exited at start ({self.process.returncode})")
                probe = await asyncio.create_subprocess_exec(
                    ready, "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "gateway",
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                if await probe.wait() == 0:
                    return
                await asyncio.sleep(0.1)

    async def stop(self, *, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT), or SIGQUIT for a crash-like stop; then SIGKILL."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(3 if immediate else 2)  # SIGQUIT / SIGINT
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self, *, down_for: float = 0.0) -> None:
        """Stop the server, stay down ``down_for`` seconds, start it again on the same port."""
        await self.stop(immediate=True)
        await asyncio.sleep(down_for)
        await self.start()

    async def psql(self, sql: str) -> str:
        """Run SQL with the psql client; the output, unaligned and without headers."""
        client = shutil.which("psql") or str(self.binaries / "psql")
        process = await asyncio.create_subprocess_exec(
            client, self.url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 30)
        if process.returncode != 0:
            raise RuntimeError(f"psql failed: {err.decode(errors='replace').strip()}")
        return out.decode()


@asynccontextmanager
async def temporary_postgres(*, fsync: bool = True) -> AsyncIterator[TemporaryPostgres]:
    """A fresh server for the duration of the block; always stopped and removed."""
    binaries = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))  # 0700
    server = TemporaryPostgres(root, _free_port(), binaries, _run_as(), fsync=fsync)
    try:
        await asyncio.to_thread(server.initdb)
        await server.start()
        yield server
    finally:
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)
