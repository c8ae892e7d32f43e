"""Subset matching of actual values against expectations, with dotted paths and `$` operators."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()
OPERATORS = frozenset(
    {"$eq", "$ne", "$in", "$nin", "$contains", "$regex", "$gt", "$gte", "$lt", "$lte", "$len", "$exists"}
    | {"$approx", "$tol"}
)


@dataclass(frozen=True, slots=True)
class Mismatch:
    path: str
    expected: Any
    actual: Any
    message: str


def lookup(value: Any, path: str) -> Any:
    """Follow a dotted path (integer segments index lists); MISSING when it leads nowhere."""
    current = value
    for part in path.split("."):
        if isinstance(current, Mapping):
            current = current.get(part, MISSING)
        elif isinstance(current, list) and _is_index(part):
            index = int(part)
            current = current[index] if -len(current) <= index < len(current) else MISSING
        else:
            return MISSING
        if current is MISSING:
            return MISSING
    return current


def match(actual: Any, expected: Mapping[str, Any], *, root: str = "") -> list[Mismatch]:
    """Every mismatch between ``actual`` and the path → expectation mapping ``expected``."""
    problems: list[Mismatch] = []
    for key, want in expected.items():
        path = f"{root}.{key}" if root else str(key)
        problems.extend(_compare(lookup(actual, str(key)), want, path))
    return problems


def is_operator(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(str(k).startswith("$") for k in value)


def _compare(actual: Any, want: Any, path: str) -> list[Mismatch]:
    if is_operator(want):
        return _operators(actual, want, path)
    if isinstance(want, Mapping):
        if actual is MISSING:
            return [Mismatch(path, dict(want), actual, "missing")]
        if not isinstance(actual, Mapping):
            return [Mismatch(path, dict(want), actual, f"expected a mapping, got {_kind(actual)}")]
        return match(actual, want, root=path)
    if isinstance(want, list):
        if not isinstance(actual, list):
            return [Mismatch(path, want, actual, f"expected a list, got {_kind(actual)}")]
        if len(actual) != len(want):
            return [Mismatch(path, want, actual, f"expected {len(want)} items, got {len(actual)}")]
        problems: list[Mismatch] = []
        for index, (a, w) in enumerate(zip(actual, want, strict=True)):
            problems.extend(_compare(a, w, f"{path}.{index}"))
        return problems
    if not _equal(actual, want):
        return [Mismatch(path, want, actual, "missing" if actual is MISSING else "not equal")]
    return []


def _operators(actual: Any, ops: Mapping[str, Any], path: str) -> list[Mismatch]:
    unknown = set(ops) - OPERATORS
    if unknown:
        return [Mismatch(path, dict(ops), actual, f"unknown operator(s) {sorted(unknown)}")]
    problems: list[Mismatch] = []
    for op, arg in ops.items():
        if op == "$tol":
            continue
        ok, why = _check(op, arg, actual, ops)
        if not ok:
            problems.append(Mismatch(path, {op: arg}, actual, why))
    return problems


def _check(op: str, arg: Any, actual: Any, ops: Mapping[str, Any]) -> tuple[bool, str]:
    if op == "$exists":
        return (actual is not MISSING) == bool(arg), "exists" if actual is not MISSING else "missing"
    if actual is MISSING:
        return False, "missing"
    if op == "$eq":
        return not _compare(actual, arg, ""), "not equal"
    if op == "$ne":
        return not _equal(actual, arg), "equal"
    if op in ("$in", "$nin"):
        if not isinstance(arg, list):
            return False, f"{op} needs a list"
        inside = any(_equal(actual, item) for item in arg)
        return inside == (op == "$in"), "not one of them" if op == "$in" else "one of them"
    if op == "$contains":
        if isinstance(actual, str):
            return str(arg) in actual, "substring not found"
        if isinstance(actual, list):
            return any(_equal(item, arg) or not _compare(item, arg, "") for item in actual), "not in the list"
        if isinstance(actual, Mapping):
            return arg in actual, "key not present"
        return False, f"cannot look inside {_kind(actual)}"
    if op == "$regex":
        return isinstance(actual, str) and re.search(str(arg), actual) is not None, "no match"
    if op == "$len":
        return hasattr(actual, "__len__") and len(actual) == arg, f"length is {_length(actual)}"
    if op in ("$gt", "$gte", "$lt", "$lte", "$approx"):
        if not _number(actual) or not _number(arg):
            return False, f"{op} compares numbers, got {_kind(actual)}"
        if op == "$gt":
            return actual > arg, "not greater"
        if op == "$gte":
            return actual >= arg, "smaller"
        if op == "$lt":
            return actual < arg, "not smaller"
        if op == "$lte":
            return actual <= arg, "greater"
        tol = ops.get("$tol", 1e-6)
        return math.isclose(actual, arg, rel_tol=0.0, abs_tol=float(tol)), f"not within {tol}"
    raise AssertionError(op)  # pragma: no cover


def _equal(actual: Any, want: Any) -> bool:
    if isinstance(actual, bool) or isinstance(want, bool):
        return isinstance(actual, bool) and isinstance(want, bool) and actual == want
    if _number(actual) and _number(want):
        return bool(actual == want)
    return type(actual) is type(want) and bool(actual == want) if actual is not MISSING else False


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_index(part: str) -> bool:
    return part.lstrip("-").isdigit()


def _length(value: Any) -> str:
    return str(len(value)) if hasattr(value, "__len__") else f"undefined ({_kind(value)})"


def _kind(value: Any) -> str:
    return "nothing" if value is MISSING else type(value).__name__
