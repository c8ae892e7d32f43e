"""The eval-suite file (`eval.yaml`): models, loading, and cases read from data files.

The format is documented in FORMAT.md beside this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from controltower.spec.errors import SpecError, SpecIssue
from controltower.spec.models import Duration

Decision = Literal["approve", "reject", "leave"]
RunOutcome = Literal["completed", "failed", "cancelled", "waiting", "timeout", "invalid_input"]
DEFAULT_TIMEOUT = 30.0


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CountRange(_Model):
    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)


class Expect(_Model):
    """What a case's run must look like; only the keys given are checked."""

    status: RunOutcome | None = None
    output: dict[str, Any] | None = None
    steps: dict[str, Any] | None = None
    steps_ran: list[str] | None = None
    steps_not_ran: list[str] | None = None
    tools_called: list[str] | None = None
    tools_not_called: list[str] | None = None
    tool_outcomes: dict[str, str] | None = None
    approvals: int | CountRange | None = Field(default=None)
    escalated: bool | None = None
    error: str | None = None

    @field_validator("approvals")
    @classmethod
    def _non_negative(cls, value: int | CountRange | None) -> int | CountRange | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("approvals cannot be negative")
        return value


Decisions = Decision | dict[str, Decision]


class Case(_Model):
    id: str = Field(min_length=1, max_length=200)
    description: str | None = None
    input: Any = None
    expect: Expect = Field(default_factory=Expect)
    approvals: Decisions | None = None
    required: bool = False
    timeout: Duration | None = None


class CasesFrom(_Model):
    file: str = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)
    id_key: str = "id"
    expect_key: str = "_expect"
    approvals_key: str = "_approvals"
    defaults: dict[str, Any] = Field(default_factory=dict, description="Merged under each expectation.")


class Escalation(_Model):
    tools: list[str] = Field(default_factory=lambda: ["escalate"])
    output: dict[str, Any] | None = None


class ApproverSpec(_Model):
    label: str = Field(default="eval auto-approver", min_length=1, max_length=100)
    default: Decision = "approve"


class PassSpec(_Model):
    min_pass_rate: float = Field(default=1.0, ge=0.0, le=1.0)


class SuiteSpec(_Model):
    suite: str | None = None
    description: str | None = None
    workflow: str = "workflow.yaml"
    policies: str | bool | None = None
    env: dict[str, str] = Field(default_factory=dict)
    concurrency: int = Field(default=1, ge=1, le=64)
    timeout: Duration = DEFAULT_TIMEOUT
    use_model: bool = False
    escalation: Escalation = Field(default_factory=lambda: Escalation(output={"escalated": True}))
    approver: ApproverSpec = Field(default_factory=ApproverSpec)
    pass_: PassSpec = Field(default_factory=PassSpec, alias="pass")
    cases: list[Case] = Field(default_factory=list)
    cases_from: list[CasesFrom] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_cases(self) -> SuiteSpec:
        if not self.cases and not self.cases_from:
            raise ValueError("a suite needs `cases` or `cases_from`")
        return self


class Suite:
    """A loaded suite: the spec, where it lives, and every case (inline and from files)."""

    def __init__(self, spec: SuiteSpec, path: Path, cases: list[Case]) -> None:
        self.spec = spec
        self.path = path
        self.cases = cases

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def workflow_path(self) -> Path:
        return (self.folder / self.spec.workflow).resolve()

    @property
    def policies_dir(self) -> Path | None:
        chosen = self.spec.policies
        if chosen is False:
            return None
        if isinstance(chosen, str):
            return (self.folder / chosen).resolve()
        default = self.workflow_path.parent / "policies"
        return default if default.is_dir() else None


def suite_path(target: str | Path) -> Path:
    """A directory means its ``eval.yaml``."""
    path = Path(target)
    if path.is_dir():
        path = path / "eval.yaml"
    return path


def load_suite(target: str | Path) -> Suite:
    """Read and validate a suite; every problem is reported as a SpecError issue."""
    path = suite_path(target)
    file = str(path)
    if not path.is_file():
        raise SpecError(
            [
                SpecIssue(
                    path="",
                    message="no eval suite here",
                    hint="pass DIR/eval.yaml or a DIR with one",
                    file=file,
                )
            ]
        )
    data = _read_structured(path, file)
    if not isinstance(data, dict):
        raise SpecError(
            [SpecIssue(path="", message="an eval suite is a mapping (suite, workflow, cases)", file=file)]
        )
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_issues(exc, file)) from None
    cases = list(spec.cases)
    issues: list[SpecIssue] = []
    for index, source in enumerate(spec.cases_from):
        try:
            cases.extend(_cases_from(path.parent, source))
        except SpecError as exc:
            issues.extend(
                SpecIssue(
                    path=f"cases_from.{index}" + (f".{i.path}" if i.path else ""),
                    message=i.message,
                    hint=i.hint,
                    file=i.file or file,
                )
                for i in exc.issues
            )
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            issues.append(
                SpecIssue(
                    path="cases",
                    message=f"duplicate case id {case.id!r}",
                    file=file,
                    hint="case ids must be unique across the suite",
                )
            )
        seen.add(case.id)
    if issues:
        raise SpecError(issues)
    return Suite(spec, path.resolve(), cases)


def _read_structured(path: Path, file: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([SpecIssue(path="", message=f"cannot read: {exc.strerror}", file=file)]) from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return YAML(typ="safe", pure=True).load(text)
    except (json.JSONDecodeError, YAMLError) as exc:
        raise SpecError(
            [SpecIssue(path="", message=f"cannot parse {path.suffix or 'YAML'}: {exc}", file=file)]
        ) from None


def _cases_from(folder: Path, source: CasesFrom) -> list[Case]:
    path = (folder / source.file).resolve()
    file = str(path)
    if path.suffix not in (".yaml", ".yml", ".json", ".jsonl"):
        raise SpecError(
            [
                SpecIssue(
                    path="file",
                    message=f"unsupported case file {source.file!r}",
                    hint="use .yaml, .yml, .json or .jsonl",
                    file=file,
                )
            ]
        )
    if not path.is_file():
        raise SpecError([SpecIssue(path="file", message=f"no such file {source.file!r}", file=file)])
    records = _read_structured(path, file)
    if not isinstance(records, list):
        raise SpecError([SpecIssue(path="", message="a case file holds a list of records", file=file)])
    if source.limit is not None:
        records = records[: source.limit]
    cases: list[Case] = []
    issues: list[SpecIssue] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            issues.append(SpecIssue(path=str(index), message="each record is a mapping", file=file))
            continue
        if "input" in record:
            data = dict(record)
            data.setdefault("id", f"{path.name}#{index}")
            data["expect"] = {**source.defaults, **(data.get("expect") or {})}
        else:
            raw = dict(record)
            expect = raw.pop(source.expect_key, None) or {}
            approvals = raw.pop(source.approvals_key, None)
            ident = raw.get(source.id_key)
            data = {
                "id": str(ident) if ident not in (None, "") else f"{path.name}#{index}",
                "input": {k: v for k, v in raw.items() if not str(k).startswith("_")},
                "expect": {**source.defaults, **expect},
            }
            if approvals is not None:
                data["approvals"] = approvals
        try:
            cases.append(Case.model_validate(data))
        except ValidationError as exc:
            issues.extend(_issues(exc, file, prefix=str(index)))
    if issues:
        raise SpecError(issues)
    return cases


def _issues(exc: ValidationError, file: str, prefix: str = "") -> list[SpecIssue]:
    issues = []
    for error in exc.errors():
        parts = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "literal["))]
        path = ".".join([prefix, *parts] if prefix else parts)
        issues.append(SpecIssue(path=path, message=error["msg"], file=file, code="eval_invalid"))
    return issues
