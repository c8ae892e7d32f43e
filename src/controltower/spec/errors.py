"""Typed errors with stable codes.

Every error a user can cause carries a code (stable, machine-readable) and a
message that says what to fix. The CLI prints one line per error; the API will
turn the same objects into problem documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TowerError(Exception):
    """Base of every error Control Tower raises on purpose."""

    code: str = "tower_error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a workflow spec, located as precisely as we can."""

    path: str
    message: str
    hint: str | None = None
    file: str | None = None
    line: int | None = None
    code: str = "spec_invalid"

    def render(self) -> str:
        where = self.file or "<spec>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        text = f"{where}: {self.path or '<root>'}: {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class SpecError(TowerError):
    """A spec failed to load or validate; carries every issue found, not just the first."""

    code = "spec_invalid"

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = issues
        count = len(issues)
        first = issues[0].render() if issues else "no details"
        super().__init__(f"{count} problem(s) in spec; first: {first}")


class NotFoundError(TowerError):
    code = "not_found"


class ConflictError(TowerError):
    code = "conflict"


class InvalidInputError(TowerError):
    code = "invalid_input"


class ExtraMissingError(TowerError):
    """A feature needs an optional extra that is not installed; the hint names the pip command."""

    code = "extra_missing"


class InvalidStateError(TowerError):
    """The operation is not allowed in the object's current state (e.g. approving a finished run)."""

    code = "invalid_state"


class StoreError(TowerError):
    code = "store_error"


class LeaseLostError(StoreError):
    """This process no longer holds the run: another engine took it over. Stop, write nothing."""

    code = "lease_lost"


class ExpressionError(TowerError):
    code = "expression_error"


class StepFailure(TowerError):
    """Raised by a step implementation to fail the step with a business reason (not retried)."""

    code = "step_failed"

    def __init__(self, message: str, *, retryable: bool = False, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


@dataclass
class ErrorInfo:
    """What we persist about a failure: enough to show and to decide on retries."""

    type: str
    message: str
    code: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        code = getattr(exc, "code", None)
        message = str(exc) or type(exc).__name__
        return cls(type=type(exc).__name__, message=message[:2000], code=code)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {"type": self.type, "message": self.message}
        if self.code:
            data["code"] = self.code
        if self.details:
            data["details"] = self.details
        return data
