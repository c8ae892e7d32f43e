"""What an eval produces: per-case results, the suite verdict, and the regression gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from controltower.spec.errors import InvalidInputError


class Failure(BaseModel):
    """One check that did not hold: which, what was expected, what happened."""

    check: str
    expected: Any = None
    actual: Any = None
    message: str = ""


class CaseResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    passed: bool
    status: str
    description: str | None = None
    required: bool = False
    run_id: str | None = None
    duration_s: float = 0.0
    approvals: int = 0
    escalated: bool = False
    tools_called: list[str] = Field(default_factory=list)
    output: Any = None
    error: str | None = None
    failures: list[Failure] = Field(default_factory=list)


class Regression(BaseModel):
    baseline_pass_rate: float
    newly_failing: list[str] = Field(default_factory=list)
    newly_passing: list[str] = Field(default_factory=list)
    new_cases: list[str] = Field(default_factory=list)
    removed_cases: list[str] = Field(default_factory=list)
    ok: bool = True


class SuiteResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    suite: str
    workflow: str
    passed: bool
    pass_rate: float
    min_pass_rate: float
    cases_total: int
    cases_passed: int
    duration_s: float
    required_failed: list[str] = Field(default_factory=list)
    cases: list[CaseResult] = Field(default_factory=list)
    regression: Regression | None = None

    @property
    def failed_cases(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def verdict(
    suite: str, workflow: str, cases: list[CaseResult], min_pass_rate: float, duration: float
) -> SuiteResult:
    passed = sum(1 for c in cases if c.passed)
    rate = passed / len(cases) if cases else 0.0
    required_failed = [c.id for c in cases if c.required and not c.passed]
    return SuiteResult(
        suite=suite,
        workflow=workflow,
        passed=bool(cases) and rate >= min_pass_rate and not required_failed,
        pass_rate=round(rate, 4),
        min_pass_rate=min_pass_rate,
        cases_total=len(cases),
        cases_passed=passed,
        duration_s=round(duration, 3),
        required_failed=required_failed,
        cases=cases,
    )


def load_baseline(path: str | Path) -> SuiteResult:
    """A result written earlier by ``tower eval --json`` (or ``SuiteResult.to_json``)."""
    file = Path(path)
    try:
        return SuiteResult.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except OSError as exc:
        raise InvalidInputError(f"cannot read baseline {file}: {exc.strerror}") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise InvalidInputError(
            f"{file} is not an eval result: {first}", hint="write one with: tower eval DIR --json > FILE"
        ) from None


def gate(result: SuiteResult, baseline: SuiteResult) -> SuiteResult:
    """Compare with a baseline: a case that passed there and fails now, or a lower pass rate, fails."""
    before = {c.id: c.passed for c in baseline.cases}
    now = {c.id: c.passed for c in result.cases}
    regression = Regression(
        baseline_pass_rate=baseline.pass_rate,
        newly_failing=[i for i, ok in now.items() if i in before and before[i] and not ok],
        newly_passing=[i for i, ok in now.items() if i in before and not before[i] and ok],
        new_cases=[i for i in now if i not in before],
        removed_cases=[i for i in before if i not in now],
    )
    regression.ok = not regression.newly_failing and result.pass_rate >= baseline.pass_rate
    return result.model_copy(update={"regression": regression, "passed": result.passed and regression.ok})
