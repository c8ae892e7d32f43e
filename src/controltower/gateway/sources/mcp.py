"""MCP server tools as governed tools (MCP Python SDK 2.x client).

:class:`MCPToolSource` holds one session to one server, over stdio (a subprocess) or
streamable HTTP, and turns the server's tools into (definition, executor) pairs. The
session lives in a background task that owns it from open to close: the SDK's transports
are anyio task groups that must be exited by the task that entered them, and the registry
opens sources in one task and calls tools from many others.

Side effects come from the server's tool annotations (hints, which we treat as the
server's own claim, never as proof):

=================================================  ==============  ==============
annotations                                        side effect     risk
=================================================  ==============  ==============
``readOnlyHint: true``                             read            low
``destructiveHint: true``                          irreversible    high
``destructiveHint: false``, ``idempotentHint:      write           low
true``, ``openWorldHint: false``
``destructiveHint: false``, ``openWorldHint:       write           medium
false``
anything else (no annotations, destructiveness or  write           high
open world unknown, open-world writes)
=================================================  ==============  ==============

The spec's defaults would make an unannotated tool destructive; we map it to write/high
instead so unannotated servers stay usable, and ``overrides`` fixes any tool explicitly.

``source_ref`` records how to reach the server again (transport, command, args, cwd,
env, or url; never HTTP headers, which usually carry tokens) and the tool's MCP name, so
:class:`MCPConnections` can rebuild executors from stored definitions with one shared
session per server. Keep secrets out of ``env``: it is stored in the definition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from typing import IO, Any, Self

import httpx2
import mcp_types
import pydantic
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from controltower.gateway.tools import (
    ExecContext,
    Executor,
    Risk,
    SideEffect,
    ToolDefinition,
    ToolError,
    ToolSourceError,
)

__all__ = ["MCPConnections", "MCPToolSource", "classify", "connect_from_ref", "server_key"]

_STDERR_TAIL = 1500
_ERROR_TEXT = 1000
_MAX_PAGES = 100
_SERVER_KEYS = ("transport", "command", "args", "cwd", "env", "url")


def classify(annotations: mcp_types.ToolAnnotations | None) -> tuple[SideEffect, Risk]:
    """Side effect and risk from MCP tool annotations (see the module docstring's table)."""
    if annotations is None:
        return "write", "high"
    if annotations.read_only_hint:
        return "read", "low"
    if annotations.destructive_hint:
        return "irreversible", "high"
    if annotations.destructive_hint is None or annotations.open_world_hint is not False:
        return "write", "high"
    return "write", "low" if annotations.idempotent_hint else "medium"


def server_key(ref: Mapping[str, Any]) -> str:
    """Identity of the server a ``source_ref`` points at: tools with the same key share a session."""
    return json.dumps({k: ref.get(k) for k in _SERVER_KEYS if ref.get(k) is not None}, sort_keys=True)


class MCPToolSource:
    """One session to one MCP server; use ``async with`` or :meth:`connect` / :meth:`aclose`."""

    def __init__(
        self,
        *,
        command: str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        if (command is None) == (url is None):
            raise ToolSourceError(
                "an MCP source needs exactly one of command (stdio) or url (streamable HTTP)"
            )
        self.command = command
        self.args = list(args)
        self.env = dict(env) if env else None
        self.cwd = cwd
        self.url = url
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._errlog: IO[str] | None = None
        self._broken = False

    @classmethod
    def stdio(
        cls,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        connect_timeout: float = 30.0,
    ) -> MCPToolSource:
        return cls(command=command, args=args, env=env, cwd=cwd, connect_timeout=connect_timeout)

    @classmethod
    def http(
        cls, url: str, *, headers: Mapping[str, str] | None = None, connect_timeout: float = 30.0
    ) -> MCPToolSource:
        return cls(url=url, headers=headers, connect_timeout=connect_timeout)

    @property
    def ref(self) -> dict[str, Any]:
        """The server part of every tool's ``source_ref``."""
        if self.url is not None:
            return {"transport": "http", "url": self.url}
        ref: dict[str, Any] = {"transport": "stdio", "command": self.command, "args": list(self.args)}
        if self.cwd:
            ref["cwd"] = self.cwd
        if self.env:
            ref["env"] = dict(self.env)
        return ref

    @property
    def target(self) -> str:
        return self.url if self.url is not None else shlex.join([str(self.command), *self.args])

    @property
    def alive(self) -> bool:
        """Connected, and no call has seen the connection close since."""
        return (
            self._client is not None and not self._broken and self._task is not None and not self._task.done()
        )

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def connect(self) -> Self:
        """Start (or reach) the server and complete the MCP handshake."""
        if self._task is not None:
            raise ToolSourceError(
                f"MCP source {self.target} is already connected; open a new one to reconnect"
            )
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._task = asyncio.create_task(self._own_session(ready), name=f"mcp:{self.target}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), self.connect_timeout)
        except TimeoutError:
            await self._stop(cancel=True)
            error = ToolSourceError(
                f"MCP server {self.target} did not complete the handshake within {self.connect_timeout}s"
                + self._stderr_tail(),
                hint="check that the command starts an MCP server speaking the protocol on stdout",
            )
            self._close_errlog()
            raise error from None
        except asyncio.CancelledError:
            await self._stop(cancel=True)
            self._close_errlog()
            raise
        except BaseException as exc:
            await self._stop()
            error = self._connect_error(exc)
            self._close_errlog()
            raise error from None
        return self

    async def aclose(self) -> None:
        """End the session; for stdio, the server process is stopped (bounded wait, then killed)."""
        await self._stop()
        self._close_errlog()

    async def _stop(self, *, cancel: bool = False) -> None:
        """Let the owner task unwind the session; our caller's own cancellation still propagates."""
        self._closing.set()
        task = self._task
        if task is None:
            return
        if cancel:
            task.cancel()
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:  # the owner task keeps its errors; connect() already reported them
            return

    def _close_errlog(self) -> None:
        if self._errlog is not None:
            self._errlog.close()
            self._errlog = None

    async def _own_session(self, ready: asyncio.Future[None]) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.url is not None:
                    http = await stack.enter_async_context(
                        httpx2.AsyncClient(headers=self.headers, timeout=httpx2.Timeout(30.0, read=300.0))
                    )
                    transport: Any = streamable_http_client(self.url, http_client=http)
                else:
                    self._errlog = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
                    params = StdioServerParameters(
                        command=str(self.command), args=self.args, env=self.env, cwd=self.cwd
                    )
                    transport = stdio_client(params, errlog=self._errlog)
                client = await stack.enter_async_context(Client(transport, cache=None))
                self._client = client
                if not ready.done():
                    ready.set_result(None)
                await self._closing.wait()
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, asyncio.CancelledError):
                    ready.cancel()
                else:
                    ready.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._client = None

    def _stderr_tail(self) -> str:
        if self._errlog is None or self._errlog.closed:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._errlog.flush()
            self._errlog.seek(0)
            text = self._errlog.read()[-_STDERR_TAIL:].strip()
            if text:
                return f"; its stderr ends with: {text}"
        return ""

    def _connect_error(self, exc: BaseException) -> ToolSourceError:
        leaves = _leaves(exc)
        first = leaves[0] if leaves else exc
        tail = self._stderr_tail()
        if isinstance(first, OSError) and self.url is None:
            return ToolSourceError(
                f"cannot start MCP server {self.target}: {first.strerror or first}",
                hint="check that the command is installed and on PATH (or give its full path)",
            )
        if isinstance(first, httpx2.HTTPError):
            return ToolSourceError(
                f"cannot connect to MCP server at {self.target}: {type(first).__name__}: {first}",
                hint="check the URL and that the server is running",
            )
        if isinstance(first, MCPError) and first.code == mcp_types.CONNECTION_CLOSED:
            return ToolSourceError(
                f"MCP server {self.target} closed the connection during the handshake{tail}",
                hint="run the command by hand to see why it exits",
            )
        if isinstance(first, MCPError):
            return ToolSourceError(f"MCP server {self.target} refused the session: {first.message}{tail}")
        return ToolSourceError(
            f"cannot open MCP session with {self.target}: {type(first).__name__}: {first}{tail}"
        )

    def _require_client(self) -> Client:
        if self._client is None:
            raise ToolError(
                f"MCP source {self.target} is not connected",
                hint="open it with 'async with' (or connect()) before calling its tools",
                retryable=True,
            )
        return self._client

    async def list_tools(self) -> list[mcp_types.Tool]:
        """Every tool the server offers (all pages)."""
        client = self._require_client()
        found: list[mcp_types.Tool] = []
        cursor: str | None = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            found.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                break
        return found

    async def tools(
        self,
        *,
        owner: str = "unowned",
        prefix: str | None = None,
        version: str | None = None,
        include: Sequence[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[tuple[ToolDefinition, Executor]]:
        """Discover the server's tools.

        ``version`` defaults to the server's version; ``include`` keeps only the named MCP
        tools; ``overrides`` maps an MCP tool name to ToolDefinition fields to replace
        (e.g. ``{"git_reset": {"risk": "critical"}}``).
        """
        client = self._require_client()
        server_version = client.server_info.version if client.server_info is not None else None
        tool_version = (version or server_version or "1")[:40]
        built: list[tuple[ToolDefinition, Executor]] = []
        for listed in await self.list_tools():
            if include is not None and listed.name not in include:
                continue
            side_effect, risk = classify(listed.annotations)
            title = listed.title or (listed.annotations.title if listed.annotations else None)
            name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", listed.name).strip("_.-") or "tool"
            fields: dict[str, Any] = {
                "name": f"{prefix.rstrip('.')}.{name}" if prefix else name,
                "version": tool_version,
                "owner": owner,
                "description": listed.description or title or "",
                "input_schema": listed.input_schema,
                "output_schema": listed.output_schema,
                "side_effect": side_effect,
                "risk": risk,
                "source": "mcp",
                "source_ref": {**self.ref, "tool": listed.name},
            }
            fields.update((overrides or {}).get(listed.name, {}))
            try:
                definition = ToolDefinition(**fields)
            except pydantic.ValidationError as exc:
                raise ToolSourceError(
                    f"cannot define MCP tool {listed.name!r} from {self.target}: "
                    + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
                    hint="check the overrides given for it",
                ) from None
            built.append((definition, self.executor(listed.name, display=definition.name)))
        return built

    def executor(self, mcp_name: str, *, display: str | None = None) -> Executor:
        """An executor calling ``mcp_name`` on this session (which must be open at call time)."""
        label = display or mcp_name

        async def execute(args: dict[str, Any], ctx: ExecContext) -> Any:
            return await self.call(mcp_name, args, timeout=ctx.timeout, label=label)

        return execute

    async def call(
        self, mcp_name: str, args: Mapping[str, Any], *, timeout: float | None = None, label: str = ""
    ) -> Any:
        label = label or mcp_name
        client = self._require_client()
        try:
            result = await client.call_tool(mcp_name, dict(args or {}), read_timeout_seconds=timeout)
        except MCPError as exc:
            if exc.code == mcp_types.CONNECTION_CLOSED:
                self._broken = True
                raise ToolError(
                    f"MCP tool {label}: the connection to {self.target} is closed",
                    hint="the server exited or dropped the session; reconnect the source",
                    retryable=True,
                ) from None
            if exc.code == mcp_types.REQUEST_TIMEOUT:
                raise ToolError(
                    f"MCP tool {label} did not answer within {timeout}s", retryable=True
                ) from None
            raise ToolError(f"MCP tool {label} was rejected by the server: {exc.message}") from None
        except pydantic.ValidationError as exc:
            raise ToolError(
                f"MCP tool {label} returned a result that does not match its schema: {exc}"
            ) from None
        return _result(label, result)


def _result(label: str, result: mcp_types.CallToolResult) -> Any:
    texts = [block.text for block in result.content if isinstance(block, mcp_types.TextContent)]
    if result.is_error:
        detail = (
            " ".join("\n".join(texts).split())[:_ERROR_TEXT] or "the tool reported an error without details"
        )
        raise ToolError(f"MCP tool {label} failed: {detail}")
    if result.structured_content is not None:
        return result.structured_content
    if not result.content:
        return None
    if len(texts) == len(result.content):
        joined = "\n".join(texts)
        try:
            return json.loads(joined)
        except ValueError:
            return joined
    return [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def connect_from_ref(
    ref: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    connect_timeout: float = 30.0,
) -> MCPToolSource:
    """Open a session to the server a stored ``source_ref`` names (the caller closes it).

    ``headers`` (HTTP) are not stored in definitions, so pass them here; ``env`` is merged
    over the stored environment, for secrets the server needs.
    """
    transport = ref.get("transport")
    if transport == "http" and isinstance(ref.get("url"), str):
        source = MCPToolSource.http(str(ref["url"]), headers=headers, connect_timeout=connect_timeout)
    elif transport == "stdio" and isinstance(ref.get("command"), str):
        merged = {**(ref.get("env") or {}), **(env or {})}
        source = MCPToolSource.stdio(
            str(ref["command"]),
            [str(a) for a in ref.get("args") or []],
            env=merged or None,
            cwd=ref.get("cwd"),
            connect_timeout=connect_timeout,
        )
    else:
        raise ToolSourceError(
            f"not an MCP source_ref: {dict(ref)!r}",
            hint="expected transport 'stdio' with command and args, or transport 'http' with url",
        )
    return await source.connect()


class MCPConnections:
    """One shared session per MCP server for executors rebuilt from stored definitions.

    Sessions open lazily on the first call of any of the server's tools, are reused by
    all of them, reopen after the server drops the connection, and close on :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, Mapping[str, str]] | None = None,
        env: Mapping[str, Mapping[str, str]] | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        """``headers`` / ``env``: per server URL / command, extra values not kept in definitions."""
        self._headers = dict(headers or {})
        self._env = dict(env or {})
        self._connect_timeout = connect_timeout
        self._sources: dict[str, MCPToolSource] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def source(self, ref: Mapping[str, Any]) -> MCPToolSource:
        key = server_key(ref)
        async with self._locks.setdefault(key, asyncio.Lock()):
            current = self._sources.get(key)
            if current is not None and current.alive:
                return current
            if current is not None:
                await current.aclose()
            fresh = await connect_from_ref(
                ref,
                headers=self._headers.get(str(ref.get("url"))),
                env=self._env.get(str(ref.get("command"))),
                connect_timeout=self._connect_timeout,
            )
            self._sources[key] = fresh
            return fresh

    def executor(self, definition: ToolDefinition) -> Executor:
        ref = dict(definition.source_ref)
        if definition.source != "mcp" or not isinstance(ref.get("tool"), str):
            raise ToolSourceError(f"tool {definition.name} is not an MCP tool (source {definition.source!r})")
        mcp_name = str(ref["tool"])

        async def execute(args: dict[str, Any], ctx: ExecContext) -> Any:
            try:
                source = await self.source(ref)
            except ToolSourceError as exc:
                raise ToolError(
                    f"MCP tool {definition.name}: {exc.message}", hint=exc.hint, retryable=True
                ) from None
            return await source.call(mcp_name, args, timeout=ctx.timeout, label=definition.name)

        return execute

    async def aclose(self) -> None:
        sources, self._sources = list(self._sources.values()), {}
        for source in sources:
            await source.aclose()
