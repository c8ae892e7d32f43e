"""Cedar policy layer of the tool gateway: who may call which tool, where, and with whose approval.

Entity model (the Cedar schema is generated from the registered tools, and every policy file is
validated against it when loaded, so typos fail at load time, not at 3 a.m.):

* principal: ``Agent::"<agent>"`` (parents ``Workflow``, ``Department``, ``Tenant``), or
  ``Workflow::"<workflow>"`` itself for a workflow-level tool step with no agent.
* action: ``Action::"<tool name>"``, a member of its side-effect group ``Action::"read"``,
  ``Action::"write"`` or ``Action::"irreversible"`` (the groups do not nest).
* resource: ``Tool::"<tool name>"`` with ``owner``, ``version``, ``side_effect``, ``risk``,
  ``risk_level`` (0..3) and ``tags`` (Set<String>).
* context: ``args``, ``env``, ``risk_level``, ``side_effect``, ``cost_so_far_cents``,
  ``run_cost_cents`` (money is integer cents: Cedar has no floats), ``tenant``, ``workflow`` and
  ``agent`` (``""`` when there is none).

``context.args`` is typed per action from the tool's JSON Schema. Cedar has no "any" type (open
records are not supported by its validator), and typed arguments are what make an argument
policy checkable: ``context.args.amount > "ten"`` or a misspelt argument fails at load time.
Properties map where the mapping is exact: string/enum -> String, integer -> Long, boolean ->
Boolean, number -> decimal (rounded to Cedar's 4 places), array -> Set, object with properties ->
Record; optional properties must be guarded with ``has``. Other properties (unions, free-form
objects) are left out, so policies cannot refer to them. At decision time the arguments are
projected onto that type: a value of the wrong type or a missing required argument denies the
call (it would otherwise be an argument a ``has`` guard silently skips).

Baseline rules on top of Cedar, so that the safe thing is the default:

1. No grant means deny, and forbid always wins (Cedar's own semantics).
2. A policy that fails to evaluate denies the call. Cedar skips an erroring policy, which for a
   ``forbid`` would quietly allow; here any evaluation error is a deny that names the policy.
3. Write and irreversible tools need an explicit grant: a ``permit`` whose action scope is
   unconstrained grants reads only. Name the tool, its group or a list containing either.
4. ``@approval("group")`` on a permit grants the call only with that group's approval; a call is
   allowed outright when one of the permits that grant it has no ``@approval``.
5. In ``prod``, an irreversible tool always needs approval, even when a permit allows it outright
   (group: its permits' ``@approval`` if any, else the engine's default, ``approvers``).

Policy ids are the ``@id("...")`` annotation, else ``<file>#<n>`` (n counts from 1 in the file);
``@reason("...")`` on a forbid is quoted in the deny. Templates (``?principal``) are rejected.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import cedarpy

from controltower.gateway.tools import RISK_ORDER, ToolDefinition
from controltower.spec.errors import TowerError

Effect = Literal["allow", "deny", "require_approval"]
GROUPS: tuple[str, ...] = ("read", "write", "irreversible")
PRINCIPAL_TYPES: tuple[str, ...] = ("Agent", "Workflow")
DEFAULT_APPROVAL_GROUP = "approvers"
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_DECIMAL_MAX = Decimal(_LONG_MAX) / 10_000
_MAX_SCHEMA_DEPTH = 16
_Who = tuple[str | None, str | None, str | None, str]  # agent, workflow, department, tenant
_ToolKey = tuple[str, str, str, str, str, tuple[str, ...]]
_NO_ACTION = "unable to find an applicable action given the policy scope constraints"
_SCOPE_HINT = "principals are Agent or Workflow, resources are Tool, actions are tools or their groups"


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file (or in the tool list the schema is built from)."""

    message: str
    file: str | None = None
    line: int | None = None
    policy_id: str | None = None
    hint: str | None = None

    def render(self) -> str:
        where = (self.file or "<policies>") + (f":{self.line}" if self.line is not None else "")
        text = f"{where}: " + (f"policy {self.policy_id}: " if self.policy_id else "") + self.message
        return f"{text} (hint: {self.hint})" if self.hint else text


class PolicyError(TowerError):
    """Policies failed to load; carries every problem found, each with its file and line."""

    code = "policy_invalid"

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        listing = "\n".join(f"  {issue.render()}" for issue in issues)
        super().__init__(f"{len(issues)} problem(s) in the policies:\n{listing}")


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    tool: ToolDefinition
    agent: str | None
    workflow: str | None
    department: str | None
    tenant: str
    env: str
    args: dict[str, Any]
    cost_so_far_cents: int = 0
    run_cost_cents: int = 0

    @property
    def principal(self) -> str:
        """The principal in Cedar syntax, as decisions and explanations name it."""
        kind, name = ("Agent", self.agent) if self.agent is not None else ("Workflow", self.workflow)
        return f"{kind}::{json.dumps(name)}" if name is not None else "<no principal>"


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    effect: Effect
    policy_ids: tuple[str, ...] = ()
    approval_group: str | None = None
    reason: str = ""
    errors: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """What the engine needs to know about one loaded policy besides what Cedar evaluates."""

    id: str
    file: str
    line: int | None
    effect: Literal["permit", "forbid"]
    any_action: bool  # action scope unconstrained: grants reads only (baseline rule 3)
    actions: frozenset[str]  # action ids named in the scope (tools or groups)
    approval: str | None
    note: str | None  # the @reason annotation, quoted in decisions

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


class _ArgsError(Exception):
    pass


# -- the schema ---------------------------------------------------------------------


def cedar_schema(tools: Iterable[ToolDefinition]) -> dict[str, Any]:
    """The Cedar schema (JSON form) for these tools; raises PolicyError when tools conflict."""
    by_name, issues = _index_tools(tools)
    if issues:
        raise PolicyError(issues)
    return _schema(by_name)


def _index_tools(tools: Iterable[ToolDefinition]) -> tuple[dict[str, ToolDefinition], list[PolicyIssue]]:
    by_name: dict[str, ToolDefinition] = {}
    issues: list[PolicyIssue] = []
    for tool in tools:
        if tool.name in GROUPS:
            hint = "rename the tool; read, write and irreversible are the side-effect action groups"
            issues.append(PolicyIssue(f"tool name {tool.name!r} is reserved", hint=hint))
            continue
        seen = by_name.get(tool.name)
        if seen is not None and seen.side_effect != tool.side_effect:
            message = f"tool {tool.name!r} has versions with different side effects ({seen.side_effect}, "
            message += f"{tool.side_effect}); one action cannot be in both groups"
            issues.append(PolicyIssue(message, hint="give the tool with the new side effect a new name"))
            continue
        by_name[tool.name] = tool
    return by_name, issues


def _schema(by_name: Mapping[str, ToolDefinition]) -> dict[str, Any]:
    string, long = {"type": "String"}, {"type": "Long"}
    tool_attrs: dict[str, Any] = {name: string for name in ("owner", "version", "side_effect", "risk")}
    tool_attrs |= {"risk_level": long, "tags": {"type": "Set", "element": string}}
    context = {name: string for name in ("env", "side_effect", "tenant", "workflow", "agent")}
    context |= {name: long for name in ("risk_level", "cost_so_far_cents", "run_cost_cents")}
    actions: dict[str, Any] = {group: {} for group in GROUPS}
    for name, tool in sorted(by_name.items()):
        args = _cedar_type({**tool.input_schema, "type": "object"}, 0) or {"type": "Record", "attributes": {}}
        ctx = {"type": "Record", "attributes": {**context, "args": args}}
        applies = {"principalTypes": list(PRINCIPAL_TYPES), "resourceTypes": ["Tool"], "context": ctx}
        actions[name] = {"memberOf": [{"id": tool.side_effect}], "appliesTo": applies}
    entity_types = {
        "Tenant": {},
        "Department": {"memberOfTypes": ["Tenant"]},
        "Workflow": {"memberOfTypes": ["Department", "Tenant"]},
        "Agent": {"memberOfTypes": ["Workflow", "Department", "Tenant"]},
        "Tool": {"shape": {"type": "Record", "attributes": tool_attrs}},
    }
    return {"": {"entityTypes": entity_types, "actions": actions}}


def _cedar_type(schema: Any, depth: int) -> dict[str, Any] | None:
    """JSON Schema -> Cedar type, or None where no exact mapping exists (left out of the schema)."""
    if not isinstance(schema, Mapping) or depth > _MAX_SCHEMA_DEPTH:
        return None
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: null means absent
        rest = [k for k in kind if k != "null"]
        kind = rest[0] if len(rest) == 1 else None
    if kind is None:
        values = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
            kind = "string"
    simple = {"string": "String", "integer": "Long", "boolean": "Boolean"}
    if kind in simple:
        return {"type": simple[kind]}
    if kind == "number":
        return {"type": "Extension", "name": "decimal"}
    if kind == "array":
        element = _cedar_type(schema.get("items"), depth + 1)
        return {"type": "Set", "element": element} if element else None
    properties = schema.get("properties")
    if kind != "object" or not isinstance(properties, Mapping):
        return None
    required = schema.get("required")
    required = set(required) if isinstance(required, list) else set()
    attributes: dict[str, Any] = {}
    for name, sub in properties.items():
        mapped = _cedar_type(sub, depth + 1)
        if mapped is None or not isinstance(name, str) or name.startswith("__"):
            continue  # "__entity"/"__extn" keys are Cedar JSON escapes: never pass them through
        nullable = isinstance(sub.get("type"), list) and "null" in sub["type"]
        attributes[name] = {**mapped, "required": name in required and not nullable}
    return {"type": "Record", "attributes": attributes}


def _project(ctype: Mapping[str, Any], value: Any, path: str) -> Any:
    """A JSON value -> the Cedar JSON of ``ctype``; raises _ArgsError naming the argument."""
    kind = ctype["type"]
    if kind == "Record" and isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for name, attr in ctype["attributes"].items():
            item, where = value.get(name), f"{path}.{name}" if path else name
            if item is not None:
                out[name] = _project(attr, item, where)
            elif attr.get("required", True):
                raise _ArgsError(f"argument `{where}` is missing")
        return out
    if kind == "String" and isinstance(value, str):
        return value
    if kind == "Boolean" and isinstance(value, bool):
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "Long" and number and _LONG_MIN <= value <= _LONG_MAX and float(value).is_integer():
        return int(value)
    if kind == "Extension" and number:
        try:
            fixed = Decimal(repr(value)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)
        except InvalidOperation:  # inf, nan, beyond the context's precision
            fixed = _DECIMAL_MAX * 2
        if abs(fixed) <= _DECIMAL_MAX:
            return {"__extn": {"fn": "decimal", "arg": f"{fixed:f}"}}
    if kind == "Set" and isinstance(value, list):
        return [_project(ctype["element"], item, f"{path}[{n}]") for n, item in enumerate(value)]
    wanted = {"Record": "an object", "String": "a string", "Boolean": "a boolean", "Long": "an integer"}
    expected = wanted.get(kind, "a list" if kind == "Set" else "a number")
    raise _ArgsError(f"argument `{path}` must be {expected}, got {type(value).__name__}")


# -- loading ---------------------------------------------------------------------------


def _statements(text: str) -> list[tuple[int, str]]:
    """Split Cedar text at top-level ``;`` into (1-based start line, text), skipping comments."""
    out: list[tuple[int, str]] = []
    i, line, start, start_line = 0, 1, -1, 0
    while i < len(text):
        char = text[i]
        if char == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        if char == "\n":
            line += 1
        elif not char.isspace() and start < 0:
            start, start_line = i, line
        if char == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                line += text[i] == "\n"
                i += 2 if text[i] == "\\" else 1
        elif char == ";" and start >= 0:
            out.append((start_line, text[start : i + 1]))
            start = -1
        i += 1
    if start >= 0:
        out.append((start_line, text[start:]))
    return out


def _parse_issues(file: str, text: str, error: ValueError) -> list[PolicyIssue]:
    """Re-parse statement by statement, so each syntax error gets its line."""
    issues = []
    for line, chunk in _statements(text):
        try:
            cedarpy.policies_to_json_str(chunk)
        except ValueError as exc:
            issues.append(PolicyIssue(f"syntax error: {exc}", file, line))
    return issues or [PolicyIssue(f"syntax error: {error}", file)]


def _action_scope(scope: Mapping[str, Any]) -> tuple[bool, frozenset[str]]:
    if scope.get("op") == "All":
        return True, frozenset()
    uids = scope.get("entities") or [scope.get("entity") or {}]
    return False, frozenset(str(uid.get("id")) for uid in uids)


def read_policy_dir(path: str | Path) -> dict[str, str]:
    """Every ``*.cedar`` file under ``path``, keyed by its relative name."""
    root = Path(path)
    if not root.is_dir():
        raise PolicyError([PolicyIssue("policy directory does not exist", str(root))])
    texts = {}
    for file in sorted(root.rglob("*.cedar")):
        try:
            texts[file.relative_to(root).as_posix()] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError([PolicyIssue(f"cannot read the file: {exc}", str(file))]) from None
    return texts


class PolicyEngine:
    """Loaded, validated policies plus the tool schema; ``decide`` is synchronous and fast.

    Load once (``from_dir`` or the constructor) and share: decisions reuse the parsed policy set
    and cache the Cedar entities per principal and tool, so a warm decision costs one Cedar call.
    """

    def __init__(
        self,
        texts: Mapping[str, str],
        tools: Iterable[ToolDefinition],
        *,
        default_approval_group: str = DEFAULT_APPROVAL_GROUP,
    ) -> None:
        self.default_approval_group = default_approval_group
        self.texts = dict(texts)
        self._tools, issues = _index_tools(tools)
        self.schema_json = _schema(self._tools)
        self._schema = cedarpy.Schema.from_json_str(json.dumps(self.schema_json))
        self._args_types = {
            name: action["appliesTo"]["context"]["attributes"]["args"]
            for name, action in self.schema_json[""]["actions"].items()
            if name not in GROUPS
        }
        self.policies: dict[str, PolicyInfo] = {}
        self.warnings: list[str] = []
        static: dict[str, Any] = {}
        for file in sorted(texts):
            issues += self._load_file(file, texts[file], static)
        if issues:
            raise PolicyError(issues)
        self._policy_set = cedarpy.PolicySet.from_json_str(
            json.dumps({"staticPolicies": static, "templates": {}, "templateLinks": []})
        )
        self._order = {info: n for n, info in enumerate(self.policies.values())}
        self._entities = functools.lru_cache(maxsize=4096)(self._build_entities)
        # What of the context any policy reads (paths like ("args", "amount")): decisions are
        # cached on those values plus the principal and tool, which determine everything else.
        self._context_paths: tuple[tuple[str, ...], ...] = tuple(sorted(_context_paths(static)))
        self._decisions: dict[Any, PolicyDecision] = {}

    @classmethod
    def from_dir(cls, path: str | Path, tools: Iterable[ToolDefinition], **kwargs: Any) -> PolicyEngine:
        """Load every ``*.cedar`` file under ``path``; ids and messages use the relative file name."""
        return cls(read_policy_dir(path), tools, **kwargs)

    def knows(self, tool: ToolDefinition) -> bool:
        """Whether decisions for ``tool`` use its current definition (else rebuild ``with_tools``)."""
        return self._tools.get(tool.name) == tool

    @property
    def tools(self) -> list[ToolDefinition]:
        return list(self._tools.values())

    def with_tools(self, tools: Iterable[ToolDefinition]) -> PolicyEngine:
        """The same policies re-validated against a new tool list (after the registry changed)."""
        return PolicyEngine(self.texts, tools, default_approval_group=self.default_approval_group)

    def _load_file(self, file: str, text: str, static: dict[str, Any]) -> list[PolicyIssue]:
        try:
            parsed = json.loads(cedarpy.policies_to_json_str(text))
        except ValueError as exc:
            return _parse_issues(file, text, exc)
        found = {**parsed["templates"], **parsed["staticPolicies"]}
        lines = [line for line, _ in _statements(text)]
        issues: list[PolicyIssue] = []
        local: dict[str, str] = {}  # Cedar's positional policyN -> our id
        for cedar_id, policy in found.items():
            index = int(cedar_id.removeprefix("policy"))
            line = lines[index] if len(lines) == len(found) else None
            annotations = policy.get("annotations") or {}
            policy_id = annotations.get("id") or f"{file}#{index + 1}"
            local[cedar_id] = policy_id
            problems = self._annotation_problems(cedar_id in parsed["templates"], policy, policy_id)
            issues += [PolicyIssue(message, file, line, policy_id, hint) for message, hint in problems]
            any_action, actions = _action_scope(policy["action"])
            approval, note = annotations.get("approval"), annotations.get("reason")
            info = PolicyInfo(policy_id, file, line, policy["effect"], any_action, actions, approval, note)
            self.policies[policy_id] = info
            static[policy_id] = policy
        return issues or self._validate(file, text, local)

    def _annotation_problems(self, template: bool, policy: Any, policy_id: str) -> list[tuple[str, Any]]:
        annotations = policy.get("annotations") or {}
        problems: list[tuple[str, Any]] = []
        if template:
            problems.append(("templates (?principal/?resource slots) are not supported", "name the entity"))
        if policy_id in self.policies:
            problems.append(("duplicate policy id", f"also used at {self.policies[policy_id].location}"))
        if "id" in annotations and not annotations["id"]:
            problems.append(("@id needs a value", 'write @id("crm-updates")'))
        if "approval" in annotations and not annotations["approval"]:
            problems.append(("@approval needs a group name", 'write @approval("finance")'))
        if "approval" in annotations and policy["effect"] == "forbid":
            problems.append(("@approval only applies to permit policies", "a forbid cannot be approved away"))
        return problems

    def _validate(self, file: str, text: str, local: Mapping[str, str]) -> list[PolicyIssue]:
        """Cedar's validator, with one line per mistake: per-action repeats are merged."""
        found: dict[str, dict[str, list[str]]] = {}  # policyN -> message pattern -> actions
        for error in cedarpy.validate_policies(text, self._schema).errors:
            message = re.sub(r"^for policy `[^`]*`, ", "", error.error)
            actions = re.findall(r'Action::"(?:[^"\\]|\\.)*"', message)
            pattern = re.sub(r'Action::"(?:[^"\\]|\\.)*"', "{}", message, count=1)
            found.setdefault(error.policy_id, {}).setdefault(pattern, []).extend(actions[:1])
        issues = []
        for cedar_id, patterns in found.items():
            info = self.policies.get(local.get(cedar_id, ""))
            messages = [pat.replace("{}", ", ".join(sorted(set(a))), 1) for pat, a in patterns.items()]
            if info is not None and messages == [_NO_ACTION] and not self._scope_tools(info):
                self.warnings.append(f"{info.location}: policy {info.id} applies to no known tool yet")
                continue
            for message in messages:
                hint = _SCOPE_HINT if message == _NO_ACTION else None
                line, pid = (info.line, info.id) if info else (None, None)
                issues.append(PolicyIssue(message, file, line, pid, hint))
        return sorted(issues, key=lambda issue: (issue.line or 0, issue.message))

    def _scope_tools(self, info: PolicyInfo) -> set[str]:
        return {
            name
            for name, tool in self._tools.items()
            if info.any_action or name in info.actions or tool.side_effect in info.actions
        }

    # -- deciding ------------------------------------------------------------------------

    def decide(self, request: PolicyRequest) -> PolicyDecision:
        """Allow, deny or require approval for one tool call; never raises for a bad request."""
        tool = request.tool
        known = self._tools.get(tool.name)
        if known is None:
            return _deny(f"tool {tool.name} is not in the policy schema", "reload the policy engine")
        if known.side_effect != tool.side_effect:
            return _deny(f"tool {tool.name} is {tool.side_effect} but was loaded as {known.side_effect}")
        if request.agent is None and request.workflow is None:
            return _deny("the request names neither an agent nor a workflow")
        try:
            args = _project(self._args_types[tool.name], request.args, "")
        except _ArgsError as exc:
            return _deny(f"{exc}; the call does not match the input schema of {tool.name}")
        tool_key: _ToolKey = (tool.name, tool.version, tool.owner, tool.side_effect, tool.risk, tool.tags)
        who: _Who = (request.agent, request.workflow, request.department, request.tenant)
        context = {
            "args": args,
            "env": request.env,
            "tenant": request.tenant,
            "side_effect": tool.side_effect,
        }
        context |= {"workflow": request.workflow or "", "agent": request.agent or ""}
        context |= {"risk_level": RISK_ORDER[tool.risk], "cost_so_far_cents": request.cost_so_far_cents}
        context["run_cost_cents"] = request.run_cost_cents
        cedar_request = {
            "principal": _uid(*_principal(request)),
            "action": _uid("Action", tool.name),
            "resource": _uid("Tool", tool.name),
            "context": context,
        }
        key = (who, tool_key, request.env, self._context_key(context))
        cached = self._decisions.get(key)
        if cached is not None:
            return cached
        try:
            entities = self._entities(who, tool_key)
        except ValueError as exc:  # an id or attribute Cedar cannot hold
            return _deny(f"the request cannot be expressed in Cedar: {exc}")
        decision = self._interpret(request, cedarpy.is_authorized(cedar_request, self._policy_set, entities))
        if len(self._decisions) >= _DECISION_CACHE:
            self._decisions.clear()
        self._decisions[key] = decision
        return decision

    def _context_key(self, context: Mapping[str, Any]) -> tuple[str, ...]:
        """The values (canonical JSON) at the context paths the policies read; absent: ``-``."""
        out = []
        for path in self._context_paths:
            value: Any = context
            for name in path:
                value = value.get(name, _ABSENT) if isinstance(value, Mapping) else _ABSENT
                if value is _ABSENT:
                    break
            out.append("-" if value is _ABSENT else json.dumps(value, sort_keys=True, separators=(",", ":")))
        return tuple(out)

    def _interpret(self, request: PolicyRequest, result: cedarpy.AuthzResult) -> PolicyDecision:
        tool, who = request.tool, request.principal
        errors = tuple(sorted(result.diagnostics.errors))
        # Cedar reports reasons in no particular order; load order makes decisions deterministic.
        reasons = sorted((self.policies[p] for p in result.diagnostics.reasons), key=self._order.__getitem__)
        forbids = [p for p in reasons if p.effect == "forbid"]
        if forbids and not result.allowed:
            first = forbids[0]
            text = f"forbidden by policy {first.id}" + (f": {first.note}" if first.note else "")
            return PolicyDecision("deny", _ids(forbids), None, text, errors)
        if errors:
            failing = re.findall(r"policy `([^`]*)`", " ".join(errors))
            what = f"policy {', '.join(dict.fromkeys(failing))} failed to evaluate" if failing else "error"
            text = f"{what} ({errors[0]}); a policy that cannot be evaluated denies the call"
            culprits = _ids(self.policies[p] for p in failing if p in self.policies)
            return PolicyDecision("deny", culprits, None, text, errors)
        kind = f"{tool.side_effect} tool {tool.name}"
        if not result.allowed or not reasons:
            return PolicyDecision("deny", (), None, f"no policy grants {who} the {kind}")
        grants = reasons if tool.side_effect == "read" else [p for p in reasons if not p.any_action]
        if not grants:
            text = (
                f"no policy explicitly grants {who} the {kind}: policy {', '.join(_ids(reasons))} permits "
                "every action, which grants reads only; name the tool or its group in the action scope"
            )
            return PolicyDecision("deny", (), None, text)
        outright = [p for p in grants if p.approval is None]
        groups = [p.approval for p in grants if p.approval is not None]
        if outright and request.env == "prod" and tool.side_effect == "irreversible":
            group = groups[0] if groups else self.default_approval_group
            text = f"irreversible tool {tool.name} in prod always needs approval by {group} (baseline rule)"
            return PolicyDecision("require_approval", _ids(grants), group, text)
        if outright:
            ids = _ids(outright)
            return PolicyDecision("allow", ids, None, f"{kind} granted by {', '.join(ids)}")
        text = f"{kind} granted by {', '.join(_ids(grants))} only with approval by {groups[0]}"
        return PolicyDecision("require_approval", _ids(grants), groups[0], text)

    def _build_entities(self, who: _Who, tool_key: _ToolKey) -> cedarpy.Entities:
        agent, workflow, department, tenant = who
        name, version, owner, side_effect, risk, tags = tool_key
        org = [_uid("Department", department)] if department is not None else []
        org.append(_uid("Tenant", tenant))
        entities = [_entity("Tenant", tenant, [])]
        if department is not None:
            entities.append(_entity("Department", department, org[-1:]))
        if workflow is not None:
            entities.append(_entity("Workflow", workflow, org))
        if agent is not None:
            workflows = [_uid("Workflow", workflow)] if workflow is not None else []
            entities.append(_entity("Agent", agent, workflows + org))
        attrs: dict[str, Any] = {"owner": owner, "version": version, "side_effect": side_effect}
        attrs |= {"risk": risk, "risk_level": RISK_ORDER[risk], "tags": list(tags)}
        entities.append({**_entity("Tool", name, []), "attrs": attrs})
        entities.append(_entity("Action", name, [_uid("Action", side_effect)]))
        entities.append(_entity("Action", side_effect, []))
        return cedarpy.Entities.from_json_str(json.dumps(entities))

    # -- explaining ----------------------------------------------------------------------

    def explain(self, request: PolicyRequest) -> str:
        """The decision in words, for ``tower policy test``: what decided it and what would change it."""
        decision = self.decide(request)
        tool = request.tool
        lines = [
            f"decision: {decision.effect}",
            f"request:  {request.principal} calls {tool.name} ({tool.side_effect}, risk {tool.risk}) "
            f"in {request.env} for tenant {request.tenant}",
            f"reason:   {decision.reason}",
        ]
        if decision.approval_group:
            lines.append(f"approval: {decision.approval_group}")
        if decision.policy_ids:
            lines.append("policies:")
            lines += [f"  - {pid} ({self.policies[pid].location})" for pid in decision.policy_ids]
        lines += [f"error:    {error}" for error in decision.errors]
        if decision.effect != "deny":
            return "\n".join(lines)
        infos = [self.policies[pid] for pid in decision.policy_ids]
        if decision.errors:
            lines.append("to allow it: fix the failing policy or the request (see the errors above)")
        elif any(p.effect == "forbid" for p in infos):
            lines.append("to allow it: a forbid always wins; change or narrow the forbid policies above")
        else:
            lines.append("to allow it, add a policy such as:")
            lines += [f"  {line}" for line in suggest_permit(request).splitlines()]
        return "\n".join(lines)

    def schema_text(self) -> str:
        """The generated schema in Cedar's human-readable syntax, for policy authors."""
        return str(self._schema)


_ABSENT = object()
_DECISION_CACHE = 8192  # decisions kept per engine; cleared when full


def _context_paths(node: Any) -> set[tuple[str, ...]]:
    """Every ``context.a.b...`` chain read by a policy set in Cedar's JSON form (``has`` included).

    A bare ``context`` (compared or passed whole) yields ``()``: the whole context.
    """
    found: set[tuple[str, ...]] = set()

    def chain(expr: Any) -> tuple[str, ...] | None:
        if not isinstance(expr, Mapping) or len(expr) != 1:
            return None
        if expr.get("Var") == "context":
            return ()
        access = expr.get(".")
        if isinstance(access, Mapping) and isinstance(access.get("attr"), str):
            base = chain(access.get("left"))
            return None if base is None else (*base, access["attr"])
        return None

    def walk(item: Any) -> None:
        if isinstance(item, list):
            for sub in item:
                walk(sub)
            return
        if not isinstance(item, Mapping):
            return
        path = chain(item)
        if path is not None:
            found.add(path)
            return
        test = item.get("has") if len(item) == 1 else None
        if isinstance(test, Mapping) and isinstance(test.get("attr"), str):
            base = chain(test.get("left"))
            if base is not None:
                found.add((*base, test["attr"]))
                return
        for sub in item.values():
            walk(sub)

    walk(node)
    if () in found:
        return {()}
    # a path under another one is covered by it: keep the shortest
    return {p for p in found if not any(p[: len(q)] == q and p != q for q in found)}


def suggest_permit(request: PolicyRequest) -> str:
    """The narrowest permit that grants this request: this principal, this tool."""
    kind, name = _principal(request)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-{request.tool.name}").strip("-").lower()
    principal, action = f"{kind}::{json.dumps(name)}", f"Action::{json.dumps(request.tool.name)}"
    return f'@id("allow-{slug}")\npermit(\n  principal == {principal},\n  action == {action},\n  resource\n);'


def _principal(request: PolicyRequest) -> tuple[str, str]:
    return ("Agent", request.agent) if request.agent is not None else ("Workflow", request.workflow or "")


def _deny(reason: str, hint: str | None = None) -> PolicyDecision:
    return PolicyDecision("deny", (), None, reason, (f"{reason} ({hint})" if hint else reason,))


def _ids(policies: Iterable[PolicyInfo]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.id for p in policies))


def _uid(kind: str, name: str) -> dict[str, str]:
    return {"type": kind, "id": name}


def _entity(kind: str, name: str, parents: list[dict[str, str]]) -> dict[str, Any]:
    return {"uid": _uid(kind, name), "attrs": {}, "parents": parents}
