"""Which hold store a gateway uses: SQLite at ``[hold] database`` (the default, one
gateway), or PostgreSQL at ``[store] url`` (shared by several). Both satisfy
:class:`~gateway.hold.store.HoldBackend`; the services and the CLI pick one here."""

from __future__ import annotations

from gateway.config.settings import Settings
from gateway.hold.store import AsyncHoldStore, AsyncStore, HoldBackend, HoldStore


def describe_store(settings: Settings) -> str:
    """Where held mail lives, for messages and audit lines (never a password)."""
    if settings.store.url is not None:
        from gateway.hold.postgres import describe

        return describe(settings.store.url)
    return str(settings.hold.database)


def open_store(settings: Settings) -> HoldBackend:
    """The synchronous store (the CLI). PostgreSQL's migrations are applied on the way."""
    if settings.store.url is not None:
        from gateway.hold.postgres import PostgresHoldStore

        return PostgresHoldStore(settings.store, pool_size=1)
    return HoldStore(settings.hold.database, busy_timeout=settings.hold.busy_timeout)


def async_store(settings: Settings) -> AsyncStore:
    """The store ``gateway serve`` uses (opened by ``open()``)."""
    if settings.store.url is not None:
        from gateway.hold.postgres import AsyncPostgresHoldStore

        return AsyncPostgresHoldStore(settings.store)
    return AsyncHoldStore(
        settings.hold.database,
        busy_timeout=settings.hold.busy_timeout,
        min_free_bytes=settings.hold.min_free_bytes,
    )
