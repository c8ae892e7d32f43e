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


# -- the governed tool gateway ------------------------------------------------------------
# Money is integer micro-units of the account currency; tokens are integers.

tools = sa.Table(
    "tools",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("version", sa.String(40), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("side_effect", sa.String(16), nullable=False),
    sa.Column("risk", sa.String(16), nullable=False),
    sa.Column("definition", sa.Text, nullable=False),
    sa.Column("deprecated", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

tool_calls = sa.Table(
    "tool_calls",
    metadata,
    # (tenant, run, step, call): a repeat returns the recorded result without executing
    sa.Column("idem_key", sa.String(600), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(40), nullable=True),
    sa.Column("step_key", sa.String(500), nullable=True),
    sa.Column("tool", sa.String(200), nullable=False),
    sa.Column("version", sa.String(40), nullable=False),
    sa.Column("args_digest", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # started | completed | failed
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Index("ix_tool_calls_run", "run_id"),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("call_key", sa.String(600), nullable=False),
    sa.Column("run_id", sa.String(40), nullable=True),
    sa.Column("step_key", sa.String(500), nullable=True),
    sa.Column("workflow", sa.String(100), nullable=True),
    sa.Column("agent", sa.String(100), nullable=True),
    sa.Column("tool", sa.String(200), nullable=False),
    sa.Column("tool_version", sa.String(40), nullable=False),
    sa.Column("args", sa.Text, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("context", sa.Text, nullable=True),  # proposal, reasoning, data read, cost, policy ids
    sa.Column("risk", sa.String(16), nullable=False),
    sa.Column("approval_group", sa.String(100), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # pending|approved|rejected|expired
    sa.Column("decided_by", sa.String(200), nullable=True),
    sa.Column("decided_role", sa.String(100), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("approved_args", sa.Text, nullable=True),
    sa.Column("approved_digest", sa.String(64), nullable=True),
    sa.Column("escalations", sa.Integer, nullable=False, server_default="0"),
    sa.Column("due_at", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("decided_at", sa.Float, nullable=True),
    sa.Column("consumed_at", sa.Float, nullable=True),
    sa.UniqueConstraint("call_key", name="uq_approvals_call"),
    sa.Index("ix_approvals_inbox", "tenant", "status", "created_at"),
    sa.Index("ix_approvals_run", "run_id"),
)

budgets = sa.Table(
    "budgets",
    metadata,
    # scope: "tenant:<t>", "department:<d>", "workflow:<w>", "run:<id>"
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("scope", sa.String(300), primary_key=True),
    sa.Column("unit", sa.String(16), primary_key=True),  # micros | tokens
    sa.Column("cap", sa.BigInteger, nullable=True),  # None: track only
    sa.Column("used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.Float, nullable=False),
)

budget_reservations = sa.Table(
    "budget_reservations",
    metadata,
    sa.Column("key", sa.String(600), primary_key=True),  # idempotent: (run, step, call)
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),  # JSON list of scopes charged
    sa.Column("unit", sa.String(16), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("actual", sa.BigInteger, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # reserved | committed | released
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("settled_at", sa.Float, nullable=True),
)

rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

tool_slots = sa.Table(
    "tool_slots",
    metadata,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("holder", sa.String(600), primary_key=True),
    sa.Column("expires_at", sa.Float, nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(40), nullable=False),  # tool_call | decision | approval | handoff | ...
    sa.Column("subject", sa.String(300), nullable=True),  # the tool, step or setting concerned
    sa.Column("run_id", sa.String(40), nullable=True),
    sa.Column("workflow", sa.String(100), nullable=True),
    sa.Column("outcome", sa.String(40), nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("inputs_digest", sa.String(64), nullable=True),
    sa.Column("data", sa.Text, nullable=True),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_audit_run", "run_id"),
    sa.Index("ix_audit_tenant", "tenant", "ts"),
)

controls = sa.Table(
    "controls",
    metadata,
    # kill switches and autonomy overrides: scope "workflow:<w>", "agent:<a>"; key "paused"/"autonomy"
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("scope", sa.String(300), primary_key=True),
    sa.Column("key", sa.String(40), primary_key=True),
    sa.Column("value", sa.Text, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("changed_by", sa.String(200), nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
)
