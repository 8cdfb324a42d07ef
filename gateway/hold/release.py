"""Release of held mail: re-evaluate, relay what is now allowed, in arrival order.

When: after every policy reload that changed something, when a device authenticates
with a newer token, when an admin requested it (``gateway hold release``), and on a
periodic tick (retries with backoff, expiry).

Memory: a pass decides from metadata (ids, devices, claims, sizes: ``HoldStore.due``,
paged) and loads bodies only for messages it actually sends: per upstream connection, the
next few of one device's messages in one query, at most READ_BATCH_BYTES of them (or one
larger message) at a time; expiry pages too and reads only a message's headers for its
bounce. So memory does not grow with the number or size of held messages
(bench/held_rss.py), and a release pays one store round trip per batch rather than per
message (bench/stores.py).

Guarantee: at least once, never lost. Before a device's messages go upstream they are
claimed in the store (one write for all the lanes of a page, not one per device); if
that write fails nothing is sent. The claim is exclusive per device (on PostgreSQL shared
by several gateways, and on SQLite shared by the workers of one ``gateway serve --workers
N``): a lane another gateway or worker has claimed is skipped, so no two of them relay the
same message. After the upstream answered, the outcome is recorded per recipient (RFC 5321
s 6.1: the client heard 250 at hold time, so each recipient is delivered, retried or
bounced):

2xx    done: the row is deleted (batched: one commit per DELETE_BATCH or quarter second)
4xx    kept for those recipients, retried with exponential backoff
5xx    bounced at once: one RFC 3464 DSN per message naming each failed recipient and
       the upstream's reply, stored as a held message to the sender in the same
       transaction, and released like any other

When recording an outcome fails (disk full, a lock held past the busy timeout), release
stops: the outcomes are kept in memory, never relayed again by this process, and written
before anything else once a probe write succeeds; ``fault`` says why (``/readyz`` shows
it). So duplicates come only from a crash: at most the messages in flight then, plus the
last unflushed batch of deletions. A device's messages go in arrival order: the first one
that stays held or is retried stops that device's run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from gateway.domain import Action, Clock, Decision, DeviceClaims
from gateway.errors import HoldStoreError
from gateway.hold.dsn import FailedRecipient, expiry_report, refusal_report
from gateway.hold.first_seen import FirstSeenTimes
from gateway.hold.store import AsyncStore, HeldMessage, LaneClaim, Settlement
from gateway.policy.engine import CompiledPolicySet, decide
from gateway.policy.store import PolicyStore
from gateway.replies import Reply
from gateway.upstream.relay import Relay

log = structlog.get_logger("gateway.release")

RELEASABLE = (Action.ALLOW, Action.WARN)

PAGE_SIZE = 500  # held messages (metadata only) read per query
EXPIRY_PAGE_SIZE = 100
DELETE_BATCH = 64  # released rows deleted per transaction (one fsync)
READ_BATCH_BYTES = 1 << 20  # a lane's bodies read per query, at most (or one larger body)
READ_BATCH_MESSAGES = 64  # ... and at most this many of them

T = TypeVar("T")


@dataclass
class ReleaseReport:
    released: list[str] = field(default_factory=list)
    still_held: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    bounced: list[str] = field(default_factory=list)  # messages with a recipient refused for good
    expired: list[str] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)  # (device, first hold_id)
    claimed_elsewhere: int = 0  # due, but claimed by another gateway on a shared store


@dataclass(frozen=True)
class Outcome:
    """Each recipient's fate in one release attempt."""

    delivered: tuple[str, ...]
    retry: tuple[tuple[str, Reply], ...]
    failed: tuple[tuple[str, Reply], ...]

    @classmethod
    def of(cls, recipients: tuple[str, ...], per_recipient: dict[str, Reply]) -> Outcome:
        delivered, retry, failed = [], [], []
        for recipient in recipients:
            reply = per_recipient[recipient]
            if reply.is_success:
                delivered.append(recipient)
            elif reply.code >= 500:
                failed.append((recipient, reply))
            else:  # 4xx, and anything unexpected: keep it and try again
                retry.append((recipient, reply))
        return cls(tuple(delivered), tuple(retry), tuple(failed))


def _bounded_runs(items: Sequence[T], weight: Callable[[T], tuple[int, int]]) -> Iterator[list[T]]:
    """``items`` cut into consecutive runs read in one query: at most READ_BATCH_BYTES and
    READ_BATCH_MESSAGES each (``weight``: an item's bytes and messages), at least one item."""
    run: list[T] = []
    size = count = 0
    for item in items:
        item_size, item_count = weight(item)
        if run and (
            size + item_size > READ_BATCH_BYTES or count + item_count > READ_BATCH_MESSAGES
        ):
            yield run
            run, size, count = [], 0, 0
        run.append(item)
        size += item_size
        count += item_count
    if run:
        yield run


def _read_batches(lane: Sequence[HeldMessage]) -> Iterator[list[HeldMessage]]:
    """A lane cut into runs whose bodies are read together."""
    return _bounded_runs(lane, lambda held: (held.size, 1))


@dataclass
class _Body:
    """A held message's bytes on their way upstream (None: dropped by an admin meanwhile).
    The relay takes them out, so that a lane holds no body it has sent while it reads
    its next batch."""

    data: bytes | None


class _PageBodies:
    """The bodies of a page's claimed lanes, read for the lanes as they run.

    A lane's messages are read a batch at a time (``_read_batches``), each batch only when
    the lane gets to it. Most lanes are one device's one or two messages, so a query per
    lane would be a round trip per message: the first batches of consecutive lanes are
    read together instead, up to READ_BATCH_BYTES, when the first lane of such a group
    starts (lanes start in the order they were claimed). Memory: a group not yet handed
    out, plus each running lane's batch. A body read ahead is sent even if another process
    drops its message meanwhile (docs/admin.md: the window is one batch)."""

    def __init__(
        self,
        read: Callable[[list[str]], Coroutine[Any, Any, dict[str, bytes]]],
        lanes: list[list[HeldMessage]],
    ) -> None:
        self._read = read
        self._lanes = lanes
        self._first = [next(_read_batches(lane)) for lane in lanes]
        # Lane indexes whose first batches are read at once, and each lane's group.
        self._groups = list(
            _bounded_runs(
                range(len(lanes)),
                lambda lane: (sum(held.size for held in self._first[lane]), len(self._first[lane])),
            )
        )
        self._group_of = [group for group, lanes_in in enumerate(self._groups) for _ in lanes_in]
        self._bodies: dict[str, bytes] = {}
        self._groups_read: set[int] = set()
        self._reading = asyncio.Lock()

    async def _first_batch(self, index: int) -> dict[str, bytes]:
        group = self._group_of[index]
        async with self._reading:
            if group not in self._groups_read:
                self._groups_read.add(group)
                ids = [held.hold_id for lane in self._groups[group] for held in self._first[lane]]
                self._bodies.update(await self._read(ids))
        return {
            held.hold_id: body
            for held in self._first[index]
            if (body := self._bodies.pop(held.hold_id, None)) is not None
        }

    async def of_lane(self, index: int) -> AsyncGenerator[tuple[HeldMessage, _Body], None]:
        """A lane's messages with their bodies."""
        first = self._first[index]
        bodies = await self._first_batch(index)
        for held in first:
            yield held, _Body(bodies.pop(held.hold_id, None))
        for batch in _read_batches(self._lanes[index][len(first) :]):
            bodies = await self._read([held.hold_id for held in batch])
            for held in batch:
                yield held, _Body(bodies.pop(held.hold_id, None))


class StoreFault(Exception):
    """Recording a release's outcome failed; release stops until the store takes writes."""


# Starts a named background task that the caller keeps referenced and logs if it fails.
Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]


class Releaser:
    def __init__(
        self,
        store: AsyncStore,
        relay: Relay,
        policies: PolicyStore,
        clock: Clock,
        hostname: str,
        expire_after: timedelta,
        spawn: Spawn,
        on_released: Callable[[HeldMessage], None] | None = None,
        parallel: int = 4,
        on_event: Callable[[str], None] | None = None,
        backoff: tuple[float, float] = (5.0, 600.0),  # first and longest retry wait, seconds
        first_seen: FirstSeenTimes | None = None,
        claim_renewal: float | None = None,  # seconds: renew a lane's claim (a shared store)
    ) -> None:
        self.first_seen = first_seen  # grace_hours: a held device's first-seen times
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
        self.on_event = on_event
        self.parallel = parallel  # devices released at once (one upstream connection each)
        self.backoff = backoff
        # Names this process in its claims (a shared store tells gateways apart by it).
        self.instance = uuid.uuid4().hex[:16]
        # On a shared store a claim is a lease: a lane relaying longer than this renews it,
        # and stops if another gateway has taken it over meanwhile.
        self.claim_renewal = claim_renewal
        self.fault: str | None = None  # why release is stopped (the store cannot be written)
        # Outcomes known but not yet written (their write failed): never relayed again.
        self._unsettled: dict[str, Settlement] = {}
        self._deletions: list[str] = []
        self._last_flush = time.monotonic()
        self._flushing = asyncio.Lock()  # one deletion batch written at a time

    async def start(self) -> None:
        self.devices_with_mail = await self.store.device_ids()
        claimed = await self.store.claimed()
        if claimed:
            log.warning(
                "release_resumed_after_interruption",
                messages=claimed,
                note="these were being relayed when the gateway stopped; any that had "
                "reached the upstream are sent again (at most once more each)",
            )

    def note_held(self, device_id: str) -> None:
        self.devices_with_mail.add(device_id)

    def paused(self) -> asyncio.Lock:
        """Held while an admin drops held mail: no release pass (nor expiry) claims or
        sends a message meanwhile, so a drop never races that message's delivery, and a
        bounce never reports mail that was delivered."""
        return self._lock

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

    def _event(self, name: str) -> None:
        if self.on_event is not None:
            self.on_event(name)

    async def run(
        self, *, device_id: str | None = None, newer_claims: DeviceClaims | None = None
    ) -> ReleaseReport:
        """One pass; serialised, so a message is never relayed by two passes at once."""
        async with self._lock:
            report = ReleaseReport()
            if not await self._recover():
                return report
            # A store fault is logged and counted where it happens; the next pass recovers.
            with contextlib.suppress(StoreFault):
                await self._run(device_id, newer_claims, report)
            return report

    async def _recover(self) -> bool:
        """After a store fault: write what is known, if the store takes writes again."""
        if self.fault is None:
            return True
        try:
            await self.store.probe_write(time.time())
            await self._flush_deletions()
            for hold_id, settlement in list(self._unsettled.items()):
                await self.store.settle(settlement)
                del self._unsettled[hold_id]
        except HoldStoreError as exc:
            self.fault = str(exc)
            return False
        log.info("release_resumed", note="the hold store takes writes again")
        self._event("store_recovered")
        self.fault = None
        return True

    def _store_fault(self, exc: HoldStoreError) -> StoreFault:
        if self.fault is None:
            log.error("release_stopped", reason=str(exc))
            self._event("store_fault")
        self.fault = str(exc)
        return StoreFault(str(exc))

    async def _run(
        self, device_id: str | None, newer_claims: DeviceClaims | None, report: ReleaseReport
    ) -> None:
        """Page through due mail in arrival order; each page's devices are released as
        parallel lanes (up to ``parallel`` upstream connections), each lane in order."""
        now = self.clock()
        compiled = self.policies.current  # one policy set for the whole pass
        legs = asyncio.Semaphore(self.parallel)
        after = 0
        try:
            while True:
                page = await self._read(self.store.due(now, device_id, PAGE_SIZE, after))
                if not page:
                    break
                after = page[-1].seq
                blocked_devices = {device for device, _ in report.blocked}
                lanes: dict[str, list[HeldMessage]] = {}
                for held in page:
                    if held.hold_id in self._unsettled or held.hold_id in self._deletions:
                        continue  # sent already; its outcome waits to be written
                    if held.device_id in blocked_devices and not held.is_bounce:
                        report.still_held += 1  # behind a message of its device that stays
                    else:
                        # Bounces are sent whatever the device's state, each on its own.
                        lane = f"bounce:{held.hold_id}" if held.is_bounce else held.device_id
                        lanes.setdefault(lane, []).append(held)
                releasable = [
                    chosen
                    for lane in lanes.values()
                    if (chosen := await self._releasable(lane, compiled, newer_claims, now, report))
                ]
                claims = await self._claim(releasable, report)
                bodies = _PageBodies(self._contents, [lane for lane, _ in claims])
                async with asyncio.TaskGroup() as lanes_running:
                    for index, (lane, claim_id) in enumerate(claims):
                        lanes_running.create_task(
                            self._release_lane(
                                lane, bodies.of_lane(index), claim_id, now, legs, report
                            )
                        )
                if len(page) < PAGE_SIZE:
                    break
        except* StoreFault as group:
            raise group.exceptions[0] from None
        finally:
            await asyncio.shield(self._flush_deletions_or_fault())
        await self._forget_devices_without_mail(device_id, now)

    async def _forget_devices_without_mail(self, device_id: str | None, now: datetime) -> None:
        if device_id is None:
            self.devices_with_mail = await self._read(self.store.device_ids())
        elif not await self._read(
            self.store.due(datetime.max.replace(tzinfo=now.tzinfo), device_id, limit=1)
        ):
            self.devices_with_mail.discard(device_id)

    async def _read(self, query: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await query
        except HoldStoreError as exc:
            raise self._store_fault(exc) from exc

    async def _decide(
        self, compiled: CompiledPolicySet, claims: DeviceClaims, now: datetime
    ) -> Decision:
        if self.first_seen is not None:
            return await self.first_seen.decide(
                compiled, claims, now, overrides=self.policies.overrides
            )
        return decide(compiled, claims, now, overrides=self.policies.overrides)

    async def _releasable(
        self,
        lane: list[HeldMessage],
        compiled: CompiledPolicySet,
        newer_claims: DeviceClaims | None,
        now: datetime,
        report: ReleaseReport,
    ) -> list[HeldMessage]:
        """The start of one device's due messages that may go now: the first that stays
        held stops the lane, so that later mail never overtakes it."""
        releasable: list[HeldMessage] = []
        for index, held in enumerate(lane):
            claims = (
                newer_claims
                if newer_claims is not None and newer_claims.device.id == held.device_id
                else held.claims
            )
            if (
                not held.release_requested
                and (await self._decide(compiled, claims, now)).action not in RELEASABLE
            ):
                report.still_held += len(lane) - index
                report.blocked.append((held.device_id, held.hold_id))
                break
            releasable.append(held)
        return releasable

    async def _claim(
        self, lanes: list[list[HeldMessage]], report: ReleaseReport
    ) -> list[tuple[list[HeldMessage], str]]:
        """Claim a page's lanes in one store write (one commit, not one per lane); the
        lanes claimed, each with its claim id. A shared store refuses a lane while another
        gateway relays that device's mail (or when it changed since it was read): a later
        pass retries it."""
        if not lanes:
            return []
        if self.fault is not None:
            raise StoreFault(self.fault)
        wanted = [
            LaneClaim(
                tuple(h.hold_id for h in lane),
                f"{self.instance}.{uuid.uuid4().hex}",
                tuple(h.attempts for h in lane),
            )
            for lane in lanes
        ]
        try:
            counts = await self.store.claim_lanes(wanted, time.time())
        except HoldStoreError as exc:
            raise self._store_fault(exc) from exc
        claimed = []
        for lane, claim, count in zip(lanes, wanted, counts, strict=True):
            if count:
                claimed.append((lane, claim.claim_id))
            else:
                report.claimed_elsewhere += len(lane)
        return claimed

    async def _release_lane(
        self,
        releasable: list[HeldMessage],
        with_bodies: AsyncGenerator[tuple[HeldMessage, _Body], None],
        claim_id: str,
        now: datetime,
        legs: asyncio.Semaphore,
        report: ReleaseReport,
    ) -> None:
        """One device's claimed messages, in order; the first that is retried stops the
        lane. What it did not send is unclaimed."""
        renewed = time.monotonic()  # the lane's claim was written just before it started
        attempted = 0
        lost = False
        try:
            async with legs, contextlib.aclosing(with_bodies) as messages:
                async for held, body in messages:
                    if self.fault is not None:
                        break
                    if (
                        self.claim_renewal is not None
                        and time.monotonic() - renewed >= self.claim_renewal
                    ):
                        if not await self._renew(releasable[attempted:], claim_id):
                            lost = True
                            report.claimed_elsewhere += len(releasable) - attempted
                            break
                        renewed = time.monotonic()
                    attempted += 1
                    if not await self._release_one(held, body, now, report):
                        report.still_held += len(releasable) - attempted
                        report.blocked.append((held.device_id, held.hold_id))
                        break
        finally:
            if not lost:  # a lost claim is another gateway's now: leave it alone
                await asyncio.shield(self._unclaim([h.hold_id for h in releasable[attempted:]]))
        if self.fault is not None and attempted == 0:
            raise StoreFault(self.fault)  # another lane found the store failing

    async def _contents(self, hold_ids: list[str]) -> dict[str, bytes]:
        try:
            return await self.store.contents(hold_ids)
        except HoldStoreError as exc:
            raise self._store_fault(exc) from exc

    async def _renew(self, rest: list[HeldMessage], claim_id: str) -> bool:
        """Extend this lane's lease on the messages it has yet to send; False if the lease
        ran out and another gateway claimed them (this lane then stops)."""
        try:
            kept = await self.store.claim(
                [h.hold_id for h in rest], claim_id, time.time(), [h.attempts for h in rest]
            )
        except HoldStoreError as exc:
            raise self._store_fault(exc) from exc
        if not kept:
            log.warning(
                "release_claim_lost",
                device_id=rest[0].device_id,
                messages=len(rest),
                note="the lane ran longer than [store] claim_lease_seconds and another "
                "gateway claimed it; raise the lease",
            )
        return bool(kept)

    async def _unclaim(self, hold_ids: list[str]) -> None:
        """Claims of messages not sent after all: harmless if this fails (a claim only
        says a message may have been sent)."""
        if hold_ids:
            try:
                await self.store.unclaim(hold_ids)
            except HoldStoreError as exc:
                log.warning("release_unclaim_failed", error=str(exc))

    async def _release_one(
        self, held: HeldMessage, body: _Body, now: datetime, report: ReleaseReport
    ) -> bool:
        """Relay one message and record what happened; False if it waits for a retry."""
        content, body.data = body.data, None  # the lane no longer holds it (memory)
        if content is None:
            return True  # dropped by an admin meanwhile
        delivery = await self.relay.deliver(held.sender, held.recipients, content, held.options)
        del content
        outcome = Outcome.of(held.recipients, delivery.per_recipient(held.recipients))
        if outcome.delivered and not outcome.retry and not outcome.failed:
            await self._delete(held.hold_id)
            report.released.append(held.hold_id)
            self._event("released")
            log.info(
                "released",
                hold_id=held.hold_id,
                device_id=held.device_id,
                user=held.user,
                requested=held.release_requested,
                bounce=held.is_bounce,
                upstream_reply=delivery.reply.line(),
            )
            if self.on_released is not None and not held.is_bounce:
                self.on_released(held)
            return True
        await self._settle(held, outcome, now)
        if outcome.failed:
            report.bounced.append(held.hold_id)
            self._event("bounced")
            log.warning(
                "release_refused",
                hold_id=held.hold_id,
                refused=[f"{r}: {reply.line()}" for r, reply in outcome.failed],
                bounced=not held.is_bounce and bool(held.sender),
            )
        if outcome.delivered:
            report.released.append(held.hold_id)
        if outcome.retry:
            _, first = outcome.retry[0]
            report.failed.append((held.hold_id, first.line()))
            self._event("retried")
            log.warning(
                "release_failed",
                hold_id=held.hold_id,
                reply=first.line(),
                recipients=len(outcome.retry),
            )
            return False
        return True

    async def _settle(self, held: HeldMessage, outcome: Outcome, now: datetime) -> None:
        """Write one outcome at once, with its bounce; if the write fails, keep it in memory
        (so the message is not relayed again) and stop release."""
        retry_at, error = 0.0, None
        if outcome.retry:
            first, longest = self.backoff
            delay = min(longest, first * 2 ** min(held.attempts, 32))
            retry_at, error = now.timestamp() + delay, outcome.retry[0][1].line()
        bounce = None
        headers = b""
        try:
            if outcome.failed and held.sender and not held.is_bounce:
                headers = await self.store.headers(held.hold_id)
        except HoldStoreError:
            pass  # the bounce goes without the original headers rather than not at all
        if outcome.failed and held.sender and not held.is_bounce:
            failed = [
                FailedRecipient(r, reply.enhanced, reply.line()) for r, reply in outcome.failed
            ]
            bounce = refusal_report(held, headers, self.hostname, now, failed)
        settlement = Settlement(
            hold_id=held.hold_id,
            at=now,
            retry=tuple(recipient for recipient, _ in outcome.retry),
            retry_at=retry_at,
            error=error,
            bounce=bounce,
        )
        try:
            await self.store.settle(settlement)
        except HoldStoreError as exc:
            self._unsettled[held.hold_id] = settlement
            raise self._store_fault(exc) from exc

    async def _delete(self, hold_id: str) -> None:
        """Batch deletions of delivered messages: one commit per batch, by count and by
        age, so that a crash re-sends little even when releases trickle out slowly."""
        self._deletions.append(hold_id)
        if len(self._deletions) >= DELETE_BATCH or time.monotonic() - self._last_flush > 0.25:
            await asyncio.shield(self._flush_deletions_or_fault())

    async def _flush_deletions(self) -> None:
        async with self._flushing:
            batch = list(self._deletions)
            self._last_flush = time.monotonic()
            if batch:
                await self.store.remove(batch)
                del self._deletions[: len(batch)]  # lanes only append meanwhile

    async def _flush_deletions_or_fault(self) -> None:
        try:
            await self._flush_deletions()
        except HoldStoreError as exc:
            raise self._store_fault(exc) from exc

    async def expire(self) -> ReleaseReport:
        """Turn what has been held longer than allowed into a bounce (RFC 3464) to its
        sender, in one transaction per message; the bounce is then released like any
        held message. Bounces that expire themselves are dropped (never bounce a bounce)."""
        report = ReleaseReport()
        async with self._lock:
            if self.fault is not None:
                return report
            now = self.clock()
            after = 0
            try:
                while True:
                    page = await self.store.expired(
                        now - self.expire_after, EXPIRY_PAGE_SIZE, after
                    )
                    for held in page:
                        if await self._expire_one(held, now):
                            report.expired.append(held.hold_id)
                    if len(page) < EXPIRY_PAGE_SIZE:
                        break
                    after = page[-1].seq
            except HoldStoreError as exc:
                self._store_fault(exc)
        return report

    async def _expire_one(self, held: HeldMessage, now: datetime) -> bool:
        """False if another gateway on a shared store expired it first (its bounce, and
        its count and log line, are that gateway's), or claimed it since it was read to
        relay it (the next pass looks again)."""
        bounce = None
        if held.sender and not held.is_bounce:
            headers = await self.store.headers(held.hold_id)
            bounce = expiry_report(held, headers, self.hostname, now, self.expire_after)
        if not await self.store.settle(
            Settlement(held.hold_id, now, bounce=bounce, unless_claimed=True)
        ):
            return False
        self._event("expired")
        log.info("expired", hold_id=held.hold_id, sender=held.sender, bounced=bounce is not None)
        return True
