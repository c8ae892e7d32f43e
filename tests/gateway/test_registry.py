"""The registry: immutable versions, exact and latest resolution, executors rebuilt from a reference."""

from __future__ import annotations

from typing import Any

import pytest

from controltower.gateway.registry import ToolRegistry, ToolUnavailableError, UnknownToolError
from controltower.gateway.tools import ExecContext, ToolDefinition
from controltower.spec.errors import ConflictError
from controltower.store import SqlStore


def tool(name: str = "crm.lookup", version: str = "1", **fields: Any) -> ToolDefinition:
    return ToolDefinition(name=name, version=version, owner="sales-ops", **fields)


async def test_register_resolve_and_immutability(store: SqlStore) -> None:
    reg = ToolRegistry(store)
    await reg.register(tool(description="find a contact"))
    await reg.register(tool(description="find a contact"))  # identical: no-op
    with pytest.raises(ConflictError) as info:
        await reg.register(tool(description="changed"))
    assert "new version" in (info.value.hint or "")
    await reg.register(tool(version="2", description="v2"))
    assert (await reg.resolve("crm.lookup")).version == "2"
    assert (await reg.resolve("crm.lookup", "1")).description == "find a contact"
    # a fresh registry (another process) sees the same thing
    other = ToolRegistry(store, cache_ttl=0)
    assert (await other.resolve("crm.lookup")).version == "2"
    assert [t.version for t in await other.versions("crm.lookup")] == ["1", "2"]


async def test_deprecated_versions_are_not_picked_as_latest(store: SqlStore) -> None:
    reg = ToolRegistry(store, cache_ttl=0)
    await reg.register(tool(version="1"))
    await reg.register(tool(version="2", deprecated="use v1, v2 double-books"))
    assert (await reg.resolve("crm.lookup")).version == "1"
    assert (await reg.resolve("crm.lookup", "2")).deprecated
    assert [t.version for t in await reg.latest(include_deprecated=False)] == ["1"]
    await reg.register(tool("old.tool", deprecated="retired"))
    assert {t.name for t in await reg.latest()} == {"crm.lookup", "old.tool"}
    assert {t.name for t in await reg.latest(include_deprecated=False)} == {"crm.lookup"}


async def test_unknown_tools_are_errors_with_suggestions(store: SqlStore) -> None:
    reg = ToolRegistry(store)
    await reg.register(tool())
    with pytest.raises(UnknownToolError) as info:
        await reg.resolve("crm.lookpu")
    assert "crm.lookup" in (info.value.hint or "")
    with pytest.raises(UnknownToolError):
        await reg.resolve("crm.lookup", "9")


async def test_tenants_have_separate_registries(store: SqlStore) -> None:
    reg = ToolRegistry(store)
    await reg.register(tool(), tenant="acme")
    with pytest.raises(UnknownToolError):
        await reg.resolve("crm.lookup", tenant="globex")
    assert await reg.names(tenant="globex") == []
    assert await reg.names(tenant="acme") == ["crm.lookup"]


async def test_executor_bound_or_rebuilt_from_reference(store: SqlStore) -> None:
    reg = ToolRegistry(store)
    echo = tool("util.echo", source="builtin", source_ref={"impl": "builtin:echo"})
    await reg.register(echo)
    other = ToolRegistry(store)
    execute = other.executor(await other.resolve("util.echo"))
    ctx = ExecContext(tool=echo, env="dev", idempotency_key="k")
    assert await execute({"a": 1}, ctx) == {"a": 1}
    remote = tool("mystery.thing", source="python", source_ref={})  # nothing to rebuild it from
    await reg.register(remote)
    with pytest.raises(ToolUnavailableError):
        other.executor(remote)

    async def bound(args: dict[str, Any], ctx: ExecContext) -> Any:
        return "bound"

    other.bind(remote, bound)
    assert await other.executor(remote)({}, ctx) == "bound"
