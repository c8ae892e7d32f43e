"""Typed errors of the model layer: each says what to fix, none carries a key or a base URL."""

from __future__ import annotations

from controltower.spec.errors import StepFailure


class ModelsNotInstalledError(StepFailure):
    """An optional dependency for models is missing; the message names the extra to install (not retried)."""

    code = "extra_missing"

    def __init__(self, what: str, extra: str, *, package: str | None = None) -> None:
        wanted = package or f"controltower[{extra}]"
        super().__init__(
            f"{what} needs the optional dependencies of {wanted}", hint=f"pip install '{wanted}'"
        )
        self.extra = extra


class ModelConfigError(StepFailure):
    """A model name or its settings (API key, base URL) are wrong or missing: not retried."""

    code = "model_config"


class ModelNotConfiguredError(StepFailure):
    code = "model_not_configured"


class ModelBudgetExceededError(StepFailure):
    """A model call would pass a budget cap and the budget says stop (or the fallback is over too)."""

    code = "budget_exceeded"


class ModelUnavailableError(StepFailure):
    """Every model of the chain failed or timed out; retryable (the step's retry policy decides)."""

    code = "model_unavailable"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, retryable=True, hint=hint)


class InvalidModelOutputError(StepFailure):
    """The model's output broke the agent's output_schema after every re-ask."""

    code = "invalid_output"


class RemoteAgentError(StepFailure):
    code = "remote_agent_error"
