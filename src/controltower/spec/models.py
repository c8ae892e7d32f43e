"""The workflow spec: what a user authors (YAML or the Python builder).

Everything that crosses a boundary is a Pydantic v2 model; step kinds form a
discriminated union on ``kind`` so the JSON Schema, the YAML errors and the
engine all agree on one shape.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
IDENT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_\-]*$"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.\-]*$"


def parse_duration(value: object) -> float:
    """'250ms', '30s', '5m', '2h', '1d' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration; write e.g. '500ms', '30s', '5m', '2h', '1d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Ident = Annotated[str, Field(pattern=IDENT_PATTERN, max_length=64)]
AutonomyLevel = Literal["draft_only", "approve_writes", "autonomous_low_risk", "expanded"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Owner(_Model):
    team: str = Field(min_length=1)
    email: str | None = None
    name: str | None = None


class RetryPolicy(_Model):
    """Exponential backoff with jitter. ``max_attempts=1`` means no retry."""

    max_attempts: int = Field(default=1, ge=1, le=100)
    initial_interval: Duration = 1.0
    backoff: float = Field(default=2.0, ge=1.0, le=10.0)
    max_interval: Duration = 60.0
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    non_retryable: list[str] = Field(
        default_factory=list, description="Error codes or exception type names never retried."
    )

    def delay(self, attempt: int, unit_random: float) -> float:
        """Seconds to wait after failed ``attempt`` (1-based); ``unit_random`` in [0, 1)."""
        base = min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval)
        spread = base * self.jitter
        return max(0.0, base - spread + 2 * spread * unit_random)


# --- triggers ---------------------------------------------------------------


class ManualTrigger(_Model):
    kind: Literal["manual"] = "manual"


class WebhookTrigger(_Model):
    """``POST /v1/webhooks/<path or workflow name>``, signed with HMAC-SHA256 over ``timestamp.body``."""

    kind: Literal["webhook"] = "webhook"
    path: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="Endpoint name under /v1/webhooks/; defaults to the workflow name.",
    )
    secret_env: str | None = Field(
        default=None, description="Environment variable holding the HMAC-SHA256 signing secret."
    )
    tolerance: Duration = Field(
        default=300.0, description="How far the signed timestamp may be from now; older is a replay."
    )
    input_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the body; the workflow's input_schema applies too."
    )
    max_bytes: int = Field(default=1_048_576, ge=1, le=10 * 1024 * 1024)


class CronTrigger(_Model):
    """Exactly one run per tick. ``missed`` says what happens to ticks that passed while nothing ran:
    ``skip`` drops them, ``run_once`` runs the latest of them once, ``run_all`` runs each (at most
    ``max_catch_up``, the most recent)."""

    kind: Literal["cron"] = "cron"
    schedule: str = Field(min_length=9, description="Five-field cron expression, e.g. '0 8 * * 1-5'.")
    timezone: str = "UTC"
    missed: Literal["skip", "run_once", "run_all"] = "run_once"
    max_catch_up: int = Field(default=100, ge=1, le=10_000)
    input: dict[str, Any] = Field(default_factory=dict)

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("a cron schedule has five fields: minute hour day month weekday")
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression, e.g. '*/5 * * * *' or '0 8 * * 1-5'")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name like 'Europe/Paris'") from None
        return value


class QueueTrigger(_Model):
    """One run per message; the run's idempotency key comes from the message id, so a
    redelivered message never starts a second run."""

    kind: Literal["queue"] = "queue"
    backend: Literal["redis", "nats"]
    stream: str = Field(min_length=1)
    group: str | None = Field(
        default=None, description="Consumer group / durable name; default tower-<workflow>."
    )
    subject: str | None = Field(default=None, description="NATS subject filter; default the stream name.")
    url: str | None = Field(default=None, description="Server URL; default TOWER_REDIS_URL / TOWER_NATS_URL.")
    claim_after: Duration = Field(
        default=30.0, description="An unacknowledged message is redelivered to another consumer after this."
    )
    batch: int = Field(default=10, ge=1, le=1000)


TriggerSpec = Annotated[
    ManualTrigger | WebhookTrigger | CronTrigger | QueueTrigger, Field(discriminator="kind")
]


# --- budgets, KPIs ----------------------------------------------------------


class BudgetSpec(_Model):
    max_tokens: int | None = Field(default=None, ge=0)
    max_cost_usd: Decimal | None = Field(default=None, ge=0, decimal_places=6)
    on_exceed: Literal["stop", "fallback"] = "stop"
    fallback_model: str | None = None

    @property
    def max_cost_micros(self) -> int | None:
        """Money is kept as integer micro-dollars so sums are exact."""
        return None if self.max_cost_usd is None else int(self.max_cost_usd * 1_000_000)

    @model_validator(mode="after")
    def _fallback_needs_model(self) -> BudgetSpec:
        if self.on_exceed == "fallback" and not self.fallback_model:
            raise ValueError("on_exceed: fallback needs fallback_model")
        return self


class KPISpec(_Model):
    """A business number the workflow moves; ``measure`` is an expression over the run."""

    name: Ident
    description: str | None = None
    measure: str = Field(description="Expression over `output`, `input`, `run` per run.")
    aggregate: Literal["mean", "sum", "rate", "count", "p50", "p95"] = "mean"
    unit: str | None = None
    baseline: float | None = None
    target: float | None = None
    direction: Literal["up", "down"] = "up"
    minutes_saved_per_run: float | None = Field(default=None, ge=0)


class ConcurrencySpec(_Model):
    max_runs: int | None = Field(default=None, ge=1)
    max_parallel_steps: int | None = Field(default=None, ge=1)


# --- agents and tools -------------------------------------------------------


class Rule(_Model):
    when: str = Field(default="True", description="Expression over `input`.")
    output: dict[str, Any]


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*:\S+$"
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN, max_length=200)]


class ModelPrice(_Model):
    """What a model costs, in integer micro-dollars per million tokens (150000 = $0.15 / 1M)."""

    input: int = Field(ge=0)
    output: int = Field(ge=0)


class AgentSpec(_Model):
    kind: Literal["llm", "rule", "python", "remote"]
    role: str | None = None
    instructions: str | None = None
    model: ModelName | None = Field(
        default=None,
        description="'provider:model', e.g. 'openai:gpt-4o-mini', 'ollama:llama3.2', "
        "'openai-compatible:NAME' (TOWER_MODEL_BASE_URL). Else the workflow's model, else TOWER_MODEL.",
    )
    fallback_models: list[ModelName] = Field(
        default_factory=list, description="Tried in order when a model call fails or times out."
    )
    offline: str | None = Field(
        default=None,
        description="'module:function' that runs instead of an llm agent when no model is configured.",
    )
    impl: str | None = Field(default=None, description="'module:function' for python agents.")
    rules: list[Rule] = Field(default_factory=list)
    default: dict[str, Any] | None = Field(
        default=None, description="Rule agent output when no rule matches."
    )
    endpoint: str | None = Field(
        default=None, description="Remote agents: the URL their payload is POSTed to."
    )
    auth_env: str | None = Field(
        default=None, description="Remote agents: environment variable holding a bearer token."
    )
    tools: list[str] = Field(
        default_factory=list, description="Tool names (called through the gateway) or 'agent:<name>'."
    )
    input_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the payload handed to this agent."
    )
    output_schema: dict[str, Any] | None = None
    output_retries: int = Field(
        default=2, ge=0, le=10, description="LLM agents: re-asks after an output that breaks output_schema."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="LLM agents: output tokens per model call."
    )
    timeout: Duration | None = Field(
        default=None, description="Per model request (LLM, default 60s) or per POST (remote, default 30s)."
    )
    autonomy: AutonomyLevel = "approve_writes"
    budget: BudgetSpec | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> AgentSpec:
        if self.kind == "python" and not self.impl:
            raise ValueError("a python agent needs impl: 'module:function'")
        if self.kind == "rule" and not self.rules:
            raise ValueError("a rule agent needs at least one rule")
        if self.kind == "remote" and not self.endpoint:
            raise ValueError("a remote agent needs endpoint: URL")
        if self.kind == "remote" and self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.endpoint!r} must be an http:// or https:// URL")
        for field_name in ("impl", "offline"):
            value = getattr(self, field_name)
            if value is not None and ":" not in value:
                raise ValueError(f"{field_name} {value!r} must look like 'package.module:function'")
        if self.offline is not None and self.kind != "llm":
            raise ValueError("offline: applies to llm agents only")
        for tool in self.tools:
            if tool.startswith("agent:") and len(tool) == len("agent:"):
                raise ValueError("'agent:' in tools needs an agent name, e.g. 'agent:researcher'")
        return self


class ToolSpec(_Model):
    """A reference to a tool: a Python callable here; the gateway registry adds more sources."""

    impl: str | None = Field(default=None, description="'module:function' or 'builtin:NAME'.")
    version: str = "1"
    description: str | None = None
    side_effect: Literal["read", "write", "irreversible"] = "read"
    risk: Literal["low", "medium", "high"] = "low"
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None

    @field_validator("impl")
    @classmethod
    def _impl_shape(cls, value: str | None) -> str | None:
        if value is not None and ":" not in value:
            raise ValueError(f"impl {value!r} must look like 'package.module:function' or 'builtin:NAME'")
        return value


class ActionSpec(_Model):
    """A single call used for compensation: exactly one of tool or agent."""

    tool: str | None = None
    agent: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_target(self) -> ActionSpec:
        if (self.tool is None) == (self.agent is None):
            raise ValueError("a compensation names exactly one of tool or agent")
        return self


# --- steps ------------------------------------------------------------------


class _StepBase(_Model):
    id: Ident
    title: str | None = None
    input: dict[str, Any] | str | None = Field(
        default=None, description="Mapping of values; strings may hold ${{ expressions }}."
    )
    output_schema: dict[str, Any] | None = None
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    next: str | None = Field(default=None, description="Step id to go to next, or 'end'.")
    compensate: ActionSpec | None = None


class AgentStep(_StepBase):
    kind: Literal["agent"] = "agent"
    agent: Ident


class ToolStep(_StepBase):
    kind: Literal["tool"] = "tool"
    tool: str = Field(min_length=1)


class ApprovalStep(_StepBase):
    kind: Literal["approval"] = "approval"
    prompt: str = "Approve?"
    group: str | None = Field(default=None, description="Who may decide; any operator if unset.")
    sla: Duration | None = None
    on_timeout: Literal["fail", "escalate", "reject"] = "fail"
    escalate_to: str | None = None
    on_reject: Literal["fail", "continue"] = "fail"

    @model_validator(mode="after")
    def _escalation(self) -> ApprovalStep:
        if self.on_timeout == "escalate" and not self.escalate_to:
            raise ValueError("on_timeout: escalate needs escalate_to: GROUP")
        if self.on_timeout != "fail" and self.sla is None:
            raise ValueError(f"on_timeout: {self.on_timeout} needs an sla duration")
        return self


class Route(_Model):
    when: str = Field(min_length=1)
    goto: str = Field(min_length=1)


class RouteStep(_StepBase):
    kind: Literal["route"] = "route"
    routes: list[Route] = Field(min_length=1)
    default: str = Field(default="end", description="Step id taken when no route matches.")


class MapSpec(_Model):
    over: str = Field(min_length=1, description="Expression yielding a list.")
    item: Ident = "item"
    steps: list[Step] = Field(min_length=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class ParallelStep(_StepBase):
    kind: Literal["parallel"] = "parallel"
    branches: dict[Ident, list[Step]] | None = None
    map: MapSpec | None = None
    join: Literal["all", "any", "quorum"] = "all"
    quorum: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _shape(self) -> ParallelStep:
        if (self.branches is None) == (self.map is None):
            raise ValueError("a parallel step has exactly one of branches or map")
        if self.branches is not None and not self.branches:
            raise ValueError("branches must name at least one branch")
        if any(not steps for steps in (self.branches or {}).values()):
            raise ValueError("every branch needs at least one step")
        if self.join == "quorum" and self.quorum is None:
            raise ValueError("join: quorum needs quorum: N")
        if self.branches is not None and self.quorum is not None and self.quorum > len(self.branches):
            raise ValueError(f"quorum {self.quorum} exceeds the {len(self.branches)} branches")
        return self


class LoopStep(_StepBase):
    kind: Literal["loop"] = "loop"
    body: list[Step] = Field(min_length=1)
    until: str = Field(min_length=1, description="Expression checked after each iteration.")
    max_iterations: int = Field(default=3, ge=1, le=1000)
    on_exhausted: Literal["fail", "continue"] = "fail"


class DelegateStep(_StepBase):
    """A manager agent splits work into tasks for worker agents, then (optionally) combines."""

    kind: Literal["delegate"] = "delegate"
    manager: Ident
    workers: list[Ident] = Field(min_length=1)
    combine: Ident | None = None
    max_tasks: int = Field(default=20, ge=1, le=1000)


class WaitStep(_StepBase):
    kind: Literal["wait"] = "wait"
    event: str | None = None
    duration: Duration | None = None
    on_timeout: Literal["fail", "continue"] = "fail"

    @model_validator(mode="after")
    def _something_to_wait_for(self) -> WaitStep:
        if self.event is None and self.duration is None:
            raise ValueError("a wait step needs event: NAME, duration: DURATION, or both")
        return self


class SubworkflowStep(_StepBase):
    kind: Literal["subworkflow"] = "subworkflow"
    workflow: str = Field(min_length=1, description="A published workflow name or a spec file path.")
    version: int | None = Field(default=None, ge=1)


Step = Annotated[
    AgentStep
    | ToolStep
    | ApprovalStep
    | RouteStep
    | ParallelStep
    | LoopStep
    | DelegateStep
    | WaitStep
    | SubworkflowStep,
    Field(discriminator="kind"),
]

STEP_KINDS: tuple[str, ...] = (
    "agent",
    "tool",
    "approval",
    "route",
    "parallel",
    "loop",
    "delegate",
    "wait",
    "subworkflow",
)


class GovernanceSpec(_Model):
    """How the gateway treats this workflow's tool calls, on top of policy (which decides first)."""

    autonomy: AutonomyLevel = Field(
        default="approve_writes",
        description="Level for tool steps and the ceiling for agents: a level only tightens policy.",
    )
    risk_threshold: Literal["low", "medium", "high"] = Field(
        default="low", description="autonomous_low_risk runs writes at or below this risk."
    )
    approval_sla: Duration | None = Field(default=None, description="How long an approval may wait.")
    on_approval_timeout: Literal["escalate", "fail"] = "fail"
    escalate_to: str | None = Field(default=None, description="Group that gets an approval past its SLA.")
    approval_group: str | None = Field(
        default=None,
        description="Group that decides approvals the autonomy level asks for; a policy's "
        "@approval group takes precedence.",
    )

    @model_validator(mode="after")
    def _escalation_needs_group(self) -> GovernanceSpec:
        if self.on_approval_timeout == "escalate" and not self.escalate_to:
            raise ValueError("on_approval_timeout: escalate needs escalate_to: GROUP")
        return self


class WorkflowSpec(_Model):
    """A whole workflow: trigger(s) -> steps -> output, with owner, budget and KPIs."""

    name: str = Field(pattern=NAME_PATTERN, max_length=100)
    title: str | None = None
    description: str | None = None
    owner: Owner | None = None
    triggers: list[TriggerSpec] = Field(default_factory=lambda: [ManualTrigger()])  # type: ignore[arg-type]
    input_schema: dict[str, Any] | None = None
    output: dict[str, Any] | str | None = Field(
        default=None, description="Run output; defaults to the last step's output."
    )
    agents: dict[Ident, AgentSpec] = Field(default_factory=dict)
    tools: dict[str, ToolSpec] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    budget: BudgetSpec | None = None
    model: ModelName | None = Field(default=None, description="Default model of this workflow's llm agents.")
    model_prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Price overrides per model name (micro-dollars per 1M tokens)."
    )
    kpis: list[KPISpec] = Field(default_factory=list)
    concurrency: ConcurrencySpec = Field(default_factory=ConcurrencySpec)
    governance: GovernanceSpec = Field(default_factory=GovernanceSpec)
    labels: dict[str, str] = Field(default_factory=dict)


MapSpec.model_rebuild()
ParallelStep.model_rebuild()
LoopStep.model_rebuild()
WorkflowSpec.model_rebuild()


def iter_steps(steps: list[Step]) -> list[Step]:
    """Every step, nested ones included, depth first."""
    out: list[Step] = []
    for step in steps:
        out.append(step)
        for child in children(step):
            out.extend(iter_steps(child))
    return out


def children(step: Step) -> list[list[Step]]:
    """The nested step lists of a container step."""
    if isinstance(step, ParallelStep):
        if step.branches is not None:
            return list(step.branches.values())
        if step.map is not None:
            return [step.map.steps]
    if isinstance(step, LoopStep):
        return [step.body]
    return []
