"""The schema, written once for every SQL backend (SQLAlchemy Core).

Times are epoch seconds (float): portable, cheap to compare, and converted for
display at the edges. JSON values are text; big ones move to ``payloads``.
Changing a table here needs an Alembic migration in ``migrations/versions``;
a test compares this metadata with the migrated database.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

workflows = sa.Table(
    "workflows",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("base_dir", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_workflows_digest", "name", "digest"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False, server_default="default"),
    sa.Column("workflow", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("input", sa.Text, nullable=True),
    sa.Column("output", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("parent_run_id", sa.String(40), nullable=True),
    sa.Column("parent_step_key", sa.String(500), nullable=True),
    sa.Column("owner", sa.String(100), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("wake_at", sa.Float, nullable=True),
    sa.Column("waiting_on", sa.String(500), nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.UniqueConstraint("tenant", "workflow", "idempotency_key", name="uq_runs_idempotency"),
    sa.Index("ix_runs_ready", "status", "wake_at"),
    sa.Index("ix_runs_workflow", "workflow", "created_at"),
    sa.Index("ix_runs_parent", "parent_run_id"),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("step_key", sa.String(500), primary_key=True),
    sa.Column("step_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
    sa.Column("input", sa.Text, nullable=True),
    sa.Column("output", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
)

signals = sa.Table(
    "signals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("payload", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("consumed_at", sa.Float, nullable=True),
    # set for signals that may be sent only once per run (an approval decision)
    sa.Column("once_key", sa.String(200), nullable=True),
    sa.Index("ix_signals_run", "run_id", "name"),
    sa.Index("ux_signals_once", "run_id", "once_key", unique=True),
)

payloads = sa.Table(
    "payloads",
    metadata,
    sa.Column("digest", sa.String(80), primary_key=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
