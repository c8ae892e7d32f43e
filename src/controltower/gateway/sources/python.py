"""Python functions as governed tools.

The function's signature *is* the contract: type hints become the input JSON Schema (via
a pydantic model built from :func:`inspect.signature`), the docstring supplies the tool
and parameter descriptions, and the return annotation becomes the output schema. Every
call validates and coerces the arguments through the same model before the function
runs, so a tool never sees arguments its schema would reject.

Functions take their arguments as keywords (``def lookup(ticket_id: int, ctx: ExecContext)``),
unlike engine step callables, which take one payload. A parameter named ``ctx`` (or
annotated :class:`ExecContext`) is injected and is not part of the schema. Sync functions
run in a worker thread so a slow one never blocks the event loop; ``ctx.timeout`` ends the
wait (a thread cannot be killed, so a timed-out sync function finishes in the background).
Results are returned as plain JSON values (models, enums, dates dumped) because they are
journaled and audited.

``source_ref`` is ``{"impl": "module:qualname", "calling": "kwargs"[, "base_dir": ...]}``;
rebuild the executor with :func:`load_python_tool`, not the engine's payload-style resolver.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar, overload

import docstring_parser
import pydantic
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from controltower.engine.callables import RefNotFound, load_ref
from controltower.gateway.tools import (
    Binding,
    ExecContext,
    Executor,
    RateLimit,
    Risk,
    SideEffect,
    ToolDefinition,
    ToolError,
    ToolSourceError,
)
from controltower.spec.errors import TowerError

__all__ = ["PythonTool", "load_python_tool", "python_tool", "tool"]

P = ParamSpec("P")
R = TypeVar("R")

_CTX_NAME = "ctx"
_MAX_ERROR_FIELDS = 8


class _ArgsBase(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=False)


class PythonTool(Generic[P, R]):
    """What ``@tool`` returns: still callable as the plain function, plus the tool it defines.

    Keeping the function callable means decorated code stays unit-testable and usable
    outside the gateway; :func:`load_python_tool` recognises the wrapper so options given
    to the decorator (name, side effect, risk) survive a round trip through a YAML spec.
    """

    def __init__(self, fn: Callable[P, R], definition: ToolDefinition, executor: Executor) -> None:
        self.fn = fn
        self.definition = definition
        self.executor = executor
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def pair(self) -> tuple[ToolDefinition, Executor]:
        return self.definition, self.executor


@overload
def tool(fn: Callable[P, R], /) -> PythonTool[P, R]: ...


@overload
def tool(
    *,
    name: str | None = None,
    version: str = "1",
    owner: str = "unowned",
    description: str | None = None,
    side_effect: SideEffect = "read",
    risk: Risk | None = None,
    rate_limit: RateLimit | None = None,
    cost_micros: int = 0,
    environments: Mapping[str, Binding] | None = None,
    tags: tuple[str, ...] = (),
    deprecated: str | None = None,
) -> Callable[[Callable[P, R]], PythonTool[P, R]]: ...


def tool(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    version: str = "1",
    owner: str = "unowned",
    description: str | None = None,
    side_effect: SideEffect = "read",
    risk: Risk | None = None,
    rate_limit: RateLimit | None = None,
    cost_micros: int = 0,
    environments: Mapping[str, Binding] | None = None,
    tags: tuple[str, ...] = (),
    deprecated: str | None = None,
) -> PythonTool[P, R] | Callable[[Callable[P, R]], PythonTool[P, R]]:
    """Declare a function as a tool: ``@tool`` or ``@tool(side_effect="write", risk="high")``."""

    def wrap(target: Callable[P, R]) -> PythonTool[P, R]:
        definition, executor = python_tool(
            target,
            name=name,
            version=version,
            owner=owner,
            description=description,
            side_effect=side_effect,
            risk=risk,
            rate_limit=rate_limit,
            cost_micros=cost_micros,
            environments=environments,
            tags=tags,
            deprecated=deprecated,
        )
        return PythonTool(target, definition, executor)

    return wrap(fn) if fn is not None else wrap


def python_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    version: str = "1",
    owner: str = "unowned",
    description: str | None = None,
    side_effect: SideEffect = "read",
    risk: Risk | None = None,
    rate_limit: RateLimit | None = None,
    cost_micros: int = 0,
    environments: Mapping[str, Binding] | None = None,
    tags: tuple[str, ...] = (),
    deprecated: str | None = None,
    base_dir: str | None = None,
) -> tuple[ToolDefinition, Executor]:
    """Build the definition and executor for ``fn``.

    ``risk`` defaults from the side effect (read: low, write: medium, irreversible: high).
    ``base_dir`` is recorded in ``source_ref`` so a registry can re-import the function.
    """
    if isinstance(fn, PythonTool):
        fn = fn.fn
    if not callable(fn):
        raise ToolSourceError(f"{fn!r} is not callable", hint="pass a function or use @tool on one")
    qualname = getattr(fn, "__qualname__", getattr(fn, "__name__", type(fn).__name__))
    label = f"{getattr(fn, '__module__', '?')}:{qualname}"
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    param_docs = {p.arg_name: (p.description or "").strip() for p in doc.params}
    signature = _signature(fn, label)
    hints = _type_hints(fn, label)
    model, plan = _args_model(fn, signature, hints, param_docs, label)
    output_schema, output_adapter = _output(signature, hints, doc, label)

    tool_name: str = name or str(getattr(fn, "__name__", ""))
    summary = "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)
    try:
        definition = ToolDefinition(
            name=tool_name,
            version=version,
            owner=owner,
            description=description if description is not None else summary,
            input_schema=_input_schema(model),
            output_schema=output_schema,
            side_effect=side_effect,
            risk=risk or _DEFAULT_RISK[side_effect],
            environments=dict(environments or {}),
            rate_limit=rate_limit,
            cost_micros=cost_micros,
            deprecated=deprecated,
            source="python",
            source_ref=_source_ref(fn, qualname, base_dir),
            tags=tags,
        )
    except pydantic.ValidationError as exc:
        raise ToolSourceError(
            f"cannot define tool from {label}: {_field_errors(exc)}",
            hint="tool names are letters, digits, '_', '.', '-' (start with a letter or digit)",
        ) from None
    return definition, _executor(fn, tool_name, model, plan, output_adapter)


_DEFAULT_RISK: dict[str, Risk] = {"read": "low", "write": "medium", "irreversible": "high"}


def load_python_tool(
    ref: str, *, base_dir: str | None = None, **overrides: Any
) -> tuple[ToolDefinition, Executor]:
    """Resolve ``'package.module:function'`` (as written in a YAML spec) to a tool.

    A function decorated with ``@tool`` keeps its decorator options unless ``overrides``
    (the keyword arguments of :func:`python_tool`) replace them. ``base_dir`` (usually the
    spec's directory) is put on ``sys.path`` first so examples work without installing.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ToolSourceError(
            f"python tool reference {ref!r} must look like 'package.module:function'",
            hint="separate the module and the function with a colon",
        )
    try:
        target = load_ref(module_name, attr, base_dir)
    except RefNotFound as exc:
        if exc.import_error is None:
            raise ToolSourceError(
                f"module {module_name!r} has no attribute {attr!r} (python tool {ref!r})"
            ) from None
        raise ToolSourceError(
            f"cannot import {module_name!r} for python tool {ref!r}: {exc.import_error}",
            hint="check the module path; it is resolved from the spec's directory and sys.path",
        ) from None
    if isinstance(target, PythonTool):
        if not overrides and base_dir is None:
            return target.pair
        base = target.definition
        options: dict[str, Any] = {
            "name": base.name,
            "version": base.version,
            "owner": base.owner,
            "description": base.description,
            "side_effect": base.side_effect,
            "risk": base.risk,
            "rate_limit": base.rate_limit,
            "cost_micros": base.cost_micros,
            "environments": base.environments,
            "tags": base.tags,
            "deprecated": base.deprecated,
        }
        options.update(overrides)
        return python_tool(target.fn, base_dir=base_dir, **options)
    if not callable(target):
        raise ToolSourceError(f"{ref!r} is not callable", hint="point the reference at a function")
    return python_tool(target, base_dir=base_dir, **overrides)


# --- schema -------------------------------------------------------------------------------


class _Plan:
    """How validated model fields map back onto the function's parameters."""

    def __init__(self) -> None:
        self.positional: list[str] = []  # field names, in order, for positional-only parameters
        self.keyword: dict[str, str] = {}  # field name -> parameter name
        self.ctx_param: str | None = None
        self.ctx_positional_index: int | None = None


def _signature(fn: Callable[..., Any], label: str) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolSourceError(f"cannot read the signature of {label}: {exc}") from None


def _type_hints(fn: Callable[..., Any], label: str) -> dict[str, Any]:
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    try:
        return typing.get_type_hints(target, include_extras=True)
    except NameError as exc:
        raise ToolSourceError(
            f"cannot resolve the type hints of {label}: {exc}",
            hint="annotation types must be importable at module level (not only under TYPE_CHECKING)",
        ) from None
    except TypeError:
        return {}


def _is_ctx(param: inspect.Parameter, hint: Any) -> bool:
    return param.name == _CTX_NAME or hint is ExecContext


def _safe_field_name(name: str, taken: set[str]) -> str:
    """Pydantic reserves some names (``model_*``, BaseModel attributes, leading '_')."""
    candidate = name
    if name.startswith("_") or name.startswith("model_") or hasattr(BaseModel, name):
        candidate = f"p_{name.lstrip('_')}"
    while candidate in taken or hasattr(BaseModel, candidate):
        candidate = f"p_{candidate}"
    taken.add(candidate)
    return candidate


def _args_model(
    fn: Callable[..., Any],
    signature: inspect.Signature,
    hints: Mapping[str, Any],
    param_docs: Mapping[str, str],
    label: str,
) -> tuple[type[BaseModel], _Plan]:
    plan = _Plan()
    fields: dict[str, Any] = {}
    taken: set[str] = set()
    for index, param in enumerate(signature.parameters.values()):
        hint = hints.get(param.name, Any if param.annotation is inspect.Parameter.empty else param.annotation)
        if _is_ctx(param, hint):
            plan.ctx_param = param.name
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                plan.ctx_positional_index = index
            continue
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ToolSourceError(
                f"{label} takes *{param.name}; a tool needs named parameters to describe its input",
                hint="replace *args/**kwargs with explicit parameters (or one dict parameter)",
            )
        field_name = _safe_field_name(param.name, taken)
        info: dict[str, Any] = {}
        if field_name != param.name:
            info["alias"] = param.name
        if param_docs.get(param.name):
            info["description"] = param_docs[param.name]
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[field_name] = (hint, Field(default, **info))
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            plan.positional.append(field_name)
        else:
            plan.keyword[field_name] = param.name
    model_name = "".join(part.capitalize() for part in getattr(fn, "__name__", "tool").split("_")) + "Args"
    try:
        model = pydantic.create_model(model_name, __base__=_ArgsBase, **fields)
        model.model_json_schema()
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        raise ToolSourceError(
            f"cannot build an input schema for {label}: {_first_line(exc)}",
            hint="annotate parameters with JSON types (str, int, float, bool, list, dict, Literal, "
            "Enum, Optional) or pydantic models",
        ) from None
    return model, plan


def _input_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    schema.pop("title", None)
    schema["additionalProperties"] = False
    return schema


def _output(
    signature: inspect.Signature, hints: Mapping[str, Any], doc: docstring_parser.Docstring, label: str
) -> tuple[dict[str, Any] | None, TypeAdapter[Any] | None]:
    annotation = hints.get("return", signature.return_annotation)
    if annotation in (inspect.Signature.empty, Any, None, type(None)):
        return None, None
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        schema = adapter.json_schema(mode="serialization")
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        raise ToolSourceError(
            f"cannot build an output schema for {label} from its return annotation: {_first_line(exc)}",
            hint="return JSON types or a pydantic model, or leave the return unannotated",
        ) from None
    returns = doc.returns.description if doc.returns is not None else None
    if returns and "description" not in schema:
        schema["description"] = returns.strip()
    return schema, adapter


def _source_ref(fn: Callable[..., Any], qualname: str, base_dir: str | None) -> dict[str, Any]:
    ref: dict[str, Any] = {"impl": f"{getattr(fn, '__module__', '')}:{qualname}", "calling": "kwargs"}
    if base_dir:
        ref["base_dir"] = base_dir
    return ref


# --- execution ------------------------------------------------------------------------------


def _executor(
    fn: Callable[..., Any],
    tool_name: str,
    model: type[BaseModel],
    plan: _Plan,
    output_adapter: TypeAdapter[Any] | None,
) -> Executor:
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004

    async def execute(args: dict[str, Any], ctx: ExecContext) -> Any:
        try:
            validated = model.model_validate(args or {})
        except pydantic.ValidationError as exc:
            raise ToolError(
                f"invalid arguments for tool {tool_name}: {_field_errors(exc)}",
                hint="call the tool with arguments matching its input schema",
            ) from None
        positional = [getattr(validated, field) for field in plan.positional]
        keywords = {param: getattr(validated, field) for field, param in plan.keyword.items()}
        if plan.ctx_param is not None:
            if plan.ctx_positional_index is not None:
                positional.insert(plan.ctx_positional_index, ctx)
            else:
                keywords[plan.ctx_param] = ctx
        deadline = asyncio.timeout(ctx.timeout)
        try:
            async with deadline:
                if is_async:
                    result = await fn(*positional, **keywords)
                else:
                    result = await asyncio.to_thread(fn, *positional, **keywords)
        except TowerError:
            raise
        except TimeoutError as exc:
            if deadline.expired():
                raise ToolError(
                    f"tool {tool_name} did not finish within {ctx.timeout}s", retryable=True
                ) from None
            raise ToolError(f"tool {tool_name} timed out: {exc}", retryable=True) from exc
        except ConnectionError as exc:
            raise ToolError(f"tool {tool_name} failed: {type(exc).__name__}: {exc}", retryable=True) from exc
        except Exception as exc:
            raise ToolError(f"tool {tool_name} failed: {type(exc).__name__}: {exc}") from exc
        return _jsonable(tool_name, result, output_adapter)

    return execute


def _jsonable(tool_name: str, result: Any, adapter: TypeAdapter[Any] | None) -> Any:
    """Outputs are journaled and audited, so they must be plain JSON values."""
    try:
        if adapter is not None:
            return adapter.dump_python(result, mode="json", warnings=False)
        return pydantic_core.to_jsonable_python(result)
    except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
        raise ToolError(
            f"tool {tool_name} returned a {type(result).__name__} that is not JSON-serializable: {exc}",
            hint="return dicts, lists, strings, numbers, booleans, None or pydantic models",
        ) from None


def _field_errors(exc: pydantic.ValidationError) -> str:
    parts = []
    for error in exc.errors()[:_MAX_ERROR_FIELDS]:
        where = ".".join(str(x) for x in error.get("loc", ())) or "<arguments>"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = exc.error_count() - _MAX_ERROR_FIELDS
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
