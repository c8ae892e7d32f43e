"""Python callables behind tools and agents: resolution, built-ins and invocation.

A spec names code as ``package.module:function``; the module is imported with the
workflow's directory on ``sys.path`` so examples work without installing them.
Sync functions run in a worker thread so a slow one never stalls other runs.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from controltower.engine.context import StepContext
from controltower.spec.errors import StepFailure, TowerError


class RefNotFound(Exception):
    """``module:attr`` could not be loaded; ``import_error`` is set when the import itself failed."""

    def __init__(self, module_name: str, attr: str, import_error: str | None) -> None:
        super().__init__(f"{module_name}:{attr}")
        self.module_name = module_name
        self.attr = attr
        self.import_error = import_error


def load_ref(module_name: str, attr: str, base_dir: str | None = None) -> Any:
    """Import ``module_name`` (``base_dir`` first on ``sys.path``) and follow the dotted ``attr``.

    Shared by step implementations and python tools; each turns :class:`RefNotFound` into its
    own typed error.
    """
    if base_dir and base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RefNotFound(module_name, attr, str(exc)) from None
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise RefNotFound(module_name, attr, None)
    return target


class ImplNotFoundError(TowerError):
    code = "impl_not_found"


async def _noop(payload: Any) -> dict[str, Any]:
    return {}


async def _echo(payload: Any) -> Any:
    return payload


async def _sleep(payload: Any) -> dict[str, Any]:
    seconds = float((payload or {}).get("seconds", 0))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


async def _fail(payload: Any) -> Any:
    message = str((payload or {}).get("message", "failed on purpose"))
    raise StepFailure(message, retryable=bool((payload or {}).get("retryable", False)))


BUILTINS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "noop": _noop,
    "echo": _echo,
    "sleep": _sleep,
    "fail": _fail,
}


@dataclass(frozen=True, slots=True)
class Callable_:
    fn: Callable[..., Any]
    is_async: bool
    wants_ctx: bool

    async def __call__(self, payload: Any, ctx: StepContext) -> Any:
        args: tuple[Any, ...] = (payload, ctx) if self.wants_ctx else (payload,)
        if self.is_async:
            return await self.fn(*args)
        return await asyncio.to_thread(self.fn, *args)


_cache: dict[tuple[str, str | None], Callable_] = {}


def resolve(impl: str, base_dir: str | None = None) -> Callable_:
    """Find the callable named by ``impl`` ('module:function' or 'builtin:NAME')."""
    cached = _cache.get((impl, base_dir))
    if cached is not None:
        return cached
    module_name, _, attr = impl.partition(":")
    if module_name == "builtin":
        builtin = BUILTINS.get(attr)
        if builtin is None:
            raise ImplNotFoundError(f"no built-in {attr!r}", hint=f"built-ins: {', '.join(sorted(BUILTINS))}")
        found = Callable_(builtin, True, False)
    else:
        try:
            fn = load_ref(module_name, attr, base_dir)
        except RefNotFound as exc:
            if exc.import_error is None:
                raise ImplNotFoundError(f"{module_name!r} has no attribute {attr!r}") from None
            raise ImplNotFoundError(
                f"cannot import {module_name!r} for {impl!r}: {exc.import_error}",
                hint="check the module path; it is resolved from the workflow's directory",
            ) from None
        if not callable(fn):
            raise ImplNotFoundError(f"{impl!r} is not callable")
        found = _describe(fn)
    _cache[(impl, base_dir)] = found
    return found


def _describe(fn: Callable[..., Any]) -> Callable_:
    is_async = inspect.iscoroutinefunction(fn)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return Callable_(fn, is_async, False)
    wants_ctx = "ctx" in params or len(params) >= 2
    return Callable_(fn, is_async, wants_ctx)
