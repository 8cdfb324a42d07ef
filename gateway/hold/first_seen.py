"""When each device was first seen matching each policy with ``grace_hours``.

The engine is pure: it is given these times (``decide(..., first_seen=...)``) and says
which ones it lacked. :class:`FirstSeenTimes` decides with the times it knows, records
the missing ones in the shared store (the first writer wins, so every replica counts a
device's grace from the same moment), and decides again. A first-seen time never changes
once written, so it is read from the store once per process and kept in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

import structlog

from gateway.domain import NO_OVERRIDES, Access, Decision, DeviceClaims, Overrides
from gateway.errors import HoldStoreError
from gateway.policy.engine import CompiledPolicySet, decide

log = structlog.get_logger("gateway.policy")

MAX_DEVICES = 100_000  # devices remembered; past that the memory starts again (re-read)


class FirstSeenStore(Protocol):
    async def first_seen(self, device_id: str, policy_id: str, now: datetime) -> datetime: ...


class FirstSeenTimes:
    def __init__(self, store: FirstSeenStore) -> None:
        self.store = store
        self._known: dict[str, dict[str, datetime]] = {}

    def known(self, device_id: str) -> Mapping[str, datetime]:
        return self._known.get(device_id, {})

    async def decide(
        self,
        compiled: CompiledPolicySet,
        claims: DeviceClaims,
        now: datetime,
        access: Access = Access.SEND,
        overrides: Overrides = NO_OVERRIDES,
    ) -> Decision:
        """The engine's decision, with this device's first-seen times (recorded if new).

        If the store cannot be read or written, the grace counts from ``now`` (the device
        is warned, not held): a store fault must not enforce a ban early on anybody.
        """
        device_id = claims.device.id
        decision = decide(compiled, claims, now, access, self.known(device_id), overrides)
        if not decision.first_seen_needed:
            return decision
        if len(self._known) >= MAX_DEVICES and device_id not in self._known:
            self._known.clear()
        times = self._known.setdefault(device_id, {})
        for policy_id in decision.first_seen_needed:
            try:
                times[policy_id] = await self.store.first_seen(device_id, policy_id, now)
            except HoldStoreError as exc:
                log.warning("first_seen_unavailable", policy_id=policy_id, error=str(exc))
                return decision
        return decide(compiled, claims, now, access, times, overrides)
