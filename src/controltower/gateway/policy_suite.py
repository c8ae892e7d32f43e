"""Policy suites: YAML files of example tool calls and the decision each must get.

Policies are code, so they get tests. A suite names the policy directory, the tools (a file or
an inline list) and cases; ``run_suite`` loads the policies exactly as the gateway does and
checks every case, so ``tower policy test`` fails in CI when a policy change lets a prompt-injected
call through or stops a legitimate one::

    policies: ./policies        # a directory of .cedar files (or one file), relative to the suite
    tools: ./tools.yaml         # a list of tool definitions, or the list inline
    cases:
      - name: support agent may read tickets
        request: {agent: triage, workflow: support, tenant: acme, env: prod,
                  tool: helpdesk.get_ticket, args: {id: T-1}}
        expect: allow            # allow | deny | require_approval
        approval_group: null     # optional: checked when present, null included
        policy_ids: [reads]      # optional: the determining policies, in any order
        reason_contains: grants  # optional

A broken suite (bad YAML, unknown fields, an unknown tool) raises PolicySuiteError naming the
file, line and case; a case that gets another decision is a failed case, not an error.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from controltower.gateway.policy import PolicyDecision, PolicyEngine, PolicyRequest
from controltower.gateway.tools import Environment, ToolDefinition
from controltower.spec.errors import TowerError

MAX_SUITE_BYTES = 5 * 1024 * 1024


class PolicySuiteError(TowerError):
    """A suite or tools file cannot be used; lists every problem with file, line and case."""

    code = "policy_suite_invalid"

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        listing = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"{len(problems)} problem(s) in the policy suite:\n{listing}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteRequest(_Strict):
    tool: str = Field(min_length=1, description="Tool name, from the suite's tools.")
    agent: str | None = None
    workflow: str | None = None
    department: str | None = None
    tenant: str = "default"
    env: Environment = "dev"
    args: dict[str, Any] = Field(default_factory=dict)
    cost_so_far_cents: int = 0
    run_cost_cents: int = 0

    @model_validator(mode="after")
    def _has_principal(self) -> SuiteRequest:
        if self.agent is None and self.workflow is None:
            raise ValueError("a request names an `agent`, a `workflow`, or both")
        return self


class SuiteCase(_Strict):
    name: str = Field(min_length=1)
    request: SuiteRequest
    expect: Literal["allow", "deny", "require_approval"]
    approval_group: str | None = None
    policy_ids: list[str] | None = None
    reason_contains: str | None = None


class PolicySuite(_Strict):
    policies: str = Field(min_length=1, description="Directory of .cedar files (or one file).")
    tools: str | list[Any] = Field(description="A tools file, or the tool definitions inline.")
    cases: list[SuiteCase] = Field(min_length=1)


@dataclass(frozen=True)
class CaseResult:
    name: str
    line: int | None
    passed: bool
    decision: PolicyDecision
    failures: tuple[str, ...]
    explanation: str


@dataclass(frozen=True)
class SuiteResult:
    path: str
    cases: tuple[CaseResult, ...]
    warnings: tuple[str, ...] = ()

    @property
    def passed(self) -> int:
        return sum(case.passed for case in self.cases)

    @property
    def failed(self) -> int:
        return len(self.cases) - self.passed

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def render(self) -> str:
        """One line per case; failures with what differed and the engine's explanation."""
        lines = [f"warning: {warning}" for warning in self.warnings]
        for case in self.cases:
            where = f"{self.path}:{case.line}" if case.line else self.path
            lines.append(f"{'PASS' if case.passed else 'FAIL'} {case.name}")
            if not case.passed:
                lines += [f"  {where}: {failure}" for failure in case.failures]
                lines += [f"    {line}" for line in case.explanation.splitlines()]
        lines.append(f"{self.passed} passed, {self.failed} failed")
        return "\n".join(lines)


def run_suite(path: str | Path) -> SuiteResult:
    """Load the suite, its tools and policies, and check every case."""
    file = Path(path)
    tree = _load_yaml(file)
    suite = _validate(tree, file)
    base = file.parent
    if isinstance(suite.tools, str):
        tools_file = base / suite.tools
        tools_tree = _load_yaml(tools_file)
        items = tools_tree.get("tools") if isinstance(tools_tree, Mapping) else tools_tree
        prefix: list[Any] = ["tools"] if isinstance(tools_tree, Mapping) else []
        tools = _tools(items, tools_file, tools_tree, prefix)
    else:
        tools = _tools(tree["tools"], file, tree, ["tools"])
    by_name = {tool.name: tool for tool in tools}
    unknown = [
        f"{_where(file, tree, ['cases', n, 'request', 'tool'])}: case {case.name!r}: unknown tool "
        f"{case.request.tool!r} (the suite's tools: {', '.join(sorted(by_name)) or 'none'})"
        for n, case in enumerate(suite.cases)
        if case.request.tool not in by_name
    ]
    if unknown:
        raise PolicySuiteError(unknown)
    engine = _engine(base / suite.policies, tools, file)
    results = [
        _run_case(engine, case, by_name[case.request.tool], _line(tree, ["cases", n]))
        for n, case in enumerate(suite.cases)
    ]
    return SuiteResult(str(file), tuple(results), tuple(engine.warnings))


def _engine(where: Path, tools: list[ToolDefinition], suite: Path) -> PolicyEngine:
    if where.is_file():
        try:
            return PolicyEngine({where.name: where.read_text(encoding="utf-8")}, tools)
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicySuiteError([f"{where}: cannot read the policy file: {exc}"]) from None
    if not where.is_dir():
        raise PolicySuiteError([f"{suite}: policies: {where} is neither a directory nor a .cedar file"])
    return PolicyEngine.from_dir(where, tools)


def _run_case(engine: PolicyEngine, case: SuiteCase, tool: ToolDefinition, line: int | None) -> CaseResult:
    req = case.request
    request = PolicyRequest(
        tool=tool,
        agent=req.agent,
        workflow=req.workflow,
        department=req.department,
        tenant=req.tenant,
        env=req.env,
        args=req.args,
        cost_so_far_cents=req.cost_so_far_cents,
        run_cost_cents=req.run_cost_cents,
    )
    decision = engine.decide(request)
    failures = []
    if decision.effect != case.expect:
        failures.append(f"expected {case.expect}, got {decision.effect}: {decision.reason}")
    if "approval_group" in case.model_fields_set and decision.approval_group != case.approval_group:
        failures.append(f"expected approval group {case.approval_group!r}, got {decision.approval_group!r}")
    if case.policy_ids is not None and sorted(set(case.policy_ids)) != sorted(decision.policy_ids):
        got = ", ".join(decision.policy_ids) or "none"
        unknown = [pid for pid in case.policy_ids if pid not in engine.policies]
        note = f" ({', '.join(unknown)}: no such policy id)" if unknown else ""
        failures.append(f"expected policies {', '.join(case.policy_ids) or 'none'}{note}, got {got}")
    if case.reason_contains is not None and case.reason_contains not in decision.reason:
        failures.append(f"expected the reason to contain {case.reason_contains!r}, got {decision.reason!r}")
    explanation = engine.explain(request) if failures else ""
    return CaseResult(case.name, line, not failures, decision, tuple(failures), explanation)


# -- files ---------------------------------------------------------------------------


def _load_yaml(file: Path) -> Any:
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise PolicySuiteError([f"{file}: file not found"]) from None
    except OSError as exc:
        raise PolicySuiteError([f"{file}: cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_SUITE_BYTES:
        raise PolicySuiteError([f"{file}: larger than {MAX_SUITE_BYTES // (1024 * 1024)} MB"])
    try:
        return YAML(typ="rt").load(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise PolicySuiteError([f"{file}: not UTF-8 text"]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
        raise PolicySuiteError(
            [f"{where}: YAML syntax error: {(exc.problem or 'invalid YAML').strip()}"]
        ) from None
    except (YAMLError, RecursionError) as exc:
        raise PolicySuiteError([f"{file}: YAML error: {exc}"]) from None


def _validate(tree: Any, file: Path) -> PolicySuite:
    if not isinstance(tree, Mapping):
        raise PolicySuiteError([f"{file}: a suite is a mapping with `policies`, `tools` and `cases`"])
    try:
        return PolicySuite.model_validate(_plain(tree))
    except ValidationError as exc:
        raise PolicySuiteError(_problems(exc, tree, file)) from None


def _tools(items: Any, file: Path, tree: Any, prefix: list[Any]) -> list[ToolDefinition]:
    if not isinstance(items, list):
        raise PolicySuiteError([f"{_where(file, tree, prefix)}: expected a list of tool definitions"])
    tools, problems = [], []
    for n, item in enumerate(items):
        try:
            tools.append(ToolDefinition.model_validate(_plain(item)))
        except ValidationError as exc:
            name = item.get("name") if isinstance(item, Mapping) else None
            label = f"tool {name!r}" if isinstance(name, str) else f"tool #{n + 1}"
            for error in exc.errors(include_url=False):
                loc = [*prefix, n, *error["loc"]]
                field = ".".join(str(part) for part in error["loc"]) or "<tool>"
                message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
                problems.append(f"{_where(file, tree, loc)}: {label}: {field}: {message}")
    if problems:
        raise PolicySuiteError(problems)
    return tools


def _problems(exc: ValidationError, tree: Any, file: Path) -> list[str]:
    found: dict[tuple[str, str], list[str]] = {}  # (where, case + field) -> messages
    for error in exc.errors(include_url=False):
        loc = _clean_loc(list(error["loc"]), tree, error["type"] in ("missing", "extra_forbidden"))
        where = _where(file, tree, loc)
        case = ""
        if len(loc) > 1 and loc[0] == "cases" and isinstance(loc[1], int):
            node = _child(tree, loc[:2])
            name = node.get("name") if isinstance(node, Mapping) else None
            case = f"case {name!r}: " if isinstance(name, str) else f"case #{loc[1] + 1}: "
            loc = loc[2:]
        field = ".".join(str(part) for part in loc) or "<suite>"
        message = error["msg"].removeprefix("Value error, ")
        message = "unknown field" if error["type"] == "extra_forbidden" else message
        found.setdefault((where, f"{case}{field}"), []).append(message)
    # `tools: 5` fails as "not a string" and as "not a list": one problem, both alternatives.
    joined = {
        key: " or ".join([m[0], *(x.removeprefix("Input should be ") for x in m[1:])])
        for key, m in found.items()
    }
    return [f"{where}: {what}: {message}" for (where, what), message in joined.items()]


def _clean_loc(loc: list[Any], tree: Any, names_field: bool) -> list[Any]:
    """Drop the union member names pydantic puts in ``loc`` (``str``, ``list[any]``)."""
    out, node = [], tree
    for n, part in enumerate(loc):
        present = isinstance(node, Mapping) and part in node
        if isinstance(part, str) and not present and not (names_field and n == len(loc) - 1):
            continue
        out.append(part)
        node = _child(node, [part])
    return out


def _where(file: Path, tree: Any, loc: list[Any]) -> str:
    line = _line(tree, loc)
    return f"{file}:{line}" if line else str(file)


def _line(tree: Any, loc: list[Any]) -> int | None:
    """1-based line of the deepest node on ``loc`` that ruamel recorded a position for."""
    node, line = tree, None
    for part in loc:
        try:
            lc = node.lc
            line = (lc.key(part) if isinstance(node, Mapping) else lc.item(part))[0] + 1
            node = node[part]
        except (AttributeError, KeyError, IndexError, TypeError):
            break
    return line


def _child(tree: Any, loc: list[Any]) -> Any:
    for part in loc:
        try:
            tree = tree[part]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _plain(node: Any) -> Any:
    """ruamel round-trip values -> plain JSON-like data (dates stay as the text written)."""
    if isinstance(node, Mapping):
        return {str(key): _plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, dt.date):
        return node.isoformat()
    return str(node)


__all__ = [
    "CaseResult",
    "PolicySuite",
    "PolicySuiteError",
    "SuiteCase",
    "SuiteRequest",
    "SuiteResult",
    "run_suite",
]
