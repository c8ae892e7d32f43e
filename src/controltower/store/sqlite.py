"""SQLite: the zero-set-up default. WAL, one writer thread, `BEGIN IMMEDIATE` transactions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from controltower.store.sql import SqlStore

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SqliteStore(SqlStore):
    insert = staticmethod(sqlite_dialect.insert)

    def __init__(self, url: str, *, synchronous: str = "FULL", busy_timeout_ms: int = 30_000) -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Take the write lock up front: a deferred transaction that later writes can fail
            # with SQLITE_BUSY when another process (a CLI approving a step) wrote meanwhile.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        super().__init__(url, engine)


def default_sqlite_url() -> str:
    root = Path(os.environ.get("TOWER_HOME", ".tower"))
    return f"sqlite:///{(root / 'tower.db').resolve()}"
