"""Which hold store a gateway uses: SQLite at ``[hold] database`` (the default, one
gateway), or PostgreSQL at ``[store] url`` (shared by several). Both satisfy
:class:`~gateway.hold.store.HoldBackend`; the services and the CLI pick one here."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from gateway.config.settings import Settings, StoreSettings
from gateway.hold.store import (
    DEFAULT_BUSY_TIMEOUT,
    AsyncHoldStore,
    AsyncStore,
    HoldBackend,
    HoldStore,
    overrides_of,
)
from gateway.ops.workers import Peers, WorkerRole
from gateway.policy.impact import PreviewInputs
from gateway.policy.model import Policy


def describe_store(settings: Settings) -> str:
    """Where held mail lives, for messages and audit lines (never a password)."""
    if settings.store.url is not None:
        from gateway.hold.postgres import describe

        return describe(settings.store.url)
    return str(settings.hold.database)


def open_store(settings: Settings) -> HoldBackend:
    """The synchronous store (the CLI). PostgreSQL's migrations are applied on the way."""
    return open_store_at(settings.hold.database, settings.store, settings.hold.busy_timeout)


def open_store_at(
    database: Path, store: StoreSettings, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> HoldBackend:
    """:func:`open_store` from the two sections alone (picklable, for a worker process)."""
    if store.url is not None:
        from gateway.hold.postgres import PostgresHoldStore

        return PostgresHoldStore(store, pool_size=1)
    return HoldStore(database, busy_timeout=busy_timeout)


def async_store(settings: Settings, worker: WorkerRole | None = None) -> AsyncStore:
    """The store ``gateway serve`` uses (opened by ``open()``); a worker of several
    shares its supervisor's SQLite store and tells the other workers of changes."""
    if settings.store.url is not None:
        from gateway.hold.postgres import AsyncPostgresHoldStore

        return AsyncPostgresHoldStore(settings.store)
    return AsyncHoldStore(
        settings.hold.database,
        busy_timeout=settings.hold.busy_timeout,
        min_free_bytes=settings.hold.min_free_bytes,
        lease=settings.store.claim_lease,
        peers=Peers(worker) if worker is not None else None,
    )


def read_preview_inputs(
    store: HoldBackend,
    since: datetime,
    now: datetime,
    policies: Iterable[Policy],
    notices: bool,
) -> PreviewInputs:
    """What an impact preview of a change to ``policies`` (both sets' policies) reads
    from the store: the devices seen since ``since``, what each was seen doing, the
    operator overrides in force at ``now``, and, when notices are sent, the notices sent
    for those policies and (only if one has a grace period) each device's first-seen
    times. `gateway impact` and the admin API's preview read it alike."""
    policies = list(policies)
    devices = tuple(store.devices(since))
    sent: frozenset[tuple[str, str, str]] = frozenset()
    first_seen: dict[str, dict[str, datetime]] = {}
    if notices:
        sent = frozenset(store.notices_sent([p.id for p in policies]))
        graced = sorted({p.id for p in policies if p.grace})
        first_seen = store.first_seen_of_policies(graced) if graced else {}
    return PreviewInputs(
        devices,
        store.device_accesses(since),
        overrides_of(store.policy_overrides(now)),
        sent,
        first_seen,
        notices,
    )
