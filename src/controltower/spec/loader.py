"""YAML (or plain data) -> a validated WorkflowSpec, or a SpecError listing every problem.

Users fix specs in an editor, so each issue carries the file, the 1-based line and a hint,
and all issues come at once: one round trip per broken spec, not one per mistake. Lines come
from ruamel's round-trip loader; the data handed to Pydantic is plain JSON-like values.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import re
from collections.abc import Callable, Mapping
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from controltower.spec.errors import SpecError, SpecIssue
from controltower.spec.models import IDENT_PATTERN, NAME_PATTERN, STEP_KINDS, WorkflowSpec
from controltower.spec.validate import PathPart, closest_hint, join_path, semantic_issues, split_path

MAX_SPEC_BYTES = 5 * 1024 * 1024
# A few kilobytes of YAML aliases can expand to billions of values; real specs have thousands.
MAX_VALUES = 1_000_000
MAX_DEPTH = 100

Locate = Callable[[list[PathPart]], int | None]

_PATTERN_HINTS = {
    IDENT_PATTERN: "names start with a letter or '_' and use letters, digits, '_' and '-' (max 64)",
    NAME_PATTERN: "workflow names use lower-case letters, digits, '.', '_' and '-', starting with a "
    "letter or digit",
}


def load_spec_file(path: str | os.PathLike[str]) -> WorkflowSpec:
    """Read, parse and validate a spec file; every failure is a SpecError, never a traceback."""
    file = os.fspath(path)

    def fail(message: str, hint: str | None = None, line: int | None = None) -> SpecError:
        return SpecError([SpecIssue(path="", message=message, hint=hint, file=file, line=line)])

    try:
        with open(file, "rb") as handle:
            # Read one byte past the limit so special files (pipes, /dev/zero) cannot hang us.
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise fail("file not found", f"relative paths are resolved from {os.getcwd()}") from None
    except IsADirectoryError:
        raise fail("is a directory, not a spec file") from None
    except PermissionError:
        raise fail("cannot read the file: permission denied") from None
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise fail(f"file is larger than {MAX_SPEC_BYTES // (1024 * 1024)} MB", "a spec is a few KB of YAML")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise fail("file is not UTF-8 text", "save the spec as UTF-8", line) from None
    return load_spec_text(text, file=file)


def load_spec_text(text: str, *, file: str | None = None) -> WorkflowSpec:
    """Parse YAML text (JSON is YAML too) and validate it into a WorkflowSpec."""
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        limit = MAX_SPEC_BYTES // (1024 * 1024)
        raise SpecError([SpecIssue(path="", message=f"spec is larger than {limit} MB", file=file)])
    tree = _parse_yaml(text.removeprefix("\ufeff"), file)
    locate = _locator(tree)
    data = _plain_document(tree, file, locate)
    return _validate(data, file, locate)


def load_spec_data(data: Mapping[str, Any], *, file: str | None = None) -> WorkflowSpec:
    """Validate already-parsed data (JSON bodies, the builder); same checks, no line numbers."""
    if not isinstance(data, Mapping):
        raise SpecError([_top_level_issue(data, file)])
    return _validate(data, file, lambda parts: None)


# -- YAML -------------------------------------------------------------------------


def _parse_yaml(text: str, file: str | None) -> Any:
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        column = f" (column {mark.column + 1})" if mark is not None else ""
        problem = (exc.problem or "invalid YAML").strip()
        if exc.context:
            problem = f"{problem} ({exc.context.strip()})"
        issue = SpecIssue(
            path="",
            message=f"YAML syntax error{column}: {problem}",
            hint="check indentation, quoting and unclosed brackets near this line",
            file=file,
            line=line,
        )
        raise SpecError([issue]) from None
    except YAMLError as exc:
        raise SpecError([SpecIssue(path="", message=f"YAML error: {exc}", file=file)]) from None
    except RecursionError:
        issue = SpecIssue(path="", message="YAML is nested too deeply", file=file)
        raise SpecError([issue]) from None


def _locator(tree: Any) -> Locate:
    """Map a path to the 1-based line of the deepest node on it that ruamel knows a line for."""

    def locate(parts: list[PathPart]) -> int | None:
        node = tree
        line = _position(node, None)
        for part in parts:
            if isinstance(node, Mapping):
                key = _find_key(node, part)
                if key is None:
                    break
                line = _position(node, key) or line
                node = node[key]
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                line = _position(node, part) or line
                node = node[part]
            else:
                break
        return line

    return locate


def _find_key(node: Mapping[Any, Any], part: PathPart) -> Any:
    if part in node:
        return part
    return next((key for key in node if str(key) == str(part)), None)


def _position(node: Any, key: Any) -> int | None:
    """1-based line of ``node`` itself (key None), of a mapping key, or of a sequence item."""
    try:
        lc = node.lc
        if key is None:
            return int(lc.line) + 1
        return int((lc.key(key) if isinstance(node, Mapping) else lc.item(key))[0]) + 1
    except (AttributeError, KeyError, IndexError, TypeError):  # merged keys have no position
        return None


def _top_level_issue(data: Any, file: str | None) -> SpecIssue:
    if data is None:
        return SpecIssue("", "the spec is empty", "start with `name:` and `steps:`", file)
    message = f"the top level must be a mapping, found {_kind_of(data)}"
    return SpecIssue("", message, "a spec starts with keys such as `name:`, `steps:`", file, 1)


class _Limit(Exception):
    pass


def _plain_document(tree: Any, file: str | None, locate: Locate) -> dict[str, Any]:
    """ruamel's round-trip objects -> plain dicts/lists/scalars, refusing what JSON cannot hold."""
    if not isinstance(tree, Mapping):
        raise SpecError([_top_level_issue(tree, file)])
    issues: list[SpecIssue] = []
    count = 0

    def bad(parts: list[PathPart], message: str, hint: str | None = None) -> None:
        issues.append(SpecIssue(join_path(parts), message, hint, file, locate(parts)))

    def plain(node: Any, parts: list[PathPart]) -> Any:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise _Limit(f"spec expands to more than {MAX_VALUES:,} values (YAML aliases?)")
        if len(parts) > MAX_DEPTH:
            raise _Limit(f"spec is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, Mapping):
            return {_key(k): plain(v, [*parts, _key(k)]) for k, v in node.items()}
        if isinstance(node, list):
            return [plain(v, [*parts, i]) for i, v in enumerate(node)]
        if isinstance(node, TaggedScalar):
            bad(parts, f"unsupported YAML tag {node.tag!s}", "specs use plain YAML values; remove the tag")
            return None
        if node is None or isinstance(node, bool):
            return node
        if isinstance(node, str):
            return str(node)
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        if isinstance(node, dt.date):  # dates are strings in JSON; keep what the author wrote
            return node.isoformat()
        bad(parts, f"unsupported YAML value of type {type(node).__name__}", "use strings, numbers, maps")
        return None

    try:
        data = plain(tree, [])
    except _Limit as exc:
        raise SpecError([SpecIssue(path="", message=str(exc), file=file)]) from None
    if issues:
        raise SpecError(issues)
    return data  # type: ignore[no-any-return]


def _key(key: Any) -> str:
    return key if isinstance(key, str) else str(key)


def _kind_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else type(value).__name__


# -- validation ---------------------------------------------------------------------


def _validate(data: Mapping[str, Any], file: str | None, locate: Locate) -> WorkflowSpec:
    try:
        spec = WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        issues = _model_issues(exc, data, file, locate)
        raise SpecError(_by_line(issues + _salvaged_issues(exc, data, file, locate))) from None
    except RecursionError:
        raise SpecError([SpecIssue(path="", message="spec is nested too deeply", file=file)]) from None
    issues = [
        dataclasses.replace(issue, file=file, line=locate(split_path(issue.path)))
        for issue in semantic_issues(spec)
    ]
    if issues:
        raise SpecError(_by_line(issues))
    return spec


def _salvaged_issues(
    exc: ValidationError, data: Mapping[str, Any], file: str | None, locate: Locate
) -> list[SpecIssue]:
    """Semantic issues of the parts that did validate, so one run reports both kinds.

    Broken parts become inert placeholders that keep what others refer to (step ids, agent
    and tool names) and never add control-flow edges, so every cycle found is real; dead-step
    reports beside a placeholder may be artifacts and are dropped. Reports nothing extra when
    a broken part is structural, such as `steps` itself.
    """
    salvage = _Salvage(copy.deepcopy(dict(data)))
    for error in exc.errors(include_url=False):
        parts, _ = _clean_loc(error, data)
        if not salvage.patch(parts, key_error="[key]" in error["loc"]):
            return []
    try:
        found = semantic_issues(WorkflowSpec.model_validate(salvage.data), known_steps=salvage.hidden_ids)
    except (ValidationError, RecursionError):
        return []
    kept = []
    for issue in found:
        parts = split_path(issue.path)
        if isinstance(parts[-1], int) and join_path(parts[:-1]) in salvage.patched_lists:
            continue  # a bare step path is a dead-step report
        kept.append(dataclasses.replace(issue, file=file, line=locate(parts)))
    return kept


class _Salvage:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.patched_lists: set[str] = set()
        self.patched_steps: list[list[PathPart]] = []
        self.hidden_ids: set[str] = set()

    def patch(self, parts: list[PathPart], *, key_error: bool) -> bool:
        top = parts[0] if parts else None
        entries = self.data.get(str(top))
        if top == "steps":
            return self._patch_step(parts)
        if top in ("agents", "tools") and len(parts) > 1 and isinstance(entries, dict):
            if key_error:
                entries.pop(parts[1], None)
            elif parts[1] in entries:
                entries[parts[1]] = (
                    {"kind": "python", "impl": "invalid:placeholder"} if top == "agents" else {}
                )
            return True
        if top in ("triggers", "kpis") and len(parts) > 1 and isinstance(entries, list):
            index = parts[1]
            if isinstance(index, int) and index < len(entries):
                entries[index] = (
                    {"kind": "manual"} if top == "triggers" else {"name": "invalid", "measure": "0"}
                )
                return True
        if top is None or top in ("agents", "tools", "triggers", "kpis"):
            return False
        if top == "name":
            self.data["name"] = "invalid"
        else:
            self.data.pop(str(top), None)
        return True

    def _patch_step(self, parts: list[PathPart]) -> bool:
        """Replace the innermost step on ``parts`` with a wait step that keeps its id and next."""
        where: list[PathPart] | None = None
        for n, part in enumerate(parts):
            if isinstance(part, int) and (
                parts[n - 1] in ("steps", "body") or parts[n - 2 : n - 1] == ["branches"]
            ):
                where = parts[: n + 1]
        if where is None:
            return False
        if any(where[: len(done)] == done for done in self.patched_steps):
            return True  # inside a step that is a placeholder already
        items, index = _child(self.data, where[:-1]), where[-1]
        if not isinstance(items, list) or not isinstance(index, int) or index >= len(items):
            return False
        old = items[index] if isinstance(items[index], dict) else {}
        step_id = old.get("id")
        if not (isinstance(step_id, str) and re.fullmatch(IDENT_PATTERN, step_id) and len(step_id) <= 64):
            step_id = f"__invalid_{len(self.patched_steps)}"
        target = old.get("next")
        if not isinstance(target, str):
            # Falling through is an edge the original step may not have had (a route does not).
            target = None if old.get("kind") in set(STEP_KINDS) - {"route"} else "end"
        placeholder = {"id": step_id, "kind": "wait", "event": "invalid"}
        items[index] = placeholder if target is None else {**placeholder, "next": target}
        self.hidden_ids.update(_nested_ids(old))
        self.patched_lists.add(join_path(where[:-1]))
        self.patched_steps.append(where)
        return True


def _nested_ids(step: Mapping[str, Any]) -> set[str]:
    """Ids of the steps nested in a container step (body, branches, map steps)."""
    branches, fan_out = step.get("branches"), step.get("map")
    lists = [step.get("body"), *(branches.values() if isinstance(branches, Mapping) else ())]
    lists.append(fan_out.get("steps") if isinstance(fan_out, Mapping) else None)
    ids: set[str] = set()
    for item in (item for items in lists if isinstance(items, list) for item in items):
        if isinstance(item, Mapping):
            ids |= {item["id"]} if isinstance(item.get("id"), str) else set()
            ids |= _nested_ids(item)
    return ids


def _by_line(issues: list[SpecIssue]) -> list[SpecIssue]:
    """File order reads best in an editor; issues without a line keep their order, last."""
    return sorted(issues, key=lambda issue: (issue.line is None, issue.line or 0))


def _model_issues(
    exc: ValidationError, data: Mapping[str, Any], file: str | None, locate: Locate
) -> list[SpecIssue]:
    """One issue per Pydantic error, with union noise removed and a union's alternatives merged."""
    slots: list[SpecIssue | str] = []  # a str is the path of a merged union slot
    alternatives: dict[str, tuple[list[PathPart], list[str]]] = {}
    for error in exc.errors(include_url=False):
        parts, from_union = _clean_loc(error, data)
        if from_union and error["type"] not in ("missing", "extra_forbidden"):
            # `input: 5` fails both as "not a dict" and "not a string": say it once.
            key = join_path(parts)
            if key not in alternatives:
                alternatives[key] = (parts, [])
                slots.append(key)
            alternatives[key][1].append(error["msg"].removeprefix("Input should be "))
            continue
        message, hint, parts = _describe(error, parts, data)
        slots.append(SpecIssue(join_path(parts), message, hint, file, locate(parts)))
    issues: list[SpecIssue] = []
    for slot in slots:
        if isinstance(slot, SpecIssue):
            issues.append(slot)
            continue
        parts, wanted = alternatives[slot]
        got = _kind_of(_child(data, parts))
        message = f"Input should be {' or '.join(dict.fromkeys(wanted))} (got {got})"
        issues.append(SpecIssue(slot, message, None, file, locate(parts)))
    return issues


def _clean_loc(error: ErrorDetails, data: Any) -> tuple[list[PathPart], bool]:
    """Pydantic's loc -> the path the author wrote: drop discriminator tags and union members."""
    loc = error["loc"]
    parts: list[PathPart] = []
    node: Any = data
    after_index = dropped = False
    for n, seg in enumerate(loc):
        if isinstance(seg, int):
            parts.append(seg)
            node = node[seg] if isinstance(node, list) and 0 <= seg < len(node) else None
            after_index = True
            continue
        if after_index and isinstance(node, Mapping) and node.get("kind") == seg:
            after_index = False  # the tag pydantic inserts after an item of a discriminated union
            continue
        after_index = False
        if isinstance(node, Mapping) and seg in node:
            parts.append(seg)
            node = node[seg]
        elif n == len(loc) - 1 and error["type"] in ("missing", "extra_forbidden"):
            parts.append(seg)
        elif seg != "[key]":
            dropped = True  # a union member name such as 'str' or 'dict[str,any]'
    return parts, dropped


def _describe(
    error: ErrorDetails, parts: list[PathPart], data: Any
) -> tuple[str, str | None, list[PathPart]]:
    """A message and hint in the author's terms for one Pydantic error (and the path to report)."""
    kind, msg, ctx, value = error["type"], error["msg"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden" and parts:
        model = _model_at(parts[:-1], data)
        allowed = list(model.model_fields) if model else []
        listing = "allowed fields: " + ", ".join(allowed)
        close = closest_hint(str(parts[-1]), allowed, "fields")
        hint = (f"{close} {listing}" if close.startswith("did you mean") else listing) if allowed else None
        return f"unknown field {parts[-1]!r}", hint, parts
    if kind == "missing" and parts:
        name = str(parts[-1])
        model = _model_at(parts[:-1], data)
        field = model.model_fields.get(name) if model else None
        about = f" ({field.description})" if field is not None and field.description else ""
        return f"missing required field {name!r}", f"add `{name}: ...`{about}", parts
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        kinds = list(STEP_KINDS) if not tags or set(tags) == set(STEP_KINDS) else tags
        listing = "valid kinds: " + ", ".join(kinds)
        if kind == "union_tag_not_found":
            return "missing `kind`", listing, [*parts, "kind"]
        tag = str(ctx.get("tag", ""))
        close = closest_hint(tag, kinds, "kinds")
        hint = f"{close} {listing}" if close.startswith("did you mean") else listing
        return f"unknown kind {tag!r}", hint, [*parts, "kind"]
    if kind == "model_attributes_type":
        return f"expected a mapping, got {_kind_of(value)}", None, parts
    if kind == "string_pattern_mismatch" and ctx.get("pattern") in _PATTERN_HINTS:
        return f"{value!r} is not a valid name", _PATTERN_HINTS[str(ctx["pattern"])], parts
    if kind == "value_error":
        return msg.removeprefix("Value error, "), None, parts
    if kind.endswith(("_type", "_parsing")):
        return f"{msg} (got {_kind_of(value)})", None, parts
    return msg, None, parts


def _child(data: Any, parts: list[PathPart]) -> Any:
    for part in parts:
        in_list = isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        if in_list or (isinstance(data, Mapping) and part in data):
            data = data[part]
        else:
            return None
    return data


def _model_at(parts: list[PathPart], data: Any) -> type[BaseModel] | None:
    """The model class found at ``parts``, following the data through unions (for field hints)."""
    tp: Any = WorkflowSpec
    node: Any = data
    for part in parts:
        tp = _pick(tp, node)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if not isinstance(part, str) or part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict and isinstance(part, str):
            tp = get_args(tp)[1]
        else:
            return None
        node = _child(node, [part])
    tp = _pick(tp, node)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _pick(tp: Any, node: Any) -> Any:
    """Strip Annotated and Optional; choose the union member the data selects by its `kind`."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, UnionType):
        members = [_pick(m, node) for m in get_args(tp) if m is not NoneType]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if isinstance(node, Mapping) and models:
            if len(models) == 1:
                return models[0]
            for model in models:
                field = model.model_fields.get("kind")
                if field is not None and field.default == node.get("kind"):
                    return model
            return None
        for member in members:
            origin = get_origin(member)
            if (origin is list and isinstance(node, list)) or (origin is dict and isinstance(node, Mapping)):
                return member
        return None
    return tp
