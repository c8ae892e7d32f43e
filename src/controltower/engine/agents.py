"""Agents as step implementations: python callables and declarative rules.

LLM and remote agents are declared in specs today and run once model providers
land; until then a run that reaches one fails with a clear, non-retryable error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from controltower.engine.callables import resolve
from controltower.engine.context import StepContext
from controltower.engine.payloads import check_schema
from controltower.spec import expressions
from controltower.spec.errors import StepFailure
from controltower.spec.models import AgentSpec, WorkflowSpec

AgentCall = Callable[[Any, StepContext], Awaitable[Any]]


def agent_call(spec: WorkflowSpec, name: str, base_dir: str | None) -> AgentCall:
    agent = spec.agents.get(name)
    if agent is None:
        raise StepFailure(f"agent {name!r} is not declared in workflow {spec.name!r}")
    inner = _implementation(agent, name, base_dir)

    async def call(payload: Any, ctx: StepContext) -> Any:
        out = await inner(payload, ctx)
        check_schema(out, agent.output_schema, f"output of agent {name!r}")
        return out

    return call


def _implementation(agent: AgentSpec, name: str, base_dir: str | None) -> AgentCall:
    if agent.kind == "python":
        assert agent.impl is not None
        return resolve(agent.impl, base_dir).__call__
    if agent.kind == "rule":
        return _rule_agent(agent, name)
    raise StepFailure(
        f"agent {name!r} is a {agent.kind} agent; this build runs python and rule agents only",
        hint="use kind: python or kind: rule, or install a release with model providers",
    )


def _rule_agent(agent: AgentSpec, name: str) -> AgentCall:
    async def call(payload: Any, ctx: StepContext) -> Any:
        names = {"input": payload}
        for rule in agent.rules:
            if expressions.evaluate(rule.when, names):
                return expressions.render(rule.output, names)
        if agent.default is not None:
            return expressions.render(agent.default, names)
        raise StepFailure(f"no rule of agent {name!r} matched and it has no default")

    return call
