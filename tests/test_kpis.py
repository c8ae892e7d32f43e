"""KPI aggregation and target checks honour the KPI's direction."""

from __future__ import annotations

import pytest

from controltower.observability.kpis import KPIResult


def _result(value: float | None, target: float | None, direction: str) -> KPIResult:
    return KPIResult("k", value, 10, None, target, None, None, 0, direction)


@pytest.mark.parametrize(
    ("value", "target", "direction", "expected"),
    [
        (0.9, 0.8, "up", True),
        (0.7, 0.8, "up", False),
        (30.0, 60.0, "down", True),  # cycle time below target is good
        (90.0, 60.0, "down", False),
        (None, 60.0, "down", None),
        (5.0, None, "up", None),
    ],
)
def test_meets_target_follows_direction(
    value: float | None, target: float | None, direction: str, expected: bool | None
) -> None:
    assert _result(value, target, direction).meets_target is expected
