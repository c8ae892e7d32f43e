"""Agents as tools of agents, manager-worker delegation, handoff schemas, remote agents."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from tests.agents.helpers import CATEGORY, support_spec

from controltower.engine import EmbeddedEngine
from controltower.gateway.approvals import Approver
from controltower.gateway.pipeline import ToolGateway
from controltower.models import ModelCallLog, override_models
from controltower.models.testing import AgentInfo, FunctionModel, ScriptedModel, call, output

RESEARCHER = {
    "kind": "llm",
    "role": "a researcher who looks tickets up",
    "tools": ["lookup"],
    "input_schema": {"type": "object", "properties": {"ticket": {"type": "string"}}, "required": ["ticket"]},
    "output_schema": {"type": "object", "required": ["tier"]},
    "autonomy": "expanded",
}


async def test_an_agent_calls_another_agent_as_a_tool(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed_sqlite
    tag = uuid.uuid4().hex
    model = ScriptedModel(
        [
            call("agent:researcher", ticket="T-3"),  # the lead asks the researcher
            call("lookup", ticket="T-3", tag=tag),  # the researcher's own tool call
            output({"tier": "gold"}),  # the researcher's answer
            output({"category": "billing"}),  # the lead's answer
        ]
    )
    lead = {"kind": "llm", "tools": ["agent:researcher"], "output_schema": CATEGORY}
    with override_models(default=model):
        run_id = await engine.start(support_spec({"triage": lead, "researcher": RESEARCHER}), {"text": "?"})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"category": "billing"}
    last = json.dumps([str(m) for m in model.requests[-1]])
    assert "gold" in last
    # the researcher's tool call is governed as the researcher's
    audit = await gateway.audit.query("default", kind="tool_call", limit=20)
    assert any(r.actor == "agent:researcher" and r.outcome == "executed" for r in audit)
    calls = await ModelCallLog(engine.store).list(run_id)
    assert sorted((c.step_key, c.call_index, c.agent) for c in calls) == [
        ("triage", 0, "triage"),
        ("triage", 1, "triage"),
        ("triage>researcher#1", 0, "researcher"),
        ("triage>researcher#1", 1, "researcher"),
    ]


async def test_an_agent_tool_with_a_bad_payload_answers_the_model_with_the_error(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, _ = governed_sqlite
    model = ScriptedModel([call("agent:researcher", ticket=7), output({"category": "other"})])
    lead = {"kind": "llm", "tools": ["agent:researcher"], "output_schema": CATEGORY}
    with override_models(default=model):
        run_id = await engine.start(support_spec({"triage": lead, "researcher": RESEARCHER}), {"text": "?"})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    answer = json.dumps([str(m) for m in model.requests[-1]])
    assert "input of agent 'researcher' does not match its schema" in answer


def _by_role(messages: list[Any], info: AgentInfo) -> Any:
    """One model for the manager and its workers: answers by who is asking."""
    instructions = info.instructions or ""
    payload = json.loads(str(messages[0].parts[0].content).removeprefix("Input:\n"))
    if "planner" in instructions:
        return output({"tasks": [{"worker": "writer", "input": {"topic": t}} for t in payload["topics"]]})
    return output({"draft": f"about {payload['topic']}"})


async def test_an_llm_manager_delegates_to_llm_workers(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, _ = governed_sqlite
    tasks_schema = {
        "type": "object",
        "properties": {
            "tasks": {"type": "array", "items": {"type": "object", "required": ["worker", "input"]}}
        },
        "required": ["tasks"],
    }
    agents = {
        "planner": {"kind": "llm", "role": "a planner", "output_schema": tasks_schema},
        "writer": {
            "kind": "llm",
            "role": "a writer",
            "input_schema": {"type": "object", "required": ["topic"]},
            "output_schema": {"type": "object", "required": ["draft"]},
        },
    }
    steps = [
        {
            "id": "plan",
            "kind": "delegate",
            "manager": "planner",
            "workers": ["writer"],
            "input": {"topics": "${{ input.topics }}"},
        }
    ]
    model = FunctionModel(_by_role)
    with override_models(default=model):
        run_id = await engine.start(support_spec(agents, steps), {"topics": ["refunds", "outages"]})
        run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output["results"] == [{"draft": "about refunds"}, {"draft": "about outages"}]
    assert model.calls == 3


async def test_a_handoff_payload_is_checked_against_the_agent_input_schema(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, _ = governed_sqlite
    agents = {
        "router": {"kind": "rule", "rules": [{"when": "True", "output": {"queue": "${{ input.text }}"}}]},
        "worker": {
            "kind": "python",
            "impl": "tests.agents.agent_tools:classify_offline",
            "input_schema": {"type": "object", "required": ["text"]},
        },
    }
    steps = [
        {"id": "route", "kind": "agent", "agent": "router", "input": "${{ input }}"},
        {"id": "work", "kind": "agent", "agent": "worker", "input": "${{ steps.route.output }}"},
    ]
    run_id = await engine.start(support_spec(agents, steps), {"text": "hi"})
    run = await engine.wait(run_id, timeout=20)
    assert run.status == "failed"
    assert "input of agent 'worker' does not match its schema" in run.error["message"]


# -- remote agents over HTTP on loopback ----------------------------------------------------


class RemoteAgent:
    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.mode = "ok"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if outer.mode == "slow":
                    time.sleep(1.0)
                status, raw = 200, json.dumps({"category": "billing", "echo": body["input"]}).encode()
                if outer.mode == "error":
                    status, raw = 503, b'{"error": "busy"}'
                elif outer.mode == "html":
                    raw = b"<html>hello</html>"
                elif outer.mode == "wrong":
                    raw = b'{"category": 42}'
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/agent"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def remote() -> Iterator[RemoteAgent]:
    server = RemoteAgent()
    yield server
    server.close()


async def test_a_remote_agent_gets_the_payload_and_its_answer_is_checked(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway], remote: RemoteAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = governed_sqlite
    monkeypatch.setenv("REMOTE_TOKEN", "tok-123")
    agent = {"kind": "remote", "endpoint": remote.url, "auth_env": "REMOTE_TOKEN", "output_schema": CATEGORY}
    spec = support_spec({"triage": agent})
    run_id = await engine.start(spec, {"text": "charged"})
    run = await engine.wait(run_id, timeout=20)
    assert run.status == "completed", run.error
    assert run.output == {"category": "billing", "echo": {"text": "charged"}}
    headers, body = remote.seen[0]
    assert headers["authorization"] == "Bearer tok-123"
    assert headers["idempotency-key"] == f"{run_id}:triage"
    assert (body["agent"], body["run_id"], body["input"]) == ("triage", run_id, {"text": "charged"})

    expected = {
        "error": "HTTP 503",
        "html": "not JSON",
        "wrong": "does not match its schema",
        "slow": "did not answer within 0.2s",
    }
    for mode, message in expected.items():
        remote.mode = mode
        agent = {**agent, "timeout": "200ms"}
        run_id = await engine.start(support_spec({"triage": agent}), {"text": mode})
        run = await engine.wait(run_id, timeout=20)
        assert run.status == "failed", mode
        assert message in run.error["message"], (mode, run.error)


async def test_a_remote_agent_without_its_token_says_which_variable(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway], remote: RemoteAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = governed_sqlite
    monkeypatch.delenv("REMOTE_TOKEN", raising=False)
    agent = {"kind": "remote", "endpoint": remote.url, "auth_env": "REMOTE_TOKEN"}
    run_id = await engine.start(support_spec({"triage": agent}), {"text": "x"})
    run = await engine.wait(run_id, timeout=20)
    assert run.status == "failed"
    assert run.error["code"] == "remote_agent_error"
    assert "REMOTE_TOKEN" in run.error["message"]
    assert remote.seen == []


async def test_a_sub_agent_tool_call_that_needs_approval_parks_and_resumes(
    governed_sqlite: tuple[EmbeddedEngine, ToolGateway],
) -> None:
    engine, gateway = governed_sqlite
    tag = uuid.uuid4().hex
    model = ScriptedModel(
        [
            call("agent:refunder", ticket="T-4"),
            call("refund", amount_cents=900, tag=tag),
            output({"tier": "refunded"}),
            output({"category": "billing"}),
        ]
    )
    refunder = {**RESEARCHER, "tools": ["refund"]}
    lead = {"kind": "llm", "tools": ["agent:refunder"], "output_schema": CATEGORY}
    spec = support_spec({"triage": lead, "refunder": refunder}, governance={"autonomy": "expanded"})
    with override_models(default=model):
        run_id = await engine.start(spec, {"text": "refund"})
        parked = await engine.wait(run_id, statuses=("waiting",), timeout=20)
        assert parked.status == "waiting"
        (request,) = await gateway.approvals.list()
        assert request.agent == "refunder"
        await gateway.decide(request.id, approver=Approver("fiona", groups=("finance",)), approve=True)
        await engine.wake(run_id)
        done = await engine.wait(run_id, timeout=20)
    assert done.status == "completed", done.error
    assert done.output == {"category": "billing"}
    assert model.calls == 4  # two calls before the park, two after; none repeated
