"""PostgreSQL via psycopg 3: the production store. Same SQL; row locks with SKIP LOCKED."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect

from controltower.store.sql import SqlStore


def normalise_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class PostgresStore(SqlStore):
    insert = staticmethod(pg_dialect.insert)

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the install
            from controltower.spec.errors import StoreError

            raise StoreError(
                "PostgreSQL needs the psycopg driver",
                hint="pip install 'controltower[postgres]'",
            ) from exc
        engine = sa.create_engine(normalise_url(url), pool_size=2, max_overflow=2, pool_pre_ping=True)
        super().__init__(url, engine, relax_in=_relax_in)


def _relax_in(conn: sa.Connection) -> None:
    """This transaction's commit returns before its WAL record is flushed (visible at once; on
    disk with the next synchronous commit, which flushes the WAL up to its own record)."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute("SET LOCAL synchronous_commit TO OFF")
    finally:
        cursor.close()
