"""The device inventory: the last claims each device presented, kept for the impact
preview and the reload guard (docs/lifecycle.md says what it keeps and for how long).

Kept in memory for the guard, and written to the store in batches on the release tick:
a device that authenticates 100 times in 5 s is written once. Losing a batch in a crash
is harmless; the inventory is a cache of what devices say about themselves.
"""

from __future__ import annotations

from datetime import timedelta

from gateway.domain import Clock, DeviceClaims
from gateway.hold.store import AsyncHoldStore


class Inventory:
    def __init__(self, store: AsyncHoldStore, retention: timedelta, clock: Clock) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self._devices: dict[str, DeviceClaims] = {}  # recently seen, by device id
        self._pending: dict[str, tuple[DeviceClaims, float]] = {}  # seen since the last flush

    async def load(self) -> None:
        """Start from what the store remembers of the retention period."""
        for claims in await self.store.devices(self.clock() - self.retention):
            self._devices[claims.device.id] = claims

    def seen(self, claims: DeviceClaims) -> None:
        device_id = claims.device.id
        self._devices[device_id] = claims
        self._pending[device_id] = (claims, self.clock().timestamp())

    def devices(self) -> list[DeviceClaims]:
        return list(self._devices.values())

    async def flush(self) -> None:
        """Write what was seen since the last flush, and forget devices past retention."""
        pending, self._pending = list(self._pending.values()), {}
        await self.store.record_devices(pending)
        await self.store.prune_devices(self.clock() - self.retention)
