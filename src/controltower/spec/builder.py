"""A thin fluent builder for workflows authored in Python.

It only assembles the same plain data a YAML file holds and validates it through the same
loader path, so a built spec equals its YAML twin and fails with the same SpecError issues.
Unset options are left out rather than sent as None, so model defaults apply exactly as
they would for a YAML key that is not written.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

from controltower.spec.loader import load_spec_data
from controltower.spec.models import WorkflowSpec

StepData = dict[str, Any]


def _clean(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _step(step_id: str, kind: str, options: Mapping[str, Any], **fields: Any) -> StepData:
    return _clean(id=step_id, kind=kind, **fields, **options)


class Workflow:
    """Collects a workflow's parts; :meth:`build` validates them into a WorkflowSpec."""

    def __init__(
        self,
        name: str,
        *,
        owner: str | Mapping[str, Any] | None = None,
        title: str | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        team = {"team": owner} if isinstance(owner, str) else owner
        self._data: dict[str, Any] = _clean(
            name=name, title=title, description=description, owner=team, **fields
        )

    def _put(self, section: str, name: str, value: dict[str, Any]) -> Self:
        self._data.setdefault(section, {})[name] = value
        return self

    def _append(self, section: str, values: Iterable[Any]) -> Self:
        self._data.setdefault(section, []).extend(values)
        return self

    def agent(self, name: str, *, kind: str, **fields: Any) -> Self:
        return self._put("agents", name, _clean(kind=kind, **fields))

    def tool(self, name: str, **fields: Any) -> Self:
        return self._put("tools", name, _clean(**fields))

    def trigger(self, kind: str, **fields: Any) -> Self:
        return self._append("triggers", [_clean(kind=kind, **fields)])

    def step(self, *steps: StepData) -> Self:
        return self._append("steps", steps)

    def kpi(self, name: str, measure: str, **fields: Any) -> Self:
        return self._append("kpis", [_clean(name=name, measure=measure, **fields)])

    def set(self, **fields: Any) -> Self:
        """Any other top-level field: input_schema, output, budget, concurrency, labels..."""
        self._data.update(_clean(**fields))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The spec as the plain data a YAML file would hold (a copy; safe to dump)."""
        return copy.deepcopy(self._data)

    def build(self) -> WorkflowSpec:
        """Validate like the loader does (model, then semantics); raises SpecError with all issues."""
        return load_spec_data(self.to_dict())


# -- step constructors: each returns the plain mapping of one step ----------------------


def agent_step(step_id: str, agent: str, *, input: Any = None, **options: Any) -> StepData:
    return _step(step_id, "agent", options, agent=agent, input=input)


def tool_step(step_id: str, tool: str, *, input: Any = None, **options: Any) -> StepData:
    return _step(step_id, "tool", options, tool=tool, input=input)


def approval(step_id: str, prompt: str | None = None, **options: Any) -> StepData:
    return _step(step_id, "approval", options, prompt=prompt)


def route(
    step_id: str,
    routes: Sequence[tuple[str, str]] | Mapping[str, str],
    *,
    default: str | None = None,
    **options: Any,
) -> StepData:
    """``routes`` is ``[(when, goto), ...]`` or ``{when: goto}``; the first match wins."""
    pairs = routes.items() if isinstance(routes, Mapping) else routes
    return _step(
        step_id,
        "route",
        options,
        routes=[{"when": when, "goto": goto} for when, goto in pairs],
        default=default,
    )


def parallel(
    step_id: str,
    branches: Mapping[str, Sequence[StepData]] | None = None,
    *,
    map_over: str | None = None,
    steps: Sequence[StepData] | None = None,
    item: str | None = None,
    max_concurrency: int | None = None,
    **options: Any,
) -> StepData:
    """Either named ``branches`` or a map: ``map_over=EXPR, steps=[...]`` run once per item."""
    fan_out = None
    if map_over is not None or steps is not None:
        fan_out = _clean(
            over=map_over,
            item=item,
            steps=list(steps) if steps is not None else None,
            max_concurrency=max_concurrency,
        )
    named = {name: list(branch) for name, branch in branches.items()} if branches is not None else None
    return _step(step_id, "parallel", options, branches=named, map=fan_out)


def loop(
    step_id: str,
    body: Sequence[StepData],
    *,
    until: str,
    max_iterations: int | None = None,
    **options: Any,
) -> StepData:
    return _step(step_id, "loop", options, body=list(body), until=until, max_iterations=max_iterations)


def delegate(
    step_id: str,
    manager: str,
    workers: Sequence[str],
    *,
    combine: str | None = None,
    **options: Any,
) -> StepData:
    return _step(step_id, "delegate", options, manager=manager, workers=list(workers), combine=combine)


def wait(
    step_id: str,
    *,
    event: str | None = None,
    duration: float | str | None = None,
    **options: Any,
) -> StepData:
    return _step(step_id, "wait", options, event=event, duration=duration)


def subworkflow(step_id: str, workflow: str, *, version: int | None = None, **options: Any) -> StepData:
    return _step(step_id, "subworkflow", options, workflow=workflow, version=version)
