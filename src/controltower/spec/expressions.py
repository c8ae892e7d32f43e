"""Safe expressions over run state (route conditions, loop checks, input mappings).

Expressions are Python-like (`steps.classify.output.score >= 0.8 and input.tier == "gold"`),
evaluated by simpleeval: no imports, no dunder access, no side effects. Strings in
step inputs may embed expressions as ``${{ expr }}``; a string that is exactly one
expression yields the value with its type, otherwise the pieces are interpolated.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping
from typing import Any

import simpleeval

from controltower.spec.errors import ExpressionError

TEMPLATE = re.compile(r"\$\{\{\s*(.+?)\s*\}\}", re.DOTALL)

FUNCTIONS: dict[str, Any] = {
    "len": len,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "round": round,
    "min": min,
    "max": max,
    "sum": sum,
    "any": any,
    "all": all,
    "abs": abs,
    "sorted": sorted,
    "lower": lambda s: str(s).lower(),
    "upper": lambda s: str(s).upper(),
    "contains": lambda haystack, needle: needle in haystack if haystack is not None else False,
    "get": lambda mapping, key, default=None: (mapping or {}).get(key, default),
    "coalesce": lambda *values: next((v for v in values if v is not None), None),
}


class _Evaluator(simpleeval.EvalWithCompoundTypes):  # type: ignore[misc]
    def _eval_attribute(self, node: ast.Attribute) -> Any:
        # Dict keys read as attributes (steps.a.output.x); a missing key is None, not an error,
        # so conditions over optional fields stay short.
        value = self._eval(node.value)
        if isinstance(value, Mapping):
            return value.get(node.attr)
        if value is None:
            return None
        return super()._eval_attribute(node)

    def _eval_subscript(self, node: ast.Subscript) -> Any:
        container = self._eval(node.value)
        key = self._eval(node.slice)
        if container is None:
            return None
        if isinstance(container, Mapping):
            return container.get(key)
        try:
            return container[key]
        except (IndexError, TypeError):
            return None


_HINT = "expressions are Python-like, e.g. steps.check.output.score >= 0.8"


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> ast.expr:
    if not expr.strip():
        raise ExpressionError("empty expression", hint=_HINT)
    try:
        tree = ast.parse(expr.strip())
    except SyntaxError as exc:
        hint = _HINT
        if any(k in expr for k in (".pass", ".if", ".else", ".in", ".not", ".and", ".or", ".class")):
            hint = "a key that is a Python keyword needs subscript syntax, e.g. output['pass']"
        raise ExpressionError(f"cannot parse expression {expr!r}: {exc.msg}", hint=hint) from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        raise ExpressionError(f"{expr!r} is not a single expression", hint=_HINT)
    return tree.body[0].value


def check_syntax(expr: str) -> str | None:
    """Return a message if ``expr`` does not parse, else None."""
    try:
        _parse(expr)
    except ExpressionError as exc:
        return exc.message
    return None


def evaluate(expr: str, names: Mapping[str, Any]) -> Any:
    """Evaluate one expression against ``names``; failures raise ExpressionError."""
    parsed = _parse(expr)
    evaluator = _Evaluator(names=dict(names), functions=FUNCTIONS)
    try:
        return evaluator.eval(expr, previously_parsed=parsed)
    except ExpressionError:
        raise
    except simpleeval.NameNotDefined as exc:
        known = ", ".join(sorted(names)) or "none"
        raise ExpressionError(
            f"expression {expr!r} uses unknown name {exc.name!r}", hint=f"known names: {known}"
        ) from None
    except Exception as exc:
        raise ExpressionError(f"expression {expr!r} failed: {exc}") from None


def render(template: Any, names: Mapping[str, Any]) -> Any:
    """Resolve ``${{ }}`` expressions inside a JSON-like value, recursively."""
    if isinstance(template, str):
        match = TEMPLATE.fullmatch(template.strip())
        if match and template.strip().count("${{") == 1:
            return evaluate(match.group(1), names)
        if "${{" not in template:
            return template
        return TEMPLATE.sub(lambda m: _as_text(evaluate(m.group(1), names)), template)
    if isinstance(template, Mapping):
        return {key: render(value, names) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, names) for value in template]
    return template


def expressions_in(template: Any) -> list[str]:
    """Every expression embedded in a JSON-like value (for validation)."""
    if isinstance(template, str):
        return [m.group(1) for m in TEMPLATE.finditer(template)]
    if isinstance(template, Mapping):
        return [e for value in template.values() for e in expressions_in(value)]
    if isinstance(template, list):
        return [e for value in template for e in expressions_in(value)]
    return []


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
