"""Expressions: clear errors for what cannot be evaluated, and the documented escape hatches."""

from __future__ import annotations

import pytest

from controltower.spec.errors import ExpressionError
from controltower.spec.expressions import check_syntax, evaluate, render


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("a; b", "not a single expression"),
        ("import os", "not a single expression"),
        ("a +", "cannot parse"),
    ],
)
def test_bad_expressions_get_a_message_not_a_crash(expr: str, message: str) -> None:
    got = check_syntax(expr)
    assert got is not None
    assert message in got
    with pytest.raises(ExpressionError):
        evaluate(expr, {"a": 1})


def test_keyword_keys_need_subscripts_and_the_hint_says_so() -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate("check.pass", {"check": {"pass": True}})
    assert "output['pass']" in (info.value.hint or "")
    assert evaluate("check['pass'] and check.score > 0.5", {"check": {"pass": True, "score": 0.9}})


def test_missing_keys_read_as_none_and_unknown_names_fail() -> None:
    assert evaluate("a.b.c", {"a": {}}) is None
    with pytest.raises(ExpressionError) as info:
        evaluate("nope > 1", {"a": 1})
    assert "nope" in str(info.value)


def test_render_keeps_types_for_whole_expressions() -> None:
    assert render("${{ a + 1 }}", {"a": 1}) == 2
    assert render({"x": ["n=${{ a }}"]}, {"a": 1}) == {"x": ["n=1"]}
