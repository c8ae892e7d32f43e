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

# --- model calls (migration 0003) -------------------------------------------
# One row per completed model request of an llm agent, keyed like a step: a replay serves the
# recorded response instead of calling the model again. Never holds API keys or base URLs.

model_calls = sa.Table(
    "model_calls",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("step_key", sa.String(500), primary_key=True),
    sa.Column("call_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("workflow", sa.String(100), nullable=False),
    sa.Column("agent", sa.String(100), nullable=True),
    sa.Column("model", sa.String(200), nullable=False),  # the configured name that answered
    sa.Column("request", sa.Text, nullable=False),  # JSON: the new message(s) of this request
    sa.Column("response", sa.Text, nullable=False),  # JSON: the model's response, as replayed
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_micros", sa.BigInteger, nullable=False),
    sa.Column("attempts", sa.Text, nullable=True),  # JSON: models tried before, and why they failed
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Index("ix_model_calls_tenant", "tenant", "workflow", "finished_at"),
)

# --- agent memory (migration 0004) ------------------------------------------
# Long-term memory per (tenant, workflow, namespace). ``vector`` is the embedding of ``text``
# (float32, little-endian) made by ``embedder``; search is exact (brute-force cosine).

memory_entries = sa.Table(
    "memory_entries",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(100), primary_key=True),
    sa.Column("namespace", sa.String(100), primary_key=True),
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("text", sa.Text, nullable=True),
    sa.Column("subjects", sa.Text, nullable=True),  # JSON list, mirrored in memory_subjects
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("embedder", sa.String(100), nullable=True),
    sa.Column("vector", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Index("ix_memory_entries_expiry", "expires_at"),
)

memory_subjects = sa.Table(
    "memory_subjects",
    metadata,
    # who an entry is about (a customer id, an e-mail): erasure finds every entry through here
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("workflow", sa.String(100), primary_key=True),
    sa.Column("namespace", sa.String(100), primary_key=True),
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Index("ix_memory_subjects_entry", "tenant", "workflow", "namespace", "key"),
)

# --- users, tokens, sessions, tenants (migration 0005) ----------------------

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("username", sa.String(200), primary_key=True),
    sa.Column("password_hash", sa.String(300), nullable=False),
    sa.Column("roles", sa.Text, nullable=False),  # JSON list
    sa.Column("groups", sa.Text, nullable=False),  # JSON list of approval groups
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),  # SHA-256 of the secret; never the secret
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("roles", sa.Text, nullable=False),
    sa.Column("groups", sa.Text, nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),
    sa.Column("description", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("last_used_at", sa.Float, nullable=True),
    sa.UniqueConstraint("token_hash", name="uq_api_tokens_hash"),
    sa.Index("ix_api_tokens_tenant", "tenant", "created_at"),
)

sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # SHA-256 of the cookie value
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("roles", sa.Text, nullable=False),
    sa.Column("groups", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Index("ix_sessions_expiry", "expires_at"),
)

workflow_owners = sa.Table(
    "workflow_owners",
    metadata,
    # workflow names are global in ``workflows``; this row says which tenant owns a name
    # (names without a row belong to tenant "default", e.g. published by the CLI)
    sa.Column("workflow", sa.String(100), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_workflow_owners_tenant", "tenant"),
)

# --- trigger state (migration 0006) -----------------------------------------

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    # a repeated delivery id returns the first run; a different body under the same id is a conflict
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(100), primary_key=True),
    sa.Column("delivery_id", sa.String(200), primary_key=True),
    sa.Column("body_digest", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)

cron_ticks = sa.Table(
    "cron_ticks",
    metadata,
    # one row per fired tick: the scheduler's cursor across restarts; the run's idempotency key
    # (derived from the same tick) makes the start itself exactly-once across processes
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(100), primary_key=True),
    sa.Column("trigger", sa.String(64), primary_key=True),  # digest of schedule + time zone
    sa.Column("tick_at", sa.Float, primary_key=True),
    sa.Column("run_id", sa.String(40), nullable=True),  # None: a missed tick skipped by policy
    sa.Column("created_at", sa.Float, nullable=False),
)

# --- notification outbox (migration 0007) ---

notifications = sa.Table(
    "notifications",
    metadata,
    # one row per (event, channel): the sender delivers pending rows with backoff, after a restart
    # too; ``key`` + ``channel`` is unique, so enqueueing the same event again is a no-op.
    # Rows hold what the message says and the channel's public name, never a URL or a password.
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("key", sa.String(300), nullable=False),
    sa.Column("channel", sa.String(200), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("subject_id", sa.String(200), nullable=False),
    sa.Column("message", sa.Text, nullable=False),  # JSON of the Notification
    sa.Column("status", sa.String(16), nullable=False),  # pending | sent | failed
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.UniqueConstraint("key", "channel", name="uq_notifications_key_channel"),
    sa.Index("ix_notifications_due", "status", "next_attempt_at"),
)
