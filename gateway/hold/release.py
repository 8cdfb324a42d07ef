"""Release of held mail: re-evaluate, relay what is now allowed, in arrival order.

When: after every policy reload that changed something, when a device authenticates
with a newer token, when an admin requested it (``gateway hold release``), and on a
periodic tick (retries with backoff, expiry).

Guarantee: at least once. A row is deleted only after the upstream said 250, so a crash
between the two sends the message again after restart (a duplicate), never loses it. A
device's messages go in arrival order: the first one that cannot be relayed stops that
device's run and is retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog

from gateway.domain import Action, Clock, DeviceClaims
from gateway.hold.dsn import delivery_status_notification
from gateway.hold.store import AsyncHoldStore, HeldMessage
from gateway.policy.engine import CompiledPolicySet, decide
from gateway.policy.store import PolicyStore
from gateway.replies import Reply
from gateway.upstream.relay import Relay

log = structlog.get_logger("gateway.release")

RELEASABLE = (Action.ALLOW, Action.WARN)
BACKOFF_BASE = 5.0
BACKOFF_MAX = 600.0


PAGE_SIZE = 500  # held messages read per query
DELETE_BATCH = 64  # released rows deleted per transaction (one fsync)


@dataclass
class ReleaseReport:
    released: list[str] = field(default_factory=list)
    still_held: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (device, first hold_id)


class _Deletions:
    """Rows whose message the upstream accepted, deleted in batches: one commit (and fsync)
    per batch instead of per message. Deletes are shielded from cancellation, because a
    row kept after its message left would be sent again after a restart. A crash before
    the batch commits can send up to DELETE_BATCH messages, or a quarter second's worth,
    twice (at least once, never lost).
    """

    def __init__(self, store: AsyncHoldStore) -> None:
        self.store = store
        self.pending: list[str] = []
        self._last_flush = time.monotonic()

    async def add(self, hold_id: str) -> None:
        self.pending.append(hold_id)
        # Batch by count, and by age too, so that a crash re-sends little even when
        # releases trickle out slowly.
        if len(self.pending) >= DELETE_BATCH or time.monotonic() - self._last_flush > 0.25:
            await self.flush()

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        self._last_flush = time.monotonic()
        if batch:
            await asyncio.shield(self.store.remove(batch))


# Starts a named background task that the caller keeps referenced and logs if it fails.
Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]


class Releaser:
    def __init__(
        self,
        store: AsyncHoldStore,
        relay: Relay,
        policies: PolicyStore,
        clock: Clock,
        hostname: str,
        expire_after: timedelta,
        spawn: Spawn,
        on_released: Callable[[HeldMessage], None] | None = None,
        parallel: int = 4,
    ) -> None:
        self.store = store
        self.relay = relay
        self.policies = policies
        self.clock = clock
        self.hostname = hostname
        self.expire_after = expire_after
        self._spawn = spawn
        self._lock = asyncio.Lock()
        self.devices_with_mail: set[str] = set()
        self._device_releases: dict[str, asyncio.Task[Any]] = {}
        self.on_released = on_released
        self.parallel = parallel  # devices released at once (one upstream connection each)

    async def start(self) -> None:
        self.devices_with_mail = await self.store.device_ids()

    def note_held(self, device_id: str) -> None:
        self.devices_with_mail.add(device_id)

    async def idle(self) -> None:
        """Wait for a release pass in progress to finish."""
        async with self._lock:
            return

    def device_authenticated(self, claims: DeviceClaims) -> None:
        """A device with held mail presented a token, perhaps a newer one (the app was
        removed): re-evaluate its held mail now, with these claims, in the background."""
        device_id = claims.device.id
        if device_id not in self.devices_with_mail:
            return
        task = self._spawn(self.run(device_id=device_id, newer_claims=claims), "release-device")
        self._device_releases[device_id] = task
        task.add_done_callback(lambda _: self._device_releases.pop(device_id, None))

    async def released_first(self, device_id: str, max_wait: float) -> None:
        """New mail from a device waits (up to ``max_wait`` seconds) for the release of its held
        mail that its authentication started, so that order is kept."""
        task = self._device_releases.get(device_id)
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=max_wait)
        except Exception:  # the release goes on in the background; the new mail proceeds
            log.warning("release_wait_abandoned", device_id=device_id)

    async def run(
        self, *, device_id: str | None = None, newer_claims: DeviceClaims | None = None
    ) -> ReleaseReport:
        """One pass; serialised, so a message is never relayed by two passes at once."""
        async with self._lock:
            return await self._run(device_id, newer_claims)

    async def _run(self, device_id: str | None, newer_claims: DeviceClaims | None) -> ReleaseReport:
        """Page through due mail in arrival order; each page's devices are released as
        parallel lanes (up to ``parallel`` upstream connections), each lane in order."""
        report = ReleaseReport()
        now = self.clock()
        compiled = self.policies.current  # one policy set for the whole pass
        deletions = _Deletions(self.store)
        legs = asyncio.Semaphore(self.parallel)
        after = 0
        while True:
            page = await self.store.due(now, device_id, PAGE_SIZE, after)
            if not page:
                break
            after = page[-1].seq
            blocked_devices = {device for device, _ in report.blocked}
            lanes: dict[str, list[HeldMessage]] = {}
            for held in page:
                if held.device_id in blocked_devices:
                    report.still_held += 1  # behind a message of its device that stays
                else:
                    lanes.setdefault(held.device_id, []).append(held)
            try:
                await asyncio.gather(
                    *(
                        self._release_lane(
                            lane, compiled, newer_claims, now, legs, deletions, report
                        )
                        for lane in lanes.values()
                    )
                )
            finally:
                await deletions.flush()
            if len(page) < PAGE_SIZE:
                break
        if device_id is None:
            self.devices_with_mail = await self.store.device_ids()
        elif not await self.store.due(datetime.max.replace(tzinfo=now.tzinfo), device_id, limit=1):
            self.devices_with_mail.discard(device_id)
        return report

    async def _release_lane(
        self,
        lane: list[HeldMessage],
        compiled: CompiledPolicySet,
        newer_claims: DeviceClaims | None,
        now: datetime,
        legs: asyncio.Semaphore,
        deletions: _Deletions,
        report: ReleaseReport,
    ) -> None:
        """One device's due messages, in order; the first that stays held or fails stops
        the lane, so that later mail never overtakes it."""
        async with legs:
            for index, held in enumerate(lane):
                claims = (
                    newer_claims
                    if newer_claims is not None and newer_claims.device.id == held.device_id
                    else held.claims
                )
                if (
                    not held.release_requested
                    and decide(compiled, claims, now).action not in RELEASABLE
                ):
                    report.still_held += len(lane) - index
                    report.blocked.append((held.device_id, held.hold_id))
                    return
                reply = await self._relay(held, held.sender, held.recipients, held.content or b"")
                if not reply.is_success:
                    delay = min(BACKOFF_MAX, BACKOFF_BASE * 2**held.attempts)
                    await self.store.postpone(held.hold_id, now.timestamp() + delay, reply.line())
                    report.failed.append((held.hold_id, reply.line()))
                    report.blocked.append((held.device_id, held.hold_id))
                    log.warning(
                        "release_failed", hold_id=held.hold_id, reply=reply.line(), retry_in=delay
                    )
                    return
                await deletions.add(held.hold_id)
                report.released.append(held.hold_id)
                if self.on_released is not None:
                    self.on_released(held)
                log.info(
                    "released",
                    hold_id=held.hold_id,
                    device_id=held.device_id,
                    user=held.user,
                    requested=held.release_requested,
                    upstream_reply=reply.line(),
                )

    async def _relay(
        self, held: HeldMessage, sender: str, recipients: Iterable[str], content: bytes
    ) -> Reply:
        """The message's outcome upstream in one reply (see ``Delivery.reply``)."""
        delivery = await self.relay.deliver(sender, tuple(recipients), content)
        return delivery.reply

    async def expire(self) -> ReleaseReport:
        """Bounce (RFC 3464) and delete what has been held longer than allowed."""
        report = ReleaseReport()
        async with self._lock:
            now = self.clock()
            for held in await self.store.expired(now - self.expire_after):
                if held.sender:
                    bounce = delivery_status_notification(
                        held, self.hostname, now, self.expire_after
                    )
                    reply = (await self.relay.deliver("", [held.sender], bounce)).reply
                    if not reply.is_success and reply.is_temporary:
                        continue  # try the bounce again on the next tick
                await self.store.remove([held.hold_id])
                report.expired.append(held.hold_id)
                log.info(
                    "expired", hold_id=held.hold_id, sender=held.sender, bounced=bool(held.sender)
                )
        return report
