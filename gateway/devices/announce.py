"""Announcements and withdrawals to exactly the affected users (docs/policies.md).

When a policy warns (its announce phase, or a device outside its rollout stage or within
its grace period), every user with a recently seen device it matches (the inventory) is
sent the warning notice now, not only when that device next sends. When a policy is
retracted (or deleted), every device that was sent a notice mail for it gets one
"withdrawn" notice, and no other. Both go through the notices table: once per device,
policy and phase, whichever process or replica gets there first, so a restart sends no
second copy. Sends are paced (``announce_notices_per_second``).

:func:`gateway.policy.impact.announcements` is pure (time and operator overrides passed
in; `gateway impact` previews with it); :class:`Announcer` does the sending. A suspended
policy announces to nobody, and a user or device with a break-glass exemption from it is
not told; when the overrides change, the announcements are checked again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import structlog

from gateway.devices.notices import Notifier, disregard_text
from gateway.domain import Access, Clock, DeviceClaims, Overrides, PolicyState
from gateway.errors import HoldStoreError
from gateway.hold.store import AsyncStore
from gateway.policy.engine import CompiledPolicySet
from gateway.policy.impact import Announcement, announcements, warning_policies

log = structlog.get_logger("gateway.notices")

CHUNK = 500  # devices decided between yields to the event loop (~3 ms with a rollout)
RESWEEP = 60.0  # seconds between sweeps for rollout and grace policies, which warn anew


class Announcer:
    def __init__(
        self,
        notifier: Notifier,
        store: AsyncStore,
        devices: Callable[[], list[DeviceClaims]],
        accesses_of: Callable[[DeviceClaims], Iterable[Access]],
        first_seen_of: Callable[[str], Mapping[str, datetime]],
        clock: Clock,
        per_second: float,
        overrides: Callable[[], Overrides] = Overrides,
    ) -> None:
        self.notifier = notifier
        self.store = store
        self.devices = devices
        self.accesses_of = accesses_of
        self.first_seen_of = first_seen_of
        self.clock = clock
        self.pause = 1.0 / per_second
        self.overrides = overrides  # the operator overrides in force now
        self._swept: set[tuple[str, str, str]] = set()  # (kind, policy id, version) done here
        self._swept_under = Overrides()  # the overrides the announcements were swept under
        self._deleted: dict[str, str | None] = {}  # deleted since start: id -> reason
        # (device, policy, phase) known sent, here or by another process: not asked again.
        self._told: set[tuple[str, str, str]] = set()
        self._lock = asyncio.Lock()
        self._last_resweep = float("-inf")  # monotonic time of the last rollout/grace sweep

    def deleted(self, policy_ids: Iterable[str]) -> None:
        """A reload removed these active policies: withdraw them at the next sweep."""
        for policy_id in policy_ids:
            self._deleted.setdefault(policy_id, None)

    async def sweep(self, compiled: CompiledPolicySet) -> None:
        """Announce what newly warns, withdraw what was retracted; each (policy, version)
        once per process (the notices table makes it once per device across restarts)."""
        if self._lock.locked():
            return  # the previous sweep is still sending
        async with self._lock:
            now = self.clock()
            version = compiled.version
            overrides = self.overrides()
            if overrides != self._swept_under:
                # A suspension ended or an exemption expired: whom to tell may have grown.
                self._swept = {k for k in self._swept if k[0] != "announce"}
                self._swept_under = overrides
            resweep = time.monotonic() - self._last_resweep >= RESWEEP
            fresh = [
                p.id
                for p in warning_policies(compiled, now, overrides)
                if ("announce", p.id, version) not in self._swept
                and (resweep or (p.rollout is None and p.grace is None))
            ]
            if resweep and any(p.rollout or p.grace for p in compiled.source.policies):
                self._last_resweep = time.monotonic()
            # Rollout and grace policies warn different devices as time passes: re-checked
            # every sweep; announce-phase policies once per version.
            self._swept.update(
                ("announce", p.id, version)
                for p in compiled.source.policies
                if p.id in fresh and p.rollout is None and p.grace is None
            )
            if fresh:
                await self._announce(compiled, fresh, now, overrides)
            retracted = {
                p.id: p.retracted_reason
                for p in compiled.source.policies
                if p.state is PolicyState.RETRACTED
            }
            live = {p.id for p in compiled.source.policies}
            retracted.update({k: v for k, v in self._deleted.items() if k not in live})
            for policy_id, reason in retracted.items():
                key = ("withdraw", policy_id, version)
                if key not in self._swept:
                    self._swept.add(key)
                    await self._withdraw(policy_id, reason, now)

    async def _announce(
        self,
        compiled: CompiledPolicySet,
        policy_ids: list[str],
        now: datetime,
        overrides: Overrides,
    ) -> None:
        devices = self.devices()
        rows: list[Announcement] = []
        for start in range(0, len(devices), CHUNK):  # ~0.2 s for 10,000 devices: in slices
            rows += announcements(
                compiled,
                policy_ids,
                devices[start : start + CHUNK],
                now,
                self.accesses_of,
                self.first_seen_of,
                overrides,
            )
            await asyncio.sleep(0)
        for row in rows:
            if (row.device_id, row.policy_id, "warn") in self._told:
                continue
            if _overridden_since(row, self.overrides()):
                continue  # suspended or exempted while the paced sends went out
            await self._send(row.user, row.device_id, row.policy_id, "warn", row.message, now)

    async def _withdraw(self, policy_id: str, reason: str | None, now: datetime) -> None:
        try:
            device_ids = await self.store.noticed_devices(policy_id)
        except HoldStoreError as exc:
            log.warning("withdrawal_not_sent", policy_id=policy_id, error=str(exc))
            return
        users = {c.device.id: c.subject for c in self.devices()}
        for device_id in device_ids:
            user = users.get(device_id)
            if user is None:  # not seen within the inventory's retention: nobody to tell
                log.info("withdrawal_skipped", policy_id=policy_id, device_id=device_id)
                continue
            text = disregard_text(device_id, policy_id, reason)
            await self._send(user, device_id, policy_id, "withdrawn", text, now)

    async def _send(
        self, user: str, device_id: str, policy_id: str, phase: str, text: str, now: datetime
    ) -> None:
        try:
            sent = await self.notifier.notify(user, device_id, policy_id, phase, text, now)
            self._told.add((device_id, policy_id, phase))  # sent now, or by someone before
        except Exception:  # best effort, as every notice: logged, retried at the next sweep
            log.exception("notice_error", device_id=device_id, policy_id=policy_id, phase=phase)
            self._swept = {k for k in self._swept if k[1] != policy_id}
            return
        if sent:
            await asyncio.sleep(self.pause)


def _overridden_since(row: Announcement, overrides: Overrides) -> bool:
    """An operator override now in force covers this announcement, decided before it: the
    sends are paced (minutes for a large inventory), and a suspension must stop them at
    once. When it is lifted, the next sweep announces to whoever is left."""
    if row.policy_id in overrides.suspended:
        return True
    subjects = (f"user:{row.user.casefold()}", f"device:{row.device_id}")
    return any((row.policy_id, subject) in overrides.exempt for subject in subjects)
