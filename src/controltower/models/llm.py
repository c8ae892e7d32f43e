"""The LLM agent loop: pydantic-ai's Agent over a durable, metered model chain.

Tools are the agent's gateway tools (every call is ``ctx.call_tool``: a denial comes back to
the model as the tool's result) and other agents (``agent:<name>``), run as tools under their
own name so the gateway applies their grants. Structured output is checked with jsonschema
against ``output_schema``; a wrong answer is sent back to the model with the errors, at most
``output_retries`` times, then the step fails with ``invalid_output``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from jsonschema import Draft202012Validator
from pydantic_ai import Agent, ModelRetry, RunContext, StructuredDict, Tool
from pydantic_ai.exceptions import (
    FallbackExceptionGroup,
    ModelAPIError,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
)
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models import Model
from pydantic_ai.models.fallback import FallbackModel

from controltower.engine.context import StepContext
from controltower.gateway.budgets import BudgetLedger, BudgetPolicy, budget_scopes
from controltower.models.calls import ModelCallLog
from controltower.models.durable import (
    BudgetFallback,
    CallSite,
    CallState,
    DurableModel,
    MeteredModel,
    ModelTimeoutError,
)
from controltower.models.errors import (
    InvalidModelOutputError,
    ModelBudgetExceededError,
    ModelConfigError,
    ModelUnavailableError,
)
from controltower.models.prices import PriceTable
from controltower.models.registry import build_model
from controltower.spec.errors import StepFailure
from controltower.spec.models import AgentSpec, WorkflowSpec

log = logging.getLogger("controltower.models")
DEFAULT_TIMEOUT = 60.0
MAX_AGENT_DEPTH = 4
SubAgent = Callable[[str, Any, StepContext], Awaitable[Any]]
_installed: dict[str, None] = {}  # budget scopes whose caps this process installed (bounded)


def model_chain(primary: str, agent: AgentSpec, spec: WorkflowSpec | None) -> list[str]:
    """The primary model, its error fallbacks, then the budget's cheaper fallback model."""
    chain = [primary, *agent.fallback_models]
    budget = agent.budget or (spec.budget if spec is not None else None)
    if budget is not None and budget.on_exceed == "fallback" and budget.fallback_model:
        chain.append(budget.fallback_model)
    return list(dict.fromkeys(chain))


async def call_site(ctx: StepContext, spec: WorkflowSpec | None, name: str, agent: AgentSpec) -> CallSite:
    store = ctx.store
    ledger: BudgetLedger | None = None
    gateway = getattr(ctx.gate, "gateway", None)
    if gateway is not None:
        store = store or gateway.store
        ledger = gateway.budgets
    if store is not None and ledger is None:
        ledger = BudgetLedger(store)
    if store is None:
        _warn_unrecorded()
    department = spec.owner.team if spec is not None and spec.owner else None
    scopes = budget_scopes(ctx.tenant, department=department, workflow=ctx.workflow, run=ctx.run_id)
    if agent.budget is not None:
        scopes.insert(0, f"run:{ctx.run_id}/agent:{name}")
    budget = agent.budget or (spec.budget if spec is not None else None)
    prices = PriceTable.default().with_prices(spec.model_prices if spec is not None else {})
    if ledger is not None:
        await _install_caps(ledger, ctx, spec, name, agent)
    return CallSite(
        run_id=ctx.run_id,
        step_key=ctx.step_key,
        tenant=ctx.tenant,
        workflow=ctx.workflow,
        agent=name,
        scopes=scopes,
        prices=prices,
        policy=BudgetPolicy.from_spec(budget),
        store=store,
        ledger=ledger,
        log=ModelCallLog(store) if store is not None else None,
        audit=gateway.audit if gateway is not None else None,
    )


async def _install_caps(
    ledger: BudgetLedger, ctx: StepContext, spec: WorkflowSpec | None, name: str, agent: AgentSpec
) -> None:
    """The spec's caps on this run (and this agent in it); set_cap is idempotent."""
    wanted = []
    if spec is not None and spec.budget is not None:
        wanted.append((f"run:{ctx.run_id}", BudgetPolicy.from_spec(spec.budget)))
    if agent.budget is not None:
        wanted.append((f"run:{ctx.run_id}/agent:{name}", BudgetPolicy.from_spec(agent.budget)))
    for scope, policy in wanted:
        if f"{ctx.tenant}|{scope}" in _installed:
            continue
        await policy.install(ledger, ctx.tenant, scope)
        _installed[f"{ctx.tenant}|{scope}"] = None
        if len(_installed) > 10_000:
            _installed.pop(next(iter(_installed)))


@functools.cache
def _warn_unrecorded() -> None:
    log.warning(
        "model calls are not recorded and not charged: the step context reaches no store "
        "(an engine without a tool gateway that does not pass its store to steps)"
    )


def tool_name_for_model(name: str) -> str:
    """Model APIs accept ``[A-Za-z0-9_-]{1,64}`` as tool names."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)[:64]


async def _gateway_tool(name: str, spec: WorkflowSpec | None, ctx: StepContext) -> Tool[Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": True}
    description = f"Tool {name}."
    declared = spec.tools.get(name) if spec is not None else None
    if declared is not None:
        schema = declared.input_schema or schema
        description = declared.description or description
    else:
        registry = getattr(getattr(ctx.gate, "gateway", None), "registry", None)
        if registry is not None:
            try:
                found = await registry.resolve(name, None, tenant=ctx.tenant)
                schema, description = found.input_schema or schema, found.description or description
            except Exception:  # unknown or unavailable: the gateway says so when the model calls it
                pass

    async def run(run_ctx: RunContext[Any], **args: Any) -> dict[str, Any]:
        reasoning = _reasoning(run_ctx.messages)
        if reasoning:  # what the model said before asking: shown to an approver
            return await ctx.call_tool(name, args, reasoning=reasoning)
        return await ctx.call_tool(name, args)

    return Tool.from_schema(
        run, tool_name_for_model(name), description, schema, takes_ctx=True, sequential=True
    )


def _reasoning(messages: list[ModelMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, ModelResponse):
            text = " ".join(p.content for p in message.parts if isinstance(p, TextPart)).strip()
            return text[:2000]
    return ""


def _agent_tool(sub: str, spec: WorkflowSpec | None, ctx: StepContext, sub_agent: SubAgent) -> Tool[Any]:
    target = spec.agents.get(sub) if spec is not None else None
    if target is None:
        raise StepFailure(f"tools lists agent:{sub}, but agent {sub!r} is not declared in this workflow")
    if ctx.step_key.count(">") >= MAX_AGENT_DEPTH:
        raise StepFailure(f"agents call agents more than {MAX_AGENT_DEPTH} deep (agent:{sub})")
    schema = target.input_schema or {"type": "object", "additionalProperties": True}
    description = target.role or target.instructions or f"Ask agent {sub}."
    count = 0

    async def run(**payload: Any) -> dict[str, Any]:
        nonlocal count
        count += 1
        child = dataclasses.replace(ctx, agent=sub, step_key=f"{ctx.step_key}>{sub}#{count}", _calls=0)
        try:
            result = await sub_agent(sub, payload, child)
        except StepFailure as exc:
            return {"status": "error", "agent": sub, "code": exc.code, "reason": str(exc)}
        return {"status": "ok", "agent": sub, "output": result}

    return Tool.from_schema(run, tool_name_for_model(f"agent_{sub}"), description, schema, sequential=True)


def _instructions(name: str, agent: AgentSpec) -> str:
    lines = [f"You are {agent.role}." if agent.role else f"You are the agent {name!r}."]
    if agent.instructions:
        lines.append(agent.instructions.strip())
    lines.append(
        "The user message holds your input as JSON. A tool result with status 'denied', 'drafted' or "
        "'error' means the call did not happen: do not insist, continue with what you have."
    )
    return "\n\n".join(lines)


def _output_type(schema: dict[str, Any] | None) -> tuple[Any, Callable[[Any], Any]]:
    if schema is None:
        return str, lambda text: {"text": text}
    if schema.get("type") == "object":
        return StructuredDict(schema, name="final_result"), lambda value: dict(value)
    wrapped = {"type": "object", "properties": {"result": schema}, "required": ["result"]}
    return StructuredDict(wrapped, name="final_result"), lambda value: value["result"]


async def run_llm_agent(
    name: str,
    agent: AgentSpec,
    spec: WorkflowSpec | None,
    model_name: str,
    payload: Any,
    ctx: StepContext,
    sub_agent: SubAgent,
) -> Any:
    site = await call_site(ctx, spec, name, agent)
    state = CallState()
    timeout = agent.timeout or DEFAULT_TIMEOUT
    members: list[Model] = [
        MeteredModel(n, build_model(n), site, state, timeout=timeout, max_tokens=agent.max_tokens)
        for n in model_chain(model_name, agent, spec)
    ]
    chain: Model = members[0]
    if len(members) > 1:
        chain = FallbackModel(*members, fallback_on=(ModelAPIError, ModelTimeoutError, BudgetFallback))
    model = DurableModel(chain, site, state)

    gateway_tools = [t for t in agent.tools if not t.startswith("agent:")]
    if gateway_tools and ctx.gate is None:
        raise StepFailure(
            f"agent {name!r} lists tools ({', '.join(gateway_tools)}) but this engine has no tool gateway",
            hint="agents call tools only through the gateway: add a policies/ folder beside the workflow "
            "(or --policies DIR / TOWER_POLICIES)",
        )
    tools: list[Tool[Any]] = []
    for entry in agent.tools:
        if entry.startswith("agent:"):
            tools.append(_agent_tool(entry.removeprefix("agent:"), spec, ctx, sub_agent))
        else:
            tools.append(await _gateway_tool(entry, spec, ctx))
    output_type, unwrap = _output_type(agent.output_schema)
    runner: Agent[None, Any] = Agent(
        model,
        output_type=output_type,
        instructions=_instructions(name, agent),
        retries={"output": agent.output_retries, "tools": agent.output_retries},
        tools=tools,
        name=name,
    )
    last_problem: list[str] = []
    if agent.output_schema is not None:
        validator = Draft202012Validator(agent.output_schema)

        @runner.output_validator
        def _check(value: Any) -> Any:
            errors = sorted(validator.iter_errors(unwrap(value)), key=lambda e: list(e.absolute_path))
            if errors:
                problems = [
                    f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:5]
                ]
                last_problem[:] = problems
                raise ModelRetry(
                    "Your output does not match the required JSON schema: " + "; ".join(problems)
                )
            return value

    prompt = "Input:\n" + json.dumps(payload, indent=2, ensure_ascii=False, default=str)
    settings: Any = {"max_tokens": agent.max_tokens} if agent.max_tokens else None
    try:
        result = await runner.run(prompt, model_settings=settings)
    except FallbackExceptionGroup as group:
        raise _chain_failed(model_name, list(group.exceptions)) from None
    except (ModelAPIError, ModelTimeoutError) as exc:
        raise _chain_failed(model_name, [exc]) from None
    except UsageLimitExceeded as exc:
        raise StepFailure(
            f"agent {name!r} stopped: {exc}", hint="the model keeps calling tools; tighten its instructions"
        ) from None
    except UnexpectedModelBehavior as exc:
        detail = f" (last problem: {'; '.join(last_problem)})" if last_problem else ""
        raise InvalidModelOutputError(
            f"agent {name!r}: the model gave no valid output after {agent.output_retries} re-asks: "
            f"{exc}{detail}",
            hint="make the instructions and output_schema clearer, raise output_retries, "
            "or use a stronger model",
        ) from None
    return unwrap(result.output)


def _chain_failed(model_name: str, errors: list[BaseException]) -> StepFailure:
    if errors and all(isinstance(e, BudgetFallback | ModelBudgetExceededError) for e in errors):
        last = errors[-1]
        return ModelBudgetExceededError(f"every model is over budget: {last}")
    if any(isinstance(e, ModelConfigError) for e in errors):
        return next(e for e in errors if isinstance(e, ModelConfigError))
    summary = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
    return ModelUnavailableError(
        f"model {model_name} (and its fallbacks) failed: {summary}",
        hint="check the model server and its environment (API key, base URL), or add fallback_models",
    )
