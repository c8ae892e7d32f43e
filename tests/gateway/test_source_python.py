"""Python functions as tools: schemas from hints and docstrings, validated calls, loading by reference."""

from __future__ import annotations

import asyncio
import enum
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from controltower.gateway.sources.python import PythonTool, load_python_tool, python_tool, tool
from controltower.gateway.tools import ExecContext, RateLimit, ToolDefinition, ToolError, ToolSourceError

FIXTURES = str(Path(__file__).parent / "fixtures")


def ctx_for(definition: ToolDefinition, *, timeout: float | None = None, key: str = "idem-1") -> ExecContext:
    return ExecContext(tool=definition, env="dev", idempotency_key=key, timeout=timeout, run_id="run-1")


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Customer(BaseModel):
    email: str
    vip: bool = False


def create_ticket(
    subject: str,
    customer: Customer,
    priority: Priority = Priority.LOW,
    channel: Literal["email", "chat"] = "email",
    tags: list[str] | None = None,
    weight: float = 1.0,
    counts: dict[str, int] | None = None,
    urgent: bool = False,
    attempts: int = 1,
) -> Customer:
    """Open a ticket for a customer.

    The ticket starts in the triage queue.

    Args:
        subject: One line that says what is wrong.
        customer: Who asked.
        priority: How fast to answer.
        channel: Where the request came in.
        tags: Free-form labels.

    Returns:
        The customer the ticket belongs to.
    """
    return customer


# -- schemas ----------------------------------------------------------------------------------


def test_input_schema_from_type_hints_and_google_docstring() -> None:
    definition, _ = python_tool(create_ticket, owner="support")
    schema = definition.input_schema
    props = schema["properties"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["subject", "customer"]
    assert props["subject"] == {
        "type": "string",
        "title": "Subject",
        "description": "One line that says what is wrong.",
    }
    assert (props["weight"]["type"], props["weight"]["default"]) == ("number", 1.0)
    assert props["urgent"]["type"] == "boolean"
    assert props["attempts"]["type"] == "integer"
    assert props["channel"]["enum"] == ["email", "chat"]
    assert {"type": "array", "items": {"type": "string"}} in props["tags"]["anyOf"]
    assert {"type": "object", "additionalProperties": {"type": "integer"}} in props["counts"]["anyOf"]
    # Models and enums are referenced through $defs, kept in the same schema.
    assert props["customer"]["$ref"] == "#/$defs/Customer"
    assert schema["$defs"]["Customer"]["required"] == ["email"]
    assert schema["$defs"]["Priority"]["enum"] == ["low", "high"]
    assert definition.description == "Open a ticket for a customer.\n\nThe ticket starts in the triage queue."
    assert definition.output_schema is not None
    assert definition.output_schema["properties"]["email"]["type"] == "string"
    assert definition.output_schema["description"] == "The customer the ticket belongs to."
    assert definition.source == "python"
    assert definition.source_ref["impl"] == f"{__name__}:create_ticket"
    assert definition.owner == "support"
    assert (definition.side_effect, definition.risk) == ("read", "low")


def numpy_style(limit: int, query: str = "") -> list[str]:
    """Search tickets.

    Parameters
    ----------
    limit : int
        Most results to return.
    query : str
        Words to look for.
    """
    return [query] * limit


def rest_style(limit: int) -> int:
    """Count tickets.

    :param limit: Stop counting here.
    """
    return limit


@pytest.mark.parametrize(
    ("fn", "param", "text"),
    [(numpy_style, "limit", "Most results to return."), (rest_style, "limit", "Stop counting here.")],
)
def test_parameter_descriptions_from_numpy_and_rest_docstrings(fn: Any, param: str, text: str) -> None:
    definition, _ = python_tool(fn)
    assert definition.input_schema["properties"][param]["description"] == text


def test_ctx_is_injected_not_described_and_any_return_has_no_output_schema() -> None:
    def act(ticket_id: int, ctx: ExecContext) -> Any:
        return ticket_id

    def bare(x):  # type: ignore[no-untyped-def]
        return x

    definition, _ = python_tool(act)
    assert list(definition.input_schema["properties"]) == ["ticket_id"]
    assert definition.output_schema is None
    bare_definition, _ = python_tool(bare)
    assert bare_definition.input_schema["properties"] == {"x": {"title": "X"}}
    assert bare_definition.output_schema is None


def test_options_are_carried_into_the_definition() -> None:
    definition, _ = python_tool(
        rest_style,
        name="tickets.count",
        version="3",
        owner="ops",
        side_effect="irreversible",
        rate_limit=RateLimit(per_second=2),
        cost_micros=50,
        tags=("a",),
    )
    assert definition.name == "tickets.count"
    assert (definition.version, definition.owner, definition.cost_micros) == ("3", "ops", 50)
    assert (definition.side_effect, definition.risk) == ("irreversible", "high")
    assert definition.rate_limit == RateLimit(per_second=2)
    assert definition.tags == ("a",)


def test_parameter_names_that_clash_with_pydantic_still_work() -> None:
    def odd(json: str, model_id: int, schema: bool = False) -> dict[str, Any]:
        return {"json": json, "model_id": model_id, "schema": schema}

    definition, _ = python_tool(odd)
    assert set(definition.input_schema["properties"]) == {"json", "model_id", "schema"}
    assert definition.input_schema["required"] == ["json", "model_id"]


async def test_parameter_names_that_clash_with_pydantic_are_passed_through() -> None:
    def odd(json: str, model_id: int, schema: bool = False) -> dict[str, Any]:
        return {"json": json, "model_id": model_id, "schema": schema}

    definition, execute = python_tool(odd)
    result = await execute({"json": "x", "model_id": 3}, ctx_for(definition))
    assert result == {"json": "x", "model_id": 3, "schema": False}


@pytest.mark.parametrize(
    ("fn", "needle"),
    [
        (lambda *items: items, "*items"),
        (lambda **extra: extra, "*extra"),
    ],
)
def test_var_args_are_rejected(fn: Any, needle: str) -> None:
    with pytest.raises(ToolSourceError, match=r"takes \*") as info:
        python_tool(fn, name="varargs")
    assert needle in str(info.value)


class Opaque:
    """Not a type pydantic can describe."""


def test_unsupported_annotation_and_bad_name_are_source_errors() -> None:
    def takes_opaque(thing: Opaque) -> None:
        return None

    def returns_opaque() -> Opaque:
        return Opaque()

    with pytest.raises(ToolSourceError, match="cannot build an input schema"):
        python_tool(takes_opaque)
    with pytest.raises(ToolSourceError, match="cannot build an output schema"):
        python_tool(returns_opaque)
    with pytest.raises(ToolSourceError, match="cannot define tool"):
        python_tool(rest_style, name="has space")
    with pytest.raises(ToolSourceError, match="not callable"):
        python_tool(42)  # type: ignore[arg-type]


def test_unresolvable_hint_is_a_source_error() -> None:
    def broken(x: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    with pytest.raises(ToolSourceError, match="NoSuchType"):
        python_tool(broken)


# -- execution --------------------------------------------------------------------------------


async def test_sync_tool_runs_in_a_worker_thread_with_coerced_arguments() -> None:
    seen: dict[str, Any] = {}

    def record(ticket_id: int, customer: Customer, priority: Priority = Priority.LOW) -> dict[str, Any]:
        seen["thread"] = threading.get_ident()
        seen["customer"] = customer
        seen["priority"] = priority
        return {"ticket_id": ticket_id, "customer": customer, "priority": priority}

    definition, execute = python_tool(record)
    result = await execute(
        {"ticket_id": "7", "customer": {"email": "a@example.com"}, "priority": "high"}, ctx_for(definition)
    )
    assert seen["thread"] != threading.get_ident()
    assert isinstance(seen["customer"], Customer)
    assert seen["priority"] is Priority.HIGH
    # Outputs are plain JSON: the model and the enum are dumped.
    assert result == {
        "ticket_id": 7,
        "customer": {"email": "a@example.com", "vip": False},
        "priority": "high",
    }


async def test_sync_tool_does_not_block_the_event_loop() -> None:
    def slow() -> str:
        time.sleep(0.3)
        return "done"

    definition, execute = python_tool(slow)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        assert await execute({}, ctx_for(definition)) == "done"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ticks >= 5


async def test_async_tool_is_awaited_and_receives_ctx() -> None:
    async def reply(ticket_id: int, ctx: ExecContext) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"ticket_id": ticket_id, "key": ctx.idempotency_key, "env": ctx.env}

    definition, execute = python_tool(reply, side_effect="write")
    assert await execute({"ticket_id": 5}, ctx_for(definition, key="k-9")) == {
        "ticket_id": 5,
        "key": "k-9",
        "env": "dev",
    }


async def test_positional_only_parameters_and_ctx() -> None:
    def positional(a: int, ctx: ExecContext, /, b: str = "x") -> str:
        return f"{a}-{b}-{ctx.run_id}"

    definition, execute = python_tool(positional)
    assert set(definition.input_schema["properties"]) == {"a", "b"}
    assert await execute({"a": 1, "b": "y"}, ctx_for(definition)) == "1-y-run-1"


async def test_output_returned_through_return_annotation_is_serialized() -> None:
    definition, execute = python_tool(create_ticket)
    result = await execute(
        {"subject": "s", "customer": {"email": "b@example.com", "vip": True}}, ctx_for(definition)
    )
    assert result == {"email": "b@example.com", "vip": True}


async def test_invalid_arguments_list_every_bad_field() -> None:
    definition, execute = python_tool(create_ticket)
    with pytest.raises(ToolError) as info:
        await execute({"customer": {"vip": "maybe"}, "attempts": "many", "surprise": 1}, ctx_for(definition))
    message = str(info.value)
    assert "invalid arguments for tool create_ticket" in message
    for field in ("subject", "customer.email", "customer.vip", "attempts", "surprise"):
        assert field in message, field
    assert info.value.retryable is False


async def test_failures_become_tool_errors() -> None:
    def boom() -> None:
        raise ValueError("ticket 9 is locked")

    def flaky() -> None:
        raise ConnectionResetError("peer went away")

    def typed() -> None:
        raise ToolError("quota exhausted", hint="wait", retryable=True)

    def unserializable() -> Any:
        return object()

    for fn, pattern, retryable in [
        (boom, "ValueError: ticket 9 is locked", False),
        (flaky, "ConnectionResetError: peer went away", True),
        (typed, "quota exhausted", True),
        (unserializable, "not JSON-serializable", False),
    ]:
        definition, execute = python_tool(fn)
        with pytest.raises(ToolError, match=pattern) as info:
            await execute({}, ctx_for(definition))
        assert info.value.retryable is retryable, fn.__name__


async def test_timeout_is_honoured_and_retryable() -> None:
    async def stalls() -> None:
        await asyncio.sleep(5)

    definition, execute = python_tool(stalls)
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"did not finish within 0.1s") as info:
        await execute({}, ctx_for(definition, timeout=0.1))
    assert info.value.retryable is True
    assert time.monotonic() - started < 2


async def test_timeout_error_raised_by_the_tool_itself_is_not_reported_as_ours() -> None:
    def own_timeout() -> None:
        raise TimeoutError("upstream was slow")

    definition, execute = python_tool(own_timeout)
    with pytest.raises(ToolError, match="upstream was slow") as info:
        await execute({}, ctx_for(definition, timeout=30))
    assert info.value.retryable is True


# -- decorator and loading by reference -----------------------------------------------------


async def test_decorator_keeps_the_function_callable_and_defines_the_tool() -> None:
    @tool
    def plain(x: int) -> int:
        """Double it."""
        return x * 2

    @tool(name="math.triple", side_effect="write", risk="critical", owner="math")
    async def triple(x: int) -> int:
        return x * 3

    assert isinstance(plain, PythonTool)
    assert plain(4) == 8
    assert (plain.definition.name, plain.definition.description) == ("plain", "Double it.")
    assert await plain.executor({"x": 2}, ctx_for(plain.definition)) == 4
    assert await triple(2) == 6
    definition, execute = triple.pair
    assert (definition.name, definition.side_effect, definition.risk, definition.owner) == (
        "math.triple",
        "write",
        "critical",
        "math",
    )
    assert await execute({"x": 2}, ctx_for(definition)) == 6


async def test_load_decorated_tool_by_reference_keeps_decorator_options() -> None:
    definition, execute = load_python_tool("helpdesk_tools:reply", base_dir=FIXTURES)
    assert definition.name == "helpdesk.reply"
    assert (definition.side_effect, definition.owner, definition.tags) == ("write", "support", ("helpdesk",))
    assert definition.input_schema["properties"]["message"]["description"] == "Text sent to the customer."
    assert definition.source_ref["impl"] == "helpdesk_tools:reply"
    result = await execute({"ticket_id": 1, "message": "hi"}, ctx_for(definition, key="k-2"))
    assert result == {"ticket_id": 1, "message": "hi", "key": "k-2"}


async def test_load_plain_function_with_overrides() -> None:
    definition, execute = load_python_tool(
        "helpdesk_tools:lookup", base_dir=FIXTURES, name="helpdesk.lookup", owner="support"
    )
    assert (definition.name, definition.owner) == ("helpdesk.lookup", "support")
    assert definition.output_schema is not None
    assert definition.output_schema["title"] == "Ticket"
    assert await execute({"ticket_id": 3}, ctx_for(definition)) == {
        "id": 3,
        "subject": "ticket 3",
        "status": "open",
    }


async def test_load_from_base_dir(tmp_path: Path) -> None:
    module = f"ct_tmp_tools_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(
        "from __future__ import annotations\n\n"
        "def greet(name: str = 'world') -> str:\n"
        '    """Say hello."""\n'
        "    return f'hello {name}'\n"
    )
    try:
        definition, execute = load_python_tool(f"{module}:greet", base_dir=str(tmp_path))
        assert definition.source_ref == {
            "impl": f"{module}:greet",
            "calling": "kwargs",
            "base_dir": str(tmp_path),
        }
        assert await execute({}, ctx_for(definition)) == "hello world"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


@pytest.mark.parametrize(
    ("ref", "pattern"),
    [
        ("no_colon_here", "must look like 'package.module:function'"),
        ("no_such_module_anywhere:fn", "cannot import"),
        ("helpdesk_tools:missing", "has no attribute 'missing'"),
        ("helpdesk_tools:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_references_are_source_errors(ref: str, pattern: str) -> None:
    with pytest.raises(ToolSourceError, match=pattern):
        load_python_tool(ref, base_dir=FIXTURES)
