"""How step code reaches memory: ``ctx.memory``, bound to the run's tenant and workflow.

The engine binds its :class:`Memory` for the task that drives a run (a context variable, so
concurrent runs of different engines in one process never mix); without one, the step
context's store is used. ``ctx.memory`` builds a view for the step's tenant and workflow
whose reads are recorded as the step's provenance.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

from controltower.spec.errors import TowerError

if TYPE_CHECKING:
    from controltower.engine.context import StepContext
    from controltower.memory.store import Memory, MemoryView

_CURRENT: ContextVar[Memory | None] = ContextVar("controltower_memory", default=None)


class MemoryUnavailable(TowerError):
    code = "memory_unavailable"


def bind_memory(memory: Memory | None) -> Token[Memory | None]:
    """Make ``memory`` what ``ctx.memory`` uses in this task and the tasks it starts."""
    return _CURRENT.set(memory)


def current_memory() -> Memory | None:
    return _CURRENT.get()


def view_for(ctx: StepContext) -> MemoryView:
    memory = _CURRENT.get()
    if memory is None and ctx.store is not None:
        from controltower.memory.store import Memory

        memory = Memory(ctx.store)
    if memory is None:
        raise MemoryUnavailable(
            "no memory is bound here: ctx.memory works inside runs of an engine",
            hint="outside an engine, call controltower.memory.bind_memory(Memory(store)) first",
        )
    return memory.view(ctx.tenant, ctx.workflow, on_read=ctx.record_read)
