"""Tool definitions: what the registry holds, what every source produces, what the pipeline runs.

A :class:`ToolDefinition` is immutable once registered (name + version). Sources (Python
functions, OpenAPI operations, MCP servers, inline spec tools) all produce one, plus an
:data:`Executor` that performs the call. Executors never see policy, budgets or audit;
they receive the validated arguments and an :class:`ExecContext` with the credentials
scoped to this tool and environment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from controltower.spec.errors import TowerError

SideEffect = Literal["read", "write", "irreversible"]
Risk = Literal["low", "medium", "high", "critical"]
Environment = Literal["dev", "staging", "prod"]
ENVIRONMENTS: tuple[str, ...] = ("dev", "staging", "prod")
RISK_ORDER: dict[str, int] = {"low": 0, "medium": 1, "high": 2, "critical": 3}
TOOL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Binding(_Frozen):
    """How a tool is reached in one environment (a sandbox in dev, the real system in prod)."""

    endpoint: str | None = Field(default=None, description="Base URL or address, if the source needs one.")
    credentials: dict[str, str] = Field(
        default_factory=dict,
        description="Name -> reference: 'env:VAR' or 'file:/path'. Resolved at execution only.",
    )
    settings: dict[str, Any] = Field(default_factory=dict)


class RateLimit(_Frozen):
    per_second: float | None = Field(default=None, gt=0, description="Sustained calls per second.")
    burst: int | None = Field(default=None, ge=1, description="Bucket size; defaults to ceil(per_second).")
    concurrency: int | None = Field(default=None, ge=1, description="Calls in flight at once.")


class ToolDefinition(_Frozen):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    version: str = Field(default="1", min_length=1, max_length=40)
    owner: str = Field(default="unowned", min_length=1)
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    output_schema: dict[str, Any] | None = None
    side_effect: SideEffect = "read"
    risk: Risk = "low"
    environments: dict[str, Binding] = Field(default_factory=dict)
    rate_limit: RateLimit | None = None
    cost_micros: int = Field(default=0, ge=0, description="Price of one call, charged to the budget.")
    deprecated: str | None = Field(default=None, description="Why, and what to use instead.")
    source: Literal["python", "openapi", "mcp", "spec", "builtin"] = "python"
    source_ref: dict[str, Any] = Field(
        default_factory=dict, description="What the source needs to execute it (impl, operation, server)."
    )
    tags: tuple[str, ...] = ()

    @property
    def writes(self) -> bool:
        return self.side_effect != "read"

    def digest(self) -> str:
        """Content hash: the same name and version must always mean the same tool."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def binding(self, env: str) -> Binding:
        return self.environments.get(env) or self.environments.get("default") or Binding()


@dataclass(frozen=True, slots=True)
class ExecContext:
    """What an executor gets besides the arguments. ``credentials`` never leave the executor."""

    tool: ToolDefinition
    env: str
    idempotency_key: str
    credentials: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float | None = None
    run_id: str | None = None
    step_key: str | None = None
    tenant: str = "default"

    @property
    def endpoint(self) -> str | None:
        return self.tool.binding(self.env).endpoint


Executor = Callable[[dict[str, Any], ExecContext], Awaitable[Any]]


class ToolError(TowerError):
    """A tool ran and reported a failure (an HTTP 4xx/5xx, an MCP isError result, an exception)."""

    code = "tool_error"

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool = False) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class ToolSourceError(TowerError):
    """A tool source (OpenAPI document, MCP server, Python function) could not be read."""

    code = "tool_source_invalid"


def args_digest(tool: str, version: str, args: Any) -> str:
    """The digest an approval is bound to: tool, version and the exact canonical arguments."""
    text = json.dumps({"tool": tool, "version": version, "args": args}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
