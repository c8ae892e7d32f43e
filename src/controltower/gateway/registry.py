"""The tool registry: immutable, versioned tool definitions per tenant, and their executors.

Definitions live in the store (so the CLI, the API and every process see the same
registry); executors live in the process that registered them, or are rebuilt from the
definition's ``source_ref`` (a Python ``module:function``) when another process needs one.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from controltower.gateway.tools import Executor, ToolDefinition, ToolError
from controltower.spec.errors import ConflictError, NotFoundError, TowerError
from controltower.store import tables as t
from controltower.store.sql import SqlStore


class UnknownToolError(NotFoundError):
    code = "unknown_tool"


class ToolUnavailableError(TowerError):
    """The definition exists but this process cannot execute it (no executor, no source)."""

    code = "tool_unavailable"


@dataclass(frozen=True, slots=True)
class ToolSummary:
    name: str
    version: str
    owner: str
    side_effect: str
    risk: str
    deprecated: str | None


class ToolRegistry:
    def __init__(self, store: SqlStore, *, cache_ttl: float = 1.0) -> None:
        self.store = store
        self._ttl = cache_ttl
        self._exact: dict[tuple[str, str, str], ToolDefinition] = {}
        self._latest: dict[tuple[str, str], tuple[float, ToolDefinition]] = {}
        self._executors: dict[tuple[str, str, str], Executor] = {}
        self._mcp: Any = None

    # -- registering ---------------------------------------------------------------

    async def register(
        self, tool: ToolDefinition, executor: Executor | None = None, *, tenant: str = "default"
    ) -> ToolDefinition:
        """Add a version. Re-registering the identical definition is a no-op; a changed one is refused."""
        digest = tool.digest()
        row = {
            "tenant": tenant,
            "name": tool.name,
            "version": tool.version,
            "digest": digest,
            "owner": tool.owner,
            "side_effect": tool.side_effect,
            "risk": tool.risk,
            "definition": json.dumps(tool.model_dump(mode="json"), sort_keys=True),
            "deprecated": tool.deprecated,
            "created_at": time.time(),
        }

        def fn(conn: sa.Connection) -> str | None:
            existing = conn.execute(
                sa.select(t.tools.c.digest).where(
                    t.tools.c.tenant == tenant, t.tools.c.name == tool.name, t.tools.c.version == tool.version
                )
            ).scalar()
            if existing is None:
                conn.execute(t.tools.insert().values(**row))
            return existing

        existing = await self.store.run(fn)
        if existing is not None and existing != digest:
            raise ConflictError(
                f"tool {tool.name} version {tool.version} is already registered with a different definition",
                hint="versions are immutable: register the change as a new version",
            )
        key = (tenant, tool.name, tool.version)
        self._exact[key] = tool
        self._latest.pop((tenant, tool.name), None)
        if executor is not None:
            self._executors[key] = executor
        return tool

    async def register_many(
        self, tools: Sequence[tuple[ToolDefinition, Executor | None]], *, tenant: str = "default"
    ) -> list[ToolDefinition]:
        return [await self.register(tool, executor, tenant=tenant) for tool, executor in tools]

    def bind(self, tool: ToolDefinition, executor: Executor, *, tenant: str = "default") -> None:
        """Attach an executor in this process to a definition registered elsewhere."""
        self._executors[(tenant, tool.name, tool.version)] = executor

    # -- resolving -----------------------------------------------------------------

    async def resolve(
        self, name: str, version: str | None = None, *, tenant: str = "default"
    ) -> ToolDefinition:
        """The exact version, or the newest non-deprecated one; unknown names are an error, not a guess."""
        if version is not None:
            hit = self._exact.get((tenant, name, version))
            if hit is not None:
                return hit
        else:
            cached = self._latest.get((tenant, name))
            if cached is not None and time.monotonic() - cached[0] < self._ttl:
                return cached[1]
        found = await self.store.run(lambda conn: _load(conn, tenant, name, version))
        if found is None:
            names = await self.names(tenant=tenant)
            close = difflib.get_close_matches(name, names, n=3)
            what = f"tool {name!r}" + (f" version {version}" if version else "")
            hint = f"did you mean {', '.join(close)}?" if close else "list tools with: tower tools list"
            raise UnknownToolError(f"no {what} in the registry of tenant {tenant!r}", hint=hint)
        self._exact[(tenant, found.name, found.version)] = found
        if version is None:
            self._latest[(tenant, name)] = (time.monotonic(), found)
        return found

    async def names(self, *, tenant: str = "default") -> list[str]:
        def fn(conn: sa.Connection) -> list[str]:
            query = sa.select(t.tools.c.name).where(t.tools.c.tenant == tenant).distinct()
            return sorted(r[0] for r in conn.execute(query))

        return await self.store.run(fn)

    async def latest(
        self, *, tenant: str = "default", include_deprecated: bool = True
    ) -> list[ToolDefinition]:
        """Every tool at its newest version."""

        def fn(conn: sa.Connection) -> list[ToolDefinition]:
            rows = conn.execute(
                sa.select(t.tools.c.definition)
                .where(t.tools.c.tenant == tenant)
                .order_by(t.tools.c.name, t.tools.c.created_at)
            )
            newest: dict[str, ToolDefinition] = {}
            for (text,) in rows:
                tool = ToolDefinition.model_validate_json(text)
                held = newest.get(tool.name)
                # the newest live version wins, as in resolve(); a deprecated one only if none is live
                if held is None or tool.deprecated is None or held.deprecated is not None:
                    newest[tool.name] = tool
            return list(newest.values())

        tools = await self.store.run(fn)
        return [x for x in tools if include_deprecated or x.deprecated is None]

    async def versions(self, name: str, *, tenant: str = "default") -> list[ToolDefinition]:
        def fn(conn: sa.Connection) -> list[ToolDefinition]:
            rows = conn.execute(
                sa.select(t.tools.c.definition)
                .where(t.tools.c.tenant == tenant, t.tools.c.name == name)
                .order_by(t.tools.c.created_at)
            )
            return [ToolDefinition.model_validate_json(text) for (text,) in rows]

        return await self.store.run(fn)

    def executor(self, tool: ToolDefinition, *, tenant: str = "default") -> Executor:
        key = (tenant, tool.name, tool.version)
        found = self._executors.get(key)
        if found is not None:
            return found
        built = self._rebuild(tool)
        if built is None:
            raise ToolUnavailableError(
                f"tool {tool.name} v{tool.version} ({tool.source}) has no executor in this process",
                hint="register it here with its function, or start the process that serves it",
            )
        self._executors[key] = built
        return built

    def _rebuild(self, tool: ToolDefinition) -> Executor | None:
        """An executor from the definition alone, for tools registered by another process."""
        ref = tool.source_ref
        impl = ref.get("impl")
        if tool.source == "python" and ref.get("calling") == "kwargs" and isinstance(impl, str):
            from controltower.gateway.sources.python import load_python_tool

            return load_python_tool(impl, base_dir=ref.get("base_dir"))[1]
        if tool.source in ("python", "spec", "builtin") and isinstance(impl, str):
            return python_executor(impl, ref.get("base_dir"))
        if tool.source == "openapi":
            from controltower.gateway.sources.openapi import openapi_executor

            return openapi_executor(tool)
        if tool.source == "mcp":
            try:
                from controltower.gateway.sources.mcp import MCPConnections
            except ImportError:  # the mcp extra is not installed
                return None
            if self._mcp is None:
                self._mcp = MCPConnections()
            executor: Executor = self._mcp.executor(tool)
            return executor
        return None

    async def aclose(self) -> None:
        """Close connections opened for rebuilt executors (MCP sessions)."""
        if self._mcp is not None:
            await self._mcp.aclose()
            self._mcp = None


def python_executor(impl: str, base_dir: str | None = None) -> Executor:
    """An executor for a 'module:function' or 'builtin:NAME' callable (the engine's resolver)."""
    from controltower.engine.callables import resolve

    target = resolve(impl, base_dir)

    async def execute(args: dict[str, Any], ctx: Any) -> Any:
        try:
            return await target(args, ctx)
        except TowerError:
            raise
        except Exception as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}", retryable=False) from exc

    return execute


def _load(conn: sa.Connection, tenant: str, name: str, version: str | None) -> ToolDefinition | None:
    query = sa.select(t.tools.c.definition, t.tools.c.deprecated).where(
        t.tools.c.tenant == tenant, t.tools.c.name == name
    )
    if version is not None:
        row = conn.execute(query.where(t.tools.c.version == version)).first()
        return None if row is None else ToolDefinition.model_validate_json(row[0])
    rows = conn.execute(query.order_by(t.tools.c.created_at)).all()
    if not rows:
        return None
    live = [r for r in rows if r[1] is None]
    return ToolDefinition.model_validate_json((live or rows)[-1][0])
