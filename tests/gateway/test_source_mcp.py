"""MCP servers as tool sources: real servers from PyPI over stdio, and one over streamable HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mcp_types
import pytest

from controltower.gateway.sources.mcp import (
    MCPConnections,
    MCPToolSource,
    classify,
    connect_from_ref,
    server_key,
)
from controltower.gateway.tools import ExecContext, ToolDefinition, ToolError, ToolSourceError

FIXTURES = Path(__file__).parent / "fixtures"
TIME_ARGS = ["-m", "mcp_server_time", "--local-timezone", "UTC"]


def ctx(definition: ToolDefinition, *, timeout: float | None = 30) -> ExecContext:
    return ExecContext(tool=definition, env="dev", idempotency_key="idem-1", timeout=timeout)


def children_running(marker: str) -> list[int]:
    """PIDs of our own child processes whose command line contains ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and marker in cmdline:
            found.append(int(entry.name))
    return found


# -- annotations -> side effects (no server needed) ------------------------------------------


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        (None, ("write", "high")),
        ({"read_only_hint": True}, ("read", "low")),
        ({"read_only_hint": True, "destructive_hint": True}, ("read", "low")),
        ({"destructive_hint": True}, ("irreversible", "high")),
        ({"destructive_hint": False, "idempotent_hint": True, "open_world_hint": False}, ("write", "low")),
        (
            {"destructive_hint": False, "idempotent_hint": False, "open_world_hint": False},
            ("write", "medium"),
        ),
        ({"destructive_hint": False, "open_world_hint": True}, ("write", "high")),
        ({"destructive_hint": False}, ("write", "high")),  # open world unknown
        ({"title": "Just a title"}, ("write", "high")),
    ],
)
def test_annotations_map_to_side_effect_and_risk(
    hints: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    annotations = None if hints is None else mcp_types.ToolAnnotations(**hints)
    assert classify(annotations) == expected


def test_source_ref_and_argument_checks() -> None:
    stdio = MCPToolSource.stdio("srv", ["--x"], env={"MODE": "test"}, cwd="/srv")
    assert stdio.ref == {
        "transport": "stdio",
        "command": "srv",
        "args": ["--x"],
        "cwd": "/srv",
        "env": {"MODE": "test"},
    }
    http = MCPToolSource.http("http://127.0.0.1:1/mcp", headers={"Authorization": "Bearer secret"})
    assert http.ref == {"transport": "http", "url": "http://127.0.0.1:1/mcp"}  # headers are never stored
    assert server_key({**stdio.ref, "tool": "a"}) == server_key({**stdio.ref, "tool": "b"})
    assert server_key(stdio.ref) != server_key(http.ref)
    with pytest.raises(ToolSourceError, match="exactly one of command"):
        MCPToolSource()
    with pytest.raises(ToolSourceError, match="exactly one of command"):
        MCPToolSource(command="x", url="http://y")


async def test_bad_refs_and_unconnected_sources_are_clear_errors() -> None:
    with pytest.raises(ToolSourceError, match="not an MCP source_ref"):
        await connect_from_ref({"transport": "carrier-pigeon"})
    source = MCPToolSource.stdio(sys.executable, TIME_ARGS)
    definition = ToolDefinition(name="t", source="mcp", source_ref={**source.ref, "tool": "get_current_time"})
    with pytest.raises(ToolError, match="is not connected") as info:
        await source.executor("get_current_time")({"timezone": "UTC"}, ctx(definition))
    assert info.value.retryable is True
    with pytest.raises(ToolSourceError, match="is not an MCP tool"):
        MCPConnections().executor(ToolDefinition(name="py", source="python"))


# -- real stdio servers ------------------------------------------------------------------------


@pytest.mark.slow
async def test_time_server_discovery_calls_and_clean_shutdown() -> None:
    async with MCPToolSource.stdio(sys.executable, TIME_ARGS) as source:
        assert children_running("mcp_server_time")
        listed = {tool.name: tool for tool in await source.list_tools()}
        pairs = await source.tools(owner="ops", prefix="time")
        tools = {definition.name: (definition, execute) for definition, execute in pairs}
        assert set(tools) == {"time.get_current_time", "time.convert_time"}
        definition, execute = tools["time.get_current_time"]
        assert definition.input_schema == listed["get_current_time"].input_schema  # kept as the server said
        assert definition.input_schema["required"] == ["timezone"]
        assert definition.output_schema is not None
        assert "datetime" in definition.output_schema["properties"]
        assert (definition.side_effect, definition.risk, definition.owner) == ("read", "low", "ops")
        assert definition.source == "mcp"
        assert definition.source_ref == {**source.ref, "tool": "get_current_time"}
        assert definition.description == "Get current time in a specific timezone"

        # Called from another task than the one that opened the session.
        now = await asyncio.create_task(execute({"timezone": "UTC"}, ctx(definition)))
        assert now["timezone"] == "UTC"
        stamp = datetime.fromisoformat(now["datetime"])
        assert abs((stamp - datetime.now(UTC)).total_seconds()) < 120

        converted = await tools["time.convert_time"][1](
            {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
            ctx(tools["time.convert_time"][0]),
        )
        assert converted["target"]["datetime"].endswith("21:00:00+09:00")

        with pytest.raises(ToolError, match="Invalid timezone") as info:
            await execute({"timezone": "Mars/Olympus_Mons"}, ctx(definition))
        assert info.value.retryable is False
        with pytest.raises(ToolError, match="rejected by the server: Unknown tool"):
            await source.executor("no_such_tool")({}, ctx(definition))
        # Concurrent calls share the one session.
        results = await asyncio.gather(*(execute({"timezone": "UTC"}, ctx(definition)) for _ in range(5)))
        assert {r["timezone"] for r in results} == {"UTC"}
    assert not source.alive
    assert not children_running("mcp_server_time")
    with pytest.raises(ToolError, match="is not connected"):
        await execute({"timezone": "UTC"}, ctx(definition))


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    for command in (["init", "-q", "-b", "main"], ["add", "readme.md"], ["commit", "-q", "-m", "first"]):
        if command[0] == "add":
            (repo / "readme.md").write_text("hello\n")
        subprocess.run(["git", *command], cwd=repo, env=env, check=True, capture_output=True)
    (repo / "new_file.txt").write_text("draft\n")
    return repo


@pytest.mark.slow
async def test_git_server_hints_overrides_and_calls(git_repo: Path) -> None:
    args = ["-m", "mcp_server_git", "--repository", str(git_repo)]
    async with MCPToolSource.stdio(sys.executable, args) as source:
        pairs = await source.tools(
            owner="eng",
            include=["git_status", "git_add", "git_commit", "git_reset", "git_log"],
            overrides={"git_reset": {"risk": "critical", "tags": ("dangerous",)}},
            version="7",
        )
        tools = {definition.name: (definition, execute) for definition, execute in pairs}
        effects = {name: (d.side_effect, d.risk) for name, (d, _) in tools.items()}
        assert effects == {
            "git_status": ("read", "low"),
            "git_log": ("read", "low"),
            "git_add": ("write", "low"),  # idempotent, closed world
            "git_commit": ("write", "medium"),
            "git_reset": ("irreversible", "critical"),  # destructiveHint + override
        }
        assert tools["git_reset"][0].tags == ("dangerous",)
        assert {d.version for d, _ in tools.values()} == {"7"}

        status_def, status = tools["git_status"]
        before = await status({"repo_path": str(git_repo)}, ctx(status_def))
        assert isinstance(before, str)
        assert "new_file.txt" in before
        assert "Untracked" in before
        add_def, add = tools["git_add"]
        await add({"repo_path": str(git_repo), "files": ["new_file.txt"]}, ctx(add_def))
        after = await status({"repo_path": str(git_repo)}, ctx(status_def))
        assert "Changes to be committed" in after
        log_def, log = tools["git_log"]
        assert "first" in str(await log({"repo_path": str(git_repo)}, ctx(log_def)))
        with pytest.raises(ToolError, match="outside the allowed repository"):
            await status({"repo_path": str(git_repo.parent)}, ctx(status_def))
        with pytest.raises(ToolSourceError, match="cannot define MCP tool 'git_reset'"):
            await source.tools(include=["git_reset"], overrides={"git_reset": {"risk": "apocalyptic"}})


async def test_missing_command_is_a_source_error() -> None:
    source = MCPToolSource.stdio("/definitely/not/an/mcp-server", ["--serve"])
    with pytest.raises(
        ToolSourceError, match="cannot start MCP server /definitely/not/an/mcp-server"
    ) as info:
        await source.connect()
    assert info.value.hint is not None
    assert "PATH" in info.value.hint
    assert not source.alive


@pytest.mark.slow
async def test_server_that_exits_reports_its_stderr() -> None:
    script = "import sys; print('config file missing: /etc/helpdesk.toml', file=sys.stderr); sys.exit(2)"
    with pytest.raises(ToolSourceError, match="closed the connection during the handshake") as info:
        await MCPToolSource.stdio(sys.executable, ["-c", script]).connect()
    assert "config file missing: /etc/helpdesk.toml" in info.value.message


@pytest.mark.slow
async def test_server_that_never_answers_times_out() -> None:
    script = "import time; time.sleep(60)"
    started = time.monotonic()
    with pytest.raises(ToolSourceError, match=r"did not complete the handshake within 0.5s"):
        await MCPToolSource.stdio(sys.executable, ["-c", script], connect_timeout=0.5).connect()
    assert time.monotonic() - started < 10
    assert not children_running("time.sleep(60)")


@pytest.mark.slow
async def test_connections_rebuild_executors_from_stored_definitions() -> None:
    async with MCPToolSource.stdio(sys.executable, TIME_ARGS) as discovery:
        stored = [ToolDefinition.model_validate_json(d.model_dump_json()) for d, _ in await discovery.tools()]
    # A later process: only the stored definitions are left.
    async with MCPConnections() as pool:
        by_name = {definition.name: definition for definition in stored}
        now_def = by_name["get_current_time"]
        result = await pool.executor(now_def)({"timezone": "Europe/Paris"}, ctx(now_def))
        assert result["timezone"] == "Europe/Paris"
        first = await pool.source(now_def.source_ref)
        convert_def = by_name["convert_time"]
        converted = await pool.executor(convert_def)(
            {"source_timezone": "UTC", "time": "08:30", "target_timezone": "UTC"}, ctx(convert_def)
        )
        assert converted["time_difference"] == "+0.0h"
        assert await pool.source(convert_def.source_ref) is first  # one session per server
        assert len(children_running("mcp_server_time")) == 1
    assert not first.alive
    assert not children_running("mcp_server_time")


@pytest.mark.slow
async def test_connections_reopen_a_session_after_the_server_dies() -> None:
    async with MCPToolSource.stdio(sys.executable, TIME_ARGS) as discovery:
        definition = next(d for d, _ in await discovery.tools() if d.name == "get_current_time")
    async with MCPConnections() as pool:
        execute = pool.executor(definition)
        assert (await execute({"timezone": "UTC"}, ctx(definition)))["timezone"] == "UTC"
        (pid,) = children_running("mcp_server_time")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ToolError, match="is closed") as info:
            await execute({"timezone": "UTC"}, ctx(definition))
        assert info.value.retryable is True
        # The pipeline retries; the pool opens a new session for the retry.
        assert (await execute({"timezone": "UTC"}, ctx(definition)))["timezone"] == "UTC"
        (new_pid,) = children_running("mcp_server_time")
        assert new_pid != pid
    assert not children_running("mcp_server_time")


# -- streamable HTTP ------------------------------------------------------------------------


@dataclass
class HttpServer:
    url: str
    token: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mcp_http_server() -> Iterator[HttpServer]:
    port, token = _free_port(), "tok-" + os.urandom(6).hex()
    process = subprocess.Popen(
        [sys.executable, str(FIXTURES / "mcp_http_server.py"), str(port), token],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "the MCP HTTP fixture server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the MCP HTTP fixture server did not start"
                time.sleep(0.05)
        yield HttpServer(url=f"http://127.0.0.1:{port}/mcp", token=token)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
async def test_streamable_http_server_with_auth_header(mcp_http_server: HttpServer) -> None:
    headers = {"Authorization": f"Bearer {mcp_http_server.token}"}
    async with MCPToolSource.http(mcp_http_server.url, headers=headers) as source:
        pairs = await source.tools(owner="ops", prefix="remote")
        tools = {definition.name: (definition, execute) for definition, execute in pairs}
        effects = {name: (d.side_effect, d.risk) for name, (d, _) in tools.items()}
        assert effects == {
            "remote.add": ("read", "low"),
            "remote.take_note": ("write", "high"),  # unannotated
            "remote.purge": ("irreversible", "high"),
        }
        add_def, add = tools["remote.add"]
        assert add_def.source_ref == {"transport": "http", "url": mcp_http_server.url, "tool": "add"}
        assert add_def.description == "Add two numbers."
        assert await add({"a": 2, "b": 40}, ctx(add_def)) == {"result": 42}
        note_def, note = tools["remote.take_note"]
        assert await note({"text": "call back"}, ctx(note_def)) == {"stored": "call back", "count": 1}
        purge_def, purge = tools["remote.purge"]
        with pytest.raises(ToolError, match="refusing to purge: cleanup"):
            await purge({"reason": "cleanup"}, ctx(purge_def))

    # Rebuilt from the stored definition, with the header supplied by the caller.
    async with MCPConnections(headers={mcp_http_server.url: headers}) as pool:
        assert await pool.executor(add_def)({"a": 1, "b": 1}, ctx(add_def)) == {"result": 2}

    with pytest.raises(ToolSourceError, match=f"MCP server {mcp_http_server.url}"):
        await MCPToolSource.http(mcp_http_server.url, connect_timeout=10).connect()  # no token


async def test_unreachable_http_server_is_a_source_error() -> None:
    url = f"http://127.0.0.1:{_free_port()}/mcp"
    with pytest.raises(ToolSourceError, match="cannot connect to MCP server at") as info:
        await MCPToolSource.http(url, connect_timeout=10).connect()
    assert "ConnectError" in info.value.message
