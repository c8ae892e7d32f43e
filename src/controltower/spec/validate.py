"""Semantic checks: what a schema cannot see, such as references, control flow and expressions.

The models guarantee shape; this module catches specs that are well formed but would fail,
loop forever or silently skip work at run time. It reports paths only, so it works the same
for YAML and the Python builder; the loader maps paths to lines.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from controltower.spec.errors import SpecIssue
from controltower.spec.expressions import FUNCTIONS, TEMPLATE
from controltower.spec.models import (
    ActionSpec,
    AgentStep,
    DelegateStep,
    LoopStep,
    ParallelStep,
    RouteStep,
    Step,
    ToolStep,
    WorkflowSpec,
)

PathPart = str | int

# Names the interpreter puts in front of every expression; `env` is reserved for settings.
ROOT_NAMES: frozenset[str] = frozenset({"input", "steps", "run", "env"})
END = "end"

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_PATH_TOKEN = re.compile(r'\.?([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')
_EXPR_HINT = "expressions are Python-like, e.g. steps.check.output.score >= 0.8 and input.tier == 'gold'"
_LOOP_HINT = (
    "repeat work with a `loop` step (kind: loop, body: [...], until: EXPR, max_iterations: N), "
    "which bounds the iterations"
)


def join_path(parts: Iterable[PathPart]) -> str:
    """``('steps', 2, 'routes', 0, 'goto')`` -> ``steps[2].routes[0].goto``; odd keys are quoted."""
    out: list[str] = []
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _PLAIN_KEY.fullmatch(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{json.dumps(part)}]")
    return "".join(out)


def split_path(path: str) -> list[PathPart]:
    """Inverse of :func:`join_path`, so issues carrying only a path can still be located."""
    parts: list[PathPart] = []
    pos = 0
    while pos < len(path):
        match = _PATH_TOKEN.match(path, pos)
        if match is None:
            break
        name, index, quoted = match.groups()
        parts.append(name if name is not None else int(index) if index is not None else json.loads(quoted))
        pos = match.end()
    return parts


def closest_hint(name: str, candidates: Iterable[str], what: str) -> str:
    """'did you mean X?' when something is close, else the list of what exists."""
    options = sorted(set(candidates))
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    if not options:
        return f"there are no {what}"
    shown = ", ".join(options[:15]) + (", ..." if len(options) > 15 else "")
    return f"known {what}: {shown}"


def semantic_issues(spec: WorkflowSpec, *, known_steps: Iterable[str] = ()) -> list[SpecIssue]:
    """Every semantic problem in ``spec``, all at once, each with a path (no file or line).

    ``known_steps`` are step ids that exist outside ``spec`` (in parts of a document that failed
    model validation), so expressions naming them are not reported a second time.
    """
    return _Checker(spec, known_steps).run()


class _Checker:
    def __init__(self, spec: WorkflowSpec, known_steps: Iterable[str]) -> None:
        self.spec = spec
        self.issues: list[SpecIssue] = []
        self.known_steps = set(known_steps)
        self.step_ids: set[str] = set()

    def add(self, parts: Sequence[PathPart], message: str, hint: str | None = None) -> None:
        self.issues.append(SpecIssue(path=join_path(parts), message=message, hint=hint))

    def run(self) -> list[SpecIssue]:
        spec = self.spec
        self._duplicates()
        self._walk(spec.steps, ["steps"], ROOT_NAMES)
        if spec.output is not None:
            self._templates(spec.output, ["output"], ROOT_NAMES)
        for i, kpi in enumerate(spec.kpis):
            self._expr(kpi.measure, ["kpis", i, "measure"], ROOT_NAMES | {"output"})
        for name, agent in spec.agents.items():
            # Rule agents see only their own payload, exactly as the rule runner provides it.
            for j, rule in enumerate(agent.rules):
                self._expr(rule.when, ["agents", name, "rules", j, "when"], {"input"})
                self._templates(rule.output, ["agents", name, "rules", j, "output"], {"input"})
            if agent.default is not None:
                self._templates(agent.default, ["agents", name, "default"], {"input"})
            self._schema(agent.output_schema, ["agents", name, "output_schema"])
            for j, used in enumerate(agent.tools):
                # `agent:<name>` makes another agent a tool of this one
                if used.startswith("agent:"):
                    other = used.removeprefix("agent:")
                    self._declared(other, spec.agents, ["agents", name, "tools", j], "agent")
                    if other == name:
                        self.add(["agents", name, "tools", j], f"agent {name!r} lists itself as a tool")
        for name, tool in spec.tools.items():
            self._schema(tool.input_schema, ["tools", name, "input_schema"])
            self._schema(tool.output_schema, ["tools", name, "output_schema"])
        self._schema(spec.input_schema, ["input_schema"])
        return self.issues

    # -- step ids and the step tree ---------------------------------------------

    def _duplicates(self) -> None:
        first: dict[str, list[PathPart]] = {}
        for step, parts in _steps_with_paths(self.spec.steps, ["steps"]):
            if step.id in first:
                self.add(
                    [*parts, "id"],
                    f"duplicate step id {step.id!r}",
                    "step ids are unique across the whole workflow; "
                    f"first used at {join_path(first[step.id])}",
                )
            else:
                first[step.id] = parts
        self.step_ids = set(first) | self.known_steps

    def _walk(self, steps: list[Step], parts: list[PathPart], names: frozenset[str]) -> None:
        self._flow(steps, parts)
        for i, step in enumerate(steps):
            here: list[PathPart] = [*parts, i]
            self._references(step, here)
            if step.input is not None:
                self._templates(step.input, [*here, "input"], names)
            if step.compensate is not None:
                # Compensations run after the fact at top level, with `this` = the original call.
                self._templates(step.compensate.input, [*here, "compensate", "input"], ROOT_NAMES | {"this"})
            self._schema(step.output_schema, [*here, "output_schema"])
            if isinstance(step, RouteStep):
                for j, route in enumerate(step.routes):
                    self._expr(route.when, [*here, "routes", j, "when"], names)
            elif isinstance(step, LoopStep):
                inner = names | {"loop"}
                self._expr(step.until, [*here, "until"], inner)
                self._walk(step.body, [*here, "body"], inner)
            elif isinstance(step, ParallelStep):
                if step.branches is not None:
                    for branch, branch_steps in step.branches.items():
                        self._walk(branch_steps, [*here, "branches", branch], names)
                if step.map is not None:
                    over = [*here, "map", "over"]
                    if "${{" in step.map.over:
                        self._templates(step.map.over, over, names)
                    else:
                        self._expr(step.map.over, over, names)
                    item_names = names | {step.map.item, "index"}
                    self._walk(step.map.steps, [*here, "map", "steps"], item_names)

    def _references(self, step: Step, here: list[PathPart]) -> None:
        agents, tools = self.spec.agents, self.spec.tools
        if isinstance(step, AgentStep):
            self._declared(step.agent, agents, [*here, "agent"], "agent")
        elif isinstance(step, ToolStep):
            self._declared(step.tool, tools, [*here, "tool"], "tool")
        elif isinstance(step, DelegateStep):
            self._declared(step.manager, agents, [*here, "manager"], "agent")
            for j, worker in enumerate(step.workers):
                self._declared(worker, agents, [*here, "workers", j], "agent")
            if step.combine is not None:
                self._declared(step.combine, agents, [*here, "combine"], "agent")
        action: ActionSpec | None = step.compensate
        if action is not None:
            if action.tool is not None:
                self._declared(action.tool, tools, [*here, "compensate", "tool"], "tool")
            if action.agent is not None:
                self._declared(action.agent, agents, [*here, "compensate", "agent"], "agent")

    def _declared(self, name: str, declared: Mapping[str, Any], parts: list[PathPart], what: str) -> None:
        if name not in declared:
            hint = closest_hint(name, declared, f"{what}s") if declared else f"declare it under `{what}s:`"
            self.add(parts, f"{what} {name!r} is not declared under `{what}s:`", hint)

    # -- control flow within one step list ----------------------------------------

    def _flow(self, steps: list[Step], parts: list[PathPart]) -> None:
        """Check next/goto targets, then cycles and dead steps if every target resolved."""
        index: dict[str, int] = {}
        for i, step in enumerate(steps):
            index.setdefault(step.id, i)
        sound = len(index) == len(steps)
        edges: list[list[int]] = []
        explicit: list[tuple[int, int, list[PathPart]]] = []  # (from, to, path of the field)
        for i, step in enumerate(steps):
            out: list[int] = []
            for target, field in _targets(step):
                where = [*parts, i, *field]
                if target == END:
                    continue
                if target not in index:
                    sound = False
                    hint = closest_hint(target, index, "step ids in this list") + "; or use 'end'"
                    self.add(where, f"{target!r} is not a step in the same list", hint)
                    continue
                out.append(index[target])
                explicit.append((i, index[target], where))
            if isinstance(step, RouteStep):
                if step.next is not None:
                    self.add(
                        [*parts, i, "next"],
                        "next is ignored on a route step",
                        "a route goes to the goto of the first matching route, else to `default`",
                    )
            elif step.next is None and i + 1 < len(steps):
                out.append(i + 1)
            edges.append(out)
        if not sound:
            return
        ids = [step.id for step in steps]
        for src, dst, where in explicit:
            # Every cycle has a backward jump; it is a cycle iff the jump's target leads back.
            if dst <= src and (path := _route_between(edges, dst, src)) is not None:
                chain = " -> ".join(repr(ids[k]) for k in [*path, dst])
                self.add(where, f"cycle without a loop: {chain}", _LOOP_HINT)
        # Only the head of a dead stretch is reported: the steps after it fall out of that fix.
        targeted = {dst for out in edges for dst in out}
        for i in range(1, len(steps)):
            if i in targeted:
                continue
            prev = steps[i - 1]
            why = (
                f"route {prev.id!r} goes only to its gotos and default (default is 'end' unless set)"
                if isinstance(prev, RouteStep)
                else f"{prev.id!r} continues to {prev.next!r}"
            )
            self.add(
                [*parts, i],
                f"step {ids[i]!r} can never run: nothing leads to it",
                f"{why}; name {ids[i]!r} in a goto, default or next, or remove it",
            )

    # -- expressions --------------------------------------------------------------

    def _templates(self, value: Any, parts: list[PathPart], names: frozenset[str] | set[str]) -> None:
        for sub, text in _strings(value, parts):
            for match in TEMPLATE.finditer(text):
                self._expr(match.group(1), sub, names)

    def _expr(self, expr: str, parts: list[PathPart], names: frozenset[str] | set[str]) -> None:
        if not expr.strip():
            self.add(parts, "empty expression", _EXPR_HINT)
            return
        try:
            tree = ast.parse(expr.strip(), mode="eval")
        except SyntaxError as exc:
            self.add(parts, f"cannot parse expression {expr!r}: {exc.msg}", _EXPR_HINT)
            return
        bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        reported: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                name = node.func.id
                if name not in FUNCTIONS and name not in bound and name not in reported:
                    reported.add(name)
                    hint = closest_hint(name, FUNCTIONS, "functions")
                    self.add(parts, f"expression {expr!r} calls unknown function {name!r}", hint)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Name) or not isinstance(node.ctx, ast.Load):
                continue
            name = node.id
            if name in names or name in bound or name in FUNCTIONS or name in reported:
                continue
            reported.add(name)
            self.add(
                parts,
                f"expression {expr!r} uses unknown name {name!r}",
                closest_hint(name, names, "names here"),
            )
        if "steps" in bound or "steps" not in names:
            return
        for step_id in _step_refs(tree):
            if step_id not in self.step_ids:
                hint = closest_hint(step_id, self.step_ids, "step ids")
                self.add(parts, f"expression {expr!r} refers to unknown step {step_id!r}", hint)

    # -- JSON Schema ----------------------------------------------------------------

    def _schema(self, schema: dict[str, Any] | None, parts: list[PathPart]) -> None:
        if schema is None:
            return
        from jsonschema import Draft7Validator, Draft202012Validator, exceptions, validators

        declared = schema.get("$schema")
        if declared is not None:
            # validator_for falls back to `default` for a $schema it does not know: comparing two
            # defaults tells unknown apart from known without the library's deprecation warning.
            known = isinstance(declared, str) and validators.validator_for(
                schema, default=Draft7Validator
            ) is validators.validator_for(schema, default=Draft202012Validator)
            if not known:
                self.add(
                    [*parts, "$schema"],
                    f"unknown JSON Schema dialect {declared!r}",
                    "use e.g. https://json-schema.org/draft/2020-12/schema, or leave $schema out",
                )
                return
        cls = validators.validator_for(schema, default=Draft202012Validator)
        try:
            cls.check_schema(schema)
        except exceptions.SchemaError as exc:
            where = [*parts, *(p for p in exc.path if isinstance(p, str | int))]
            message = exc.message if len(exc.message) <= 300 else exc.message[:297] + "..."
            self.add(
                where,
                f"invalid JSON Schema: {message}",
                "see https://json-schema.org/understanding-json-schema/",
            )


def _targets(step: Step) -> list[tuple[str, list[PathPart]]]:
    """Explicit jumps out of a step and the field each comes from."""
    if isinstance(step, RouteStep):
        found: list[tuple[str, list[PathPart]]] = [
            (route.goto, ["routes", j, "goto"]) for j, route in enumerate(step.routes)
        ]
        found.append((step.default, ["default"]))
        return found
    return [(step.next, ["next"])] if step.next is not None else []


def _route_between(edges: list[list[int]], start: int, goal: int) -> list[int] | None:
    """Shortest path start..goal (inclusive) along ``edges``, or None."""
    parent: dict[int, int | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while (prev := parent[path[-1]]) is not None:
                path.append(prev)
            return path[::-1]
        for nxt in edges[node]:
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def _steps_with_paths(steps: list[Step], parts: list[PathPart]) -> Iterator[tuple[Step, list[PathPart]]]:
    for i, step in enumerate(steps):
        here: list[PathPart] = [*parts, i]
        yield step, here
        if isinstance(step, LoopStep):
            yield from _steps_with_paths(step.body, [*here, "body"])
        elif isinstance(step, ParallelStep):
            for branch, branch_steps in (step.branches or {}).items():
                yield from _steps_with_paths(branch_steps, [*here, "branches", branch])
            if step.map is not None:
                yield from _steps_with_paths(step.map.steps, [*here, "map", "steps"])


def _strings(value: Any, parts: list[PathPart]) -> Iterator[tuple[list[PathPart], str]]:
    """Every string inside a JSON-like value with its path, so issues point at the exact key."""
    if isinstance(value, str):
        yield parts, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, [*parts, str(key)])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, [*parts, i])


def _step_refs(tree: ast.AST) -> list[str]:
    """Step ids read as steps.X, steps["X"] or get(steps, "X")."""
    found: list[str] = []

    def is_steps(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == "steps"

    for node in ast.walk(tree):
        ref: object = None
        if isinstance(node, ast.Attribute) and is_steps(node.value):
            ref = node.attr
        elif (
            isinstance(node, ast.Subscript) and is_steps(node.value) and isinstance(node.slice, ast.Constant)
        ):
            ref = node.slice.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "get"
            and len(node.args) >= 2
            and is_steps(node.args[0])
            and isinstance(node.args[1], ast.Constant)
        ):
            ref = node.args[1].value
        if isinstance(ref, str) and ref not in found:
            found.append(ref)
    return found
