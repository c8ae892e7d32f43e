"""Schema migrations with Alembic, run programmatically on the store's own connection."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(conn: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def upgrade(conn: sa.Connection) -> str | None:
    """Bring the schema to head; cheap when it already is. Returns the head revision."""
    if conn.dialect.name == "postgresql":
        # two processes starting at once must not both create tables
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7318008)"))
    cfg = alembic_config(conn)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        command.upgrade(cfg, "head")
    return head
