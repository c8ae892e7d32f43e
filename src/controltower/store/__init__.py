"""Durable state. `open_store(url)` picks the backend from the URL."""

from __future__ import annotations

import os

from controltower.spec.errors import StoreError
from controltower.store.base import (
    ACTIVE,
    TERMINAL,
    RunFilter,
    RunRecord,
    SignalRecord,
    StepRecord,
    Store,
    WorkflowRecord,
)
from controltower.store.sql import SqlStore

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "RunFilter",
    "RunRecord",
    "SignalRecord",
    "SqlStore",
    "StepRecord",
    "Store",
    "WorkflowRecord",
    "open_store",
    "resolve_url",
]


def resolve_url(url: str | None = None) -> str:
    """The explicit URL, else TOWER_DB_URL, else the SQLite file under .tower/."""
    if url:
        return url
    env = os.environ.get("TOWER_DB_URL")
    if env:
        return env
    from controltower.store.sqlite import default_sqlite_url

    return default_sqlite_url()


async def open_store(url: str | None = None, *, synchronous: str = "FULL", migrate: bool = True) -> SqlStore:
    """Open (and by default migrate) the store named by ``url``."""
    resolved = resolve_url(url)
    store: SqlStore
    if resolved.startswith("sqlite"):
        from controltower.store.sqlite import SqliteStore

        store = SqliteStore(resolved, synchronous=synchronous)
    elif resolved.startswith(("postgresql", "postgres")):
        from controltower.store.postgres import PostgresStore

        store = PostgresStore(resolved)
    else:
        raise StoreError(
            f"unsupported store URL {resolved!r}",
            hint="use sqlite:///path/to/tower.db or postgresql://user@host/db",
        )
    if migrate:
        try:
            await store.migrate()
        except StoreError:
            await store.close()
            raise
        except Exception as exc:
            await store.close()
            raise StoreError(f"cannot open store {resolved}: {exc}") from exc
    return store
