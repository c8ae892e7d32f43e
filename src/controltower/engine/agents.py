"""Agents as step implementations: python callables, declarative rules, LLMs and remote endpoints.

Every kind takes the step's payload (checked against the agent's ``input_schema``: a handoff
carries a structured payload) and returns an output checked against ``output_schema``.

- ``llm``: pydantic-ai over the configured model (``controltower.models``); tools only through
  the gateway; other agents as tools (``agent:<name>``). With no model configured, the agent's
  ``offline`` callable runs instead, with the same output contract.
- ``remote``: the payload is POSTed as JSON to ``endpoint``; the response body is the output.
  (A2A is not spoken: no maintained SDK makes it a small addition yet.)
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from controltower.engine.callables import resolve
from controltower.engine.context import StepContext
from controltower.engine.payloads import check_schema
from controltower.spec import expressions
from controltower.spec.errors import StepFailure
from controltower.spec.models import AgentSpec, WorkflowSpec

AgentCall = Callable[[Any, StepContext], Awaitable[Any]]
REMOTE_TIMEOUT = 30.0


def agent_call(spec: WorkflowSpec, name: str, base_dir: str | None) -> AgentCall:
    agent = spec.agents.get(name)
    if agent is None:
        raise StepFailure(f"agent {name!r} is not declared in workflow {spec.name!r}")
    inner = _implementation(spec, agent, name, base_dir)

    async def call(payload: Any, ctx: StepContext) -> Any:
        check_schema(payload, agent.input_schema, f"input of agent {name!r}")
        out = await inner(payload, ctx)
        check_schema(out, agent.output_schema, f"output of agent {name!r}")
        return out

    return call


def _implementation(spec: WorkflowSpec, agent: AgentSpec, name: str, base_dir: str | None) -> AgentCall:
    if agent.kind == "python":
        assert agent.impl is not None
        return resolve(agent.impl, base_dir).__call__
    if agent.kind == "rule":
        return _rule_agent(agent, name)
    if agent.kind == "remote":
        return _remote_agent(agent, name)
    return _llm_agent(spec, agent, name, base_dir)


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


def _llm_agent(spec: WorkflowSpec, agent: AgentSpec, name: str, base_dir: str | None) -> AgentCall:
    from controltower.models.errors import ModelNotConfiguredError
    from controltower.models.registry import configured_model, require_llm

    async def sub_agent(sub: str, payload: Any, ctx: StepContext) -> Any:
        return await agent_call(spec, sub, base_dir)(payload, ctx)

    async def call(payload: Any, ctx: StepContext) -> Any:
        model = configured_model(agent, spec)
        if model is None:
            if agent.offline is not None:
                return await resolve(agent.offline, base_dir)(payload, ctx)
            raise ModelNotConfiguredError(
                f"llm agent {name!r} has no model",
                hint="set model: on the agent or the workflow, or TOWER_MODEL (e.g. openai:gpt-4o-mini); "
                "or give the agent offline: 'module:function'",
            )
        require_llm()
        from controltower.models.llm import run_llm_agent

        return await run_llm_agent(name, agent, spec, model, payload, ctx, sub_agent)

    return call


def _remote_agent(agent: AgentSpec, name: str) -> AgentCall:
    from controltower.models.errors import RemoteAgentError

    assert agent.endpoint is not None
    endpoint = agent.endpoint
    timeout = agent.timeout or REMOTE_TIMEOUT

    async def call(payload: Any, ctx: StepContext) -> Any:
        headers = {"Idempotency-Key": ctx.idempotency_key, "Accept": "application/json"}
        if agent.auth_env:
            token = os.environ.get(agent.auth_env)
            if not token:
                raise RemoteAgentError(
                    f"remote agent {name!r} needs a token in ${agent.auth_env}, which is not set",
                    hint=f"export {agent.auth_env}=...",
                )
            headers["Authorization"] = f"Bearer {token}"
        body = {
            "agent": name,
            "input": payload,
            "run_id": ctx.run_id,
            "step": ctx.step_key,
            "workflow": ctx.workflow,
            "tenant": ctx.tenant,
        }
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.post(endpoint, json=body, headers=headers)
        except httpx.TimeoutException:
            raise RemoteAgentError(
                f"remote agent {name!r} did not answer within {timeout}s", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise RemoteAgentError(
                f"remote agent {name!r} at {endpoint} is unreachable: {type(exc).__name__}", retryable=True
            ) from None
        if response.status_code >= 400:
            retry = response.status_code >= 500 or response.status_code in (408, 429)
            raise RemoteAgentError(
                f"remote agent {name!r} answered HTTP {response.status_code}: {response.text[:300]}",
                retryable=retry,
            )
        try:
            return response.json()
        except ValueError:
            raise RemoteAgentError(
                f"remote agent {name!r} answered {response.headers.get('content-type', 'no content type')}, "
                "not JSON",
                hint="the endpoint must answer with a JSON body: the agent's output",
            ) from None

    return call
