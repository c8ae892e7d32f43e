"""Test doubles for llm agents: no network, no keys, deterministic.

Both build on pydantic-ai's ``FunctionModel``, so agents run the real pydantic-ai loop (tool
calls, structured output, re-asks); only the model's answers are yours::

    from controltower.models import override_models
    from controltower.models.testing import ScriptedModel, call, output

    model = ScriptedModel([call("lookup", ticket="T-1"), output({"category": "billing"})])
    with override_models(default=model):
        ...  # run the workflow; every llm agent talks to `model`
    assert model.calls == 2

A reply is a string (text), :func:`call` (a tool call), :func:`output` (the final structured
output), a list of those (one response with several parts), or a pydantic-ai ``ModelResponse``.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from pydantic_ai.messages import ModelMessage, ModelResponse, ModelResponsePart, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo
from pydantic_ai.models.function import FunctionModel as _PydanticFunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage

__all__ = [
    "AgentInfo",
    "FunctionModel",
    "Output",
    "ScriptExhaustedError",
    "ScriptedModel",
    "TestModel",
    "ToolCall",
    "call",
    "output",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    tool: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Output:
    data: Any


Part: TypeAlias = str | ToolCall | Output
Reply: TypeAlias = Part | list[Part] | ModelResponse


def call(tool: str, /, **args: Any) -> ToolCall:
    """The model asks for ``tool`` (a gateway tool name, or ``agent:<name>``) with ``args``."""
    return ToolCall(tool, args)


def output(data: Any) -> Output:
    """The model's final answer; checked against the agent's output_schema."""
    return Output(data)


class ScriptExhaustedError(AssertionError):
    """The scripted model was asked more often than it has replies."""


def _tool_name(name: str, info: AgentInfo) -> str:
    names = {t.name for t in info.function_tools}
    if name in names:
        return name
    safe = re.sub(r"[^A-Za-z0-9_\-]", "_", name)[:64]
    return safe if safe in names else name


def _part(part: Part, info: AgentInfo) -> ModelResponsePart:
    if isinstance(part, str):
        return TextPart(part)
    if isinstance(part, ToolCall):
        return ToolCallPart(_tool_name(part.tool, info), dict(part.args))
    if info.output_tools:
        return ToolCallPart(info.output_tools[0].name, part.data)
    return TextPart(part.data if isinstance(part.data, str) else json.dumps(part.data))


def to_response(reply: Reply, info: AgentInfo, usage: tuple[int, int] | None = None) -> ModelResponse:
    if isinstance(reply, ModelResponse):
        return reply
    parts = reply if isinstance(reply, list) else [reply]
    response = ModelResponse(parts=[_part(p, info) for p in parts])
    if usage is not None:
        response.usage = RequestUsage(input_tokens=usage[0], output_tokens=usage[1])
    return response


ReplyFunction: TypeAlias = Callable[[list[ModelMessage], AgentInfo], Reply | Awaitable[Reply]]


class FunctionModel(_PydanticFunctionModel):
    """A model whose every answer is ``fn(messages, info)``; counts its calls.

    ``info.function_tools`` lists the tools the agent offers and ``info.output_tools`` the
    structured-output tool. ``usage=(input_tokens, output_tokens)`` fixes what each call
    reports (otherwise pydantic-ai estimates it from the text).
    """

    def __init__(
        self, fn: ReplyFunction, *, name: str = "function", usage: tuple[int, int] | None = None
    ) -> None:
        self.reply_fn = fn
        self.calls = 0
        self.requests: list[list[ModelMessage]] = []
        self.usage_per_call = usage
        super().__init__(self._respond, model_name=name)

    async def _respond(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.calls += 1
        self.requests.append(list(messages))
        reply = self.reply_fn(messages, info)
        if inspect.isawaitable(reply):
            reply = await reply
        return to_response(reply, info, self.usage_per_call)


class ScriptedModel(FunctionModel):
    """Answers with ``replies`` in order, one per model request."""

    def __init__(
        self, replies: Sequence[Reply], *, name: str = "scripted", usage: tuple[int, int] | None = None
    ) -> None:
        self.replies = list(replies)
        super().__init__(self._scripted, name=name, usage=usage)

    def _scripted(self, messages: list[ModelMessage], info: AgentInfo) -> Reply:
        if self.calls > len(self.replies):
            raise ScriptExhaustedError(
                f"the scripted model got request {self.calls} but has {len(self.replies)} replies"
            )
        return self.replies[self.calls - 1]

    @property
    def remaining(self) -> int:
        return len(self.replies) - self.calls
