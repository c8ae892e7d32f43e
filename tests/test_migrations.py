"""The Alembic migrations produce exactly the schema the code declares, on both backends."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from controltower.store import open_store
from controltower.store.postgres import normalise_url
from controltower.store.tables import metadata


async def test_migrated_schema_matches_metadata(store_url: str) -> None:
    store = await open_store(store_url)
    await store.migrate()  # a second run is a no-op
    await store.close()
    engine = sa.create_engine(normalise_url(store_url))
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        tables = set(sa.inspect(conn).get_table_names())
    engine.dispose()
    assert diff == []
    assert {"workflows", "runs", "steps", "signals", "payloads", "alembic_version"} <= tables
