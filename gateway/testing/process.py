"""The servers the test kit starts as child processes (Dovecot, nginx, HAProxy): each in
its own process group, stopped by a signal of its choosing and then SIGKILL to the group,
so that nothing it forked outlives the test."""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import suppress

STOP_TIMEOUT = 10.0  # seconds a server gets to stop by itself before SIGKILL


async def stop_group(
    process: asyncio.subprocess.Process | None, first: signal.Signals = signal.SIGTERM
) -> None:
    """``first`` to the master, a wait of at most STOP_TIMEOUT, then SIGKILL to its group."""
    if process is None:
        return
    if process.returncode is None:
        process.send_signal(first)
        with suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.returncode is None:
        await process.wait()


async def failure_text(process: asyncio.subprocess.Process | None, log: str) -> str:
    """Why a server did not start: its stderr once it has exited, then its log (the end)."""
    stderr = b""
    if process is not None and process.stderr is not None and process.returncode is not None:
        stderr = await process.stderr.read()
    return (stderr.decode(errors="replace") + log)[-3000:]
