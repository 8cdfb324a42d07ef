"""Ending open IMAP/POP3 sessions through Dovecot's doveadm HTTP API (``doveadm kick``).

Dovecot decides at login only: an IMAP IDLE session opened before a ban keeps syncing
until it ends. After a reload that changes a device's sync decision the gateway asks
Dovecot to end the sessions of that device's user, and of the user's quarantine mailbox
(a retraction must move a quarantined phone back to its inbox). Dovecot kicks by user,
not by device: the user's other devices are logged out too and log in again at once,
each decided on its own token.

The API: ``POST /doveadm/v1`` with a JSON array of ``[command, parameters, tag]`` and
``Authorization: X-Dovecot-API <base64 of the key>``. Each command answers
``["doveadmResponse", ..., tag]`` or ``["error", {"exitCode": n}, tag]``; exit code 68
(EX_NOUSER) means nobody was logged in, which is what a kick wants too.

Every call has a timeout; a failure is retried with backoff, a bounded number of times,
and each outcome is logged and counted (``gateway_sync_kicks_total{result}``).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterable, Sequence

import aiohttp
import structlog

from gateway.config.settings import SyncSettings
from gateway.logins import quarantine_mailbox

log = structlog.get_logger("gateway.sync")

EX_NOUSER = 68  # doveadm: no user matched the mask (nobody to kick)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0


class KickFailed(Exception):
    """One attempt to kick failed; the message says how (no secrets, no response bodies)."""


def kick_commands(user: str) -> list[list[object]]:
    """One kick per mask (doveadm 2.3 takes one user mask per kick over HTTP)."""
    return [
        ["kick", {"mask": [mask]}, f"k{index}"]
        for index, mask in enumerate((user, quarantine_mailbox(user)))
    ]


def check_answer(answer: object, commands: int) -> None:
    """Raise KickFailed unless every command succeeded (or found nobody to kick)."""
    if not isinstance(answer, list) or len(answer) != commands:
        raise KickFailed("unexpected answer from the doveadm HTTP API")
    for item in answer:
        if not isinstance(item, list) or not item:
            raise KickFailed("unexpected answer from the doveadm HTTP API")
        if item[0] == "doveadmResponse":
            continue
        detail = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
        if item[0] == "error" and detail.get("exitCode") == EX_NOUSER:
            continue
        raise KickFailed(f"doveadm kick failed: {str(detail.get('exitCode', item[0]))[:40]}")


class DoveadmSessions:
    """A :class:`~gateway.logins.SessionEnder` on the doveadm HTTP API."""

    def __init__(
        self,
        settings: SyncSettings,
        on_result: Callable[[str], None],
        *,
        backoff_first: float = BACKOFF_FIRST,
    ) -> None:
        assert settings.doveadm_url is not None
        assert settings.doveadm_api_key is not None
        self.url = settings.doveadm_url
        self._authorization = "X-Dovecot-API " + base64.b64encode(
            settings.doveadm_api_key.encode()
        ).decode("ascii")
        self.timeout = settings.timeout
        self.attempts = settings.kick_attempts
        self.backoff_first = backoff_first
        self.on_result = on_result
        self._client: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Authorization": self._authorization},
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def end_sessions(self, users: Iterable[str]) -> None:
        """Kick each user (concurrently); never raises: failures are logged and counted."""
        await asyncio.gather(*(self._kick_with_retries(user) for user in sorted(set(users))))

    async def _kick_with_retries(self, user: str) -> None:
        delay = self.backoff_first
        for attempt in range(1, self.attempts + 1):
            try:
                await self.kick(user)
            except KickFailed as exc:
                last = attempt == self.attempts
                self.on_result("failed" if last else "retried")
                log.warning(
                    "sync_kick_failed" if last else "sync_kick_retried",
                    user=user,
                    attempt=attempt,
                    error=str(exc),
                )
                if last:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.on_result("ok")
            log.info("sync_sessions_ended", user=user, attempt=attempt)
            return

    async def kick(self, user: str) -> None:
        """One attempt: every session of ``user`` and of its quarantine mailbox."""
        commands: Sequence[list[object]] = kick_commands(user)
        try:
            async with self._session().post(self.url, json=commands) as response:
                if response.status != 200:
                    raise KickFailed(f"doveadm HTTP API answered {response.status}")
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise KickFailed(f"doveadm HTTP API unreachable: {type(exc).__name__}") from exc
        check_answer(answer, len(commands))
