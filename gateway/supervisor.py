"""``gateway serve --workers N``: one supervisor process, N worker processes.

Why: one Python process serves SMTP on one core; a phone fleet's TLS handshakes and
token checks want all of them. The supervisor

binds     each SMTP listener once per worker with SO_REUSEPORT (the kernel spreads new
          connections over the workers' sockets); a port it cannot bind is one line and
          exit 2, before any worker starts; port 0 gets one port for all
locks     the SQLite store (its StoreLock: a second gateway on the store is refused), checks
          it, and makes the claims a crashed run left stale; the workers share the file,
          and release claims are exclusive per device, so no message goes out twice
starts    the workers (``gateway serve`` with hidden ``--worker`` options), each with its
          sockets and one end of a socketpair: a worker writes one byte there when it
          listens; it reads end-of-file there when the supervisor is gone, and stops
forwards  SIGTERM/SIGINT (drain and stop) and SIGHUP (reload) to every worker
restarts  a worker that exits after it was listening, after a backoff (0.5 s doubling to
          30 s; back to 0.5 s after a minute up); gives up (stops all, exit 1) after
          MAX_START_FAILURES restarts in a row that never came up. A worker that fails
          at the first start stops everything: its exit code is the supervisor's (2 for a
          port or a setting, as without workers)

Worker 0 serves the admin and sync ports; its /metrics includes every worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.config.settings import Endpoint, Settings
from gateway.errors import ListenError
from gateway.hold.store import StoreLock, open_checked
from gateway.ops.workers import remove_run_dir

log = structlog.get_logger("gateway.supervisor")

BACKOFF_FIRST, BACKOFF_LONGEST = 0.5, 30.0  # seconds before a crashed worker restarts
STEADY = 60.0  # seconds up after which a worker's next crash starts the backoff again
MAX_START_FAILURES = 5  # restarts in a row that never listened: then give up
START_TIMEOUT = 60.0  # seconds a worker may take to listen


def bind_reuseport(endpoint: Endpoint, count: int, setting: str) -> list[socket.socket]:
    """``count`` listening sockets on one address, each with SO_REUSEPORT; port 0 picks
    one port for all. A failure is a ListenError naming the address and the setting."""
    sockets: list[socket.socket] = []
    port = endpoint.port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            endpoint.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {endpoint} ({setting}): {reason}") from exc
    return sockets


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None  # the newest, for forwarding signals


class Supervisor:
    """Runs N workers until SIGTERM; see the module docstring."""

    def __init__(self, settings: Settings, count: int, grace: float, log_level: str) -> None:
        self.settings = settings
        self.count = count
        self.grace = grace
        self.log_level = log_level
        self.run_id = uuid.uuid4().hex[:12]
        self.stopping = False
        self.exit_code = 0
        self._workers = [_Worker(k) for k in range(count)]
        self._stop = asyncio.Event()

    def run(self) -> int:
        """Bind, lock, run the workers until stopped; the exit code."""
        smtp = self.settings.smtp
        submission = bind_reuseport(smtp.listen, self.count, "[smtp] listen")
        implicit: list[socket.socket] = []
        lock: StoreLock | None = None
        run_dir: Path | None = None
        try:
            if (
                smtp.implicit_tls_listen is not None
                and smtp.tls_cert is not None
                and smtp.tls_key is not None
            ):
                implicit = bind_reuseport(
                    smtp.implicit_tls_listen, self.count, "[smtp] implicit_tls_listen"
                )
            if not self.settings.store.postgres:
                hold = self.settings.hold
                lock = StoreLock(hold.database)
                lock.acquire()
                open_checked(
                    hold.database, hold.busy_timeout, hold.min_free_bytes,
                    self.settings.store.claim_lease,
                ).close()  # fmt: skip
            run_dir = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
            return asyncio.run(self._supervise(submission, implicit, run_dir))
        finally:
            for sock in [*submission, *implicit]:
                sock.close()
            if run_dir is not None:
                remove_run_dir(run_dir)
            if lock is not None:
                lock.release()

    async def _supervise(
        self, submission: list[socket.socket], implicit: list[socket.socket], run_dir: Path
    ) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._request_stop)
        loop.add_signal_handler(signal.SIGINT, self._request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        address = submission[0].getsockname()
        log.info(
            "workers_starting",
            workers=self.count,
            submission=str(Endpoint(str(address[0]), int(address[1]))),
            pid=os.getpid(),
        )
        started = [asyncio.Event() for _ in self._workers]
        tasks = [
            asyncio.create_task(
                self._keep(
                    worker,
                    submission[worker.index],
                    implicit[worker.index] if implicit else None,
                    run_dir,
                    started[worker.index],
                )
            )
            for worker in self._workers
        ]
        waiting = asyncio.create_task(
            asyncio.wait([asyncio.create_task(e.wait()) for e in started])
        )
        stopped = asyncio.create_task(self._stop.wait())
        await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not self.stopping:
            log.info(
                "workers_listening",
                workers=self.count,
                submission=str(Endpoint(str(address[0]), int(address[1]))),
            )
        await asyncio.gather(*tasks)
        waiting.cancel()
        stopped.cancel()
        log.info("workers_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _request_stop(self) -> None:
        if not self.stopping:
            log.info("workers_stopping", workers=self.count)
        self.stopping = True
        self._stop.set()
        self._forward(signal.SIGTERM)

    def _forward(self, signum: int) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def _fail(self, code: int) -> None:
        """Stop everything with ``code`` (the first failure's code wins)."""
        if not self.stopping:
            self.exit_code = code
        self._request_stop()

    async def _keep(
        self,
        worker: _Worker,
        submission: socket.socket,
        implicit: socket.socket | None,
        run_dir: Path,
        started: asyncio.Event,
    ) -> None:
        """Start one worker and keep it running until the supervisor stops."""
        failed_starts = 0  # restarts in a row that never listened
        crashes = 0  # exits in a row, each within STEADY of its start: sets the backoff
        ever_listened = False
        while not self.stopping:
            began = time.monotonic()
            listened, code = await self._start_and_wait(
                worker, submission, implicit, run_dir, started
            )
            if self.stopping:
                return
            if not ever_listened and not listened:
                # The first start failed: a port, a setting, the store. Nothing serves.
                log.error("worker_failed_at_start", worker=worker.index, exit_code=code)
                self._fail(code if code > 0 else 1)
                return
            ever_listened = True
            if listened:
                failed_starts = 0
                crashes = 0 if time.monotonic() - began > STEADY else crashes + 1
            else:
                failed_starts, crashes = failed_starts + 1, crashes + 1
                if failed_starts >= MAX_START_FAILURES:
                    log.error("worker_keeps_failing", worker=worker.index, restarts=failed_starts)
                    self._fail(1)
                    return
            delay = min(BACKOFF_LONGEST, BACKOFF_FIRST * 2 ** max(0, crashes - 1))
            log.warning("worker_exited", worker=worker.index, exit_code=code, restart_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    async def _start_and_wait(
        self,
        worker: _Worker,
        submission: socket.socket,
        implicit: socket.socket | None,
        run_dir: Path,
        started: asyncio.Event,
    ) -> tuple[bool, int]:
        """Run one worker process to its end: whether it listened, and its exit code."""
        ours, theirs = socket.socketpair()
        fds = [submission.fileno(), theirs.fileno()]
        argv = [
            sys.executable, "-m", "gateway", "serve",
            "--config", str(self.settings.path),
            "--grace", str(self.grace),
            "--log-level", self.log_level,
            "--worker", f"{worker.index}/{self.count}",
            "--worker-run", f"{self.run_id}:{run_dir}",
            "--worker-fds", f"{theirs.fileno()},{submission.fileno()}"
            + (f",{implicit.fileno()}" if implicit is not None else ""),
        ]  # fmt: skip
        if implicit is not None:
            fds.append(implicit.fileno())
        try:
            process = await asyncio.create_subprocess_exec(*argv, pass_fds=fds)
        finally:
            theirs.close()
        worker.process = process
        if self.stopping:  # a stop came while it started
            process.send_signal(signal.SIGTERM)
        listened = False
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    listened = await reader.read(1) == b"r"
                if listened:
                    started.set()
            except TimeoutError:
                log.error("worker_start_timeout", worker=worker.index, seconds=START_TIMEOUT)
                process.kill()
            await process.wait()
            writer.close()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return listened, process.returncode if process.returncode is not None else 1


def worker_ready(channel: socket.socket) -> None:
    """A worker tells its supervisor that it listens."""
    channel.setblocking(True)
    channel.sendall(b"r")
    channel.setblocking(False)


async def supervisor_gone(channel: socket.socket) -> None:
    """Returns when the supervisor's end of ``channel`` closed (it exited, however)."""
    reader, writer = await asyncio.open_connection(sock=channel)
    try:
        while await reader.read(64):
            pass
    finally:
        writer.close()
