"""OpenAPI operations as tools, called for real against a loopback helpdesk API."""

from __future__ import annotations

import copy
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from controltower.gateway.sources.openapi import import_openapi, load_openapi_document, openapi_executor
from controltower.gateway.tools import (
    Binding,
    ExecContext,
    Executor,
    ToolDefinition,
    ToolError,
    ToolSourceError,
)

from .fixtures.helpdesk_app import API_KEY, TOKEN, Helpdesk, serve_helpdesk

DOC_PATH = Path(__file__).parent / "fixtures" / "helpdesk_openapi.yaml"
CREDS = {"bearerAuth": TOKEN, "apiKeyQuery": API_KEY}
Tools = dict[str, tuple[ToolDefinition, Executor]]


@pytest.fixture
def helpdesk() -> Iterator[Helpdesk]:
    with serve_helpdesk() as served:
        yield served


@pytest.fixture
def tools(helpdesk: Helpdesk) -> Tools:
    pairs = import_openapi(DOC_PATH, base_url=helpdesk.url, owner="support", prefix="helpdesk")
    return {definition.name: (definition, execute) for definition, execute in pairs}


def ctx(
    definition: ToolDefinition,
    *,
    credentials: dict[str, str] | None = None,
    env: str = "prod",
    key: str = "idem-42",
    timeout: float | None = 10,
) -> ExecContext:
    return ExecContext(
        tool=definition,
        env=env,
        idempotency_key=key,
        credentials=CREDS if credentials is None else credentials,
        timeout=timeout,
    )


async def call(
    tools: dict[str, tuple[ToolDefinition, Executor]], name: str, args: dict[str, Any], **kw: Any
) -> Any:
    definition, execute = tools[f"helpdesk.{name}"]
    return await execute(args, ctx(definition, **kw))


# -- import -------------------------------------------------------------------------------------


def test_operations_become_named_tools_with_side_effects(tools: Tools) -> None:
    summary = {name: (d.side_effect, d.risk) for name, (d, _) in tools.items()}
    assert summary == {
        "helpdesk.listTickets": ("read", "low"),
        "helpdesk.getTicket": ("read", "low"),
        "helpdesk.deleteTicket": ("irreversible", "critical"),  # x-risk
        "helpdesk.replyToTicket": ("write", "medium"),
        "helpdesk.addInternalNote": ("read", "low"),  # x-side-effect overrides POST
        "helpdesk.queueStats": ("read", "low"),
        "helpdesk.get_health": ("read", "low"),  # no operationId: method + path
    }
    definition = tools["helpdesk.listTickets"][0]
    assert definition.version == "2.1.0"
    assert definition.owner == "support"
    assert definition.source == "openapi"
    assert definition.tags == ("tickets",)
    assert definition.description == "List tickets\n\nNewest first."
    assert (
        definition.environments["default"].endpoint == tools["helpdesk.getTicket"][0].binding("dev").endpoint
    )


def test_input_schema_has_parameters_body_and_resolved_refs(tools: Tools) -> None:
    listing = tools["helpdesk.listTickets"][0].input_schema
    assert set(listing["properties"]) == {"status", "label", "limit", "X-Request-Source"}
    assert listing["properties"]["status"]["$ref"] == "#/$defs/Status"
    assert listing["properties"]["status"]["description"] == "Only tickets in this state."
    assert listing["$defs"]["Status"]["enum"] == ["open", "pending", "closed"]
    assert listing["additionalProperties"] is False
    assert "required" not in listing
    reply = tools["helpdesk.replyToTicket"][0].input_schema
    assert reply["required"] == ["id", "body"]
    assert reply["properties"]["id"] == {"type": "integer", "description": "Ticket number."}
    # OpenAPI 3.0's boolean exclusiveMinimum becomes the 2020-12 number form.
    assert reply["$defs"]["Reply"]["properties"]["score"] == {"type": "number", "exclusiveMinimum": 0}
    validator = jsonschema.Draft202012Validator(reply)
    assert validator.is_valid({"id": 3, "body": {"message": "hello"}})
    assert not validator.is_valid({"id": 3, "body": {"message": ""}})
    assert not validator.is_valid({"id": "three", "body": {"message": "x"}})
    assert not validator.is_valid({"id": 3})


def test_output_schema_is_recursive_and_valid(tools: Tools) -> None:
    output = tools["helpdesk.getTicket"][0].output_schema
    ticket = output["$defs"]["Ticket"]
    assert ticket["properties"]["related"]["items"] == {"$ref": "#/$defs/Ticket"}
    assert ticket["properties"]["assignee"]["type"] == ["string", "null"]  # nullable: true
    jsonschema.Draft202012Validator.check_schema(output)
    validator = jsonschema.Draft202012Validator(output)
    assert validator.is_valid({"id": 1, "subject": "s", "status": "open", "assignee": None, "related": []})
    assert not validator.is_valid({"id": 1, "subject": "s", "status": "lost"})
    assert tools["helpdesk.deleteTicket"][0].output_schema is None  # 204, no content
    assert tools["helpdesk.get_health"][0].output_schema is None  # text/plain


def test_server_url_is_the_default_binding_and_environments_add_more() -> None:
    pairs = import_openapi(
        DOC_PATH, owner="support", environments={"dev": Binding(endpoint="http://sandbox")}
    )
    definition = pairs[0][0]
    assert definition.name == "listTickets"
    assert definition.binding("prod").endpoint == "https://helpdesk.example.invalid/api"
    assert definition.binding("dev").endpoint == "http://sandbox"
    assert import_openapi(DOC_PATH, version="9")[0][0].version == "9"


# -- calls against the real server -----------------------------------------------------------


async def test_get_ticket_sends_bearer_token_and_returns_json(tools: Tools, helpdesk: Helpdesk) -> None:
    result = await call(tools, "getTicket", {"id": 7})
    assert result == {"id": 7, "subject": "Printer 7 on fire", "status": "open", "assignee": None}
    seen = helpdesk.last()
    assert (seen.method, seen.path) == ("GET", "/tickets/7")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Idempotency-Key" not in seen.headers  # reads carry none
    jsonschema.validate(result, tools["helpdesk.getTicket"][0].output_schema)


async def test_list_tickets_serializes_query_and_header_parameters(tools: Tools, helpdesk: Helpdesk) -> None:
    result = await call(
        tools,
        "listTickets",
        {"status": "pending", "limit": 2, "label": ["vip", "printer"], "X-Request-Source": "triage"},
    )
    assert [t["status"] for t in result["items"]] == ["pending", "pending"]
    seen = helpdesk.last()
    assert seen.query == {"status": ["pending"], "limit": ["2"], "label": ["vip", "printer"]}
    assert seen.headers["X-Request-Source"] == "triage"


async def test_reply_posts_json_body_with_idempotency_key(tools: Tools, helpdesk: Helpdesk) -> None:
    result = await call(tools, "replyToTicket", {"id": 3, "body": {"message": "On it"}}, key="run-1:reply")
    assert result == {"ticket_id": 3, "message": "On it", "idempotency_key": "run-1:reply"}
    seen = helpdesk.last()
    assert (seen.method, seen.path, seen.body) == ("POST", "/tickets/3/reply", {"message": "On it"})
    assert seen.headers["Idempotency-Key"] == "run-1:reply"
    assert seen.headers["Content-Type"] == "application/json"


async def test_delete_returns_none_and_carries_idempotency_key(tools: Tools, helpdesk: Helpdesk) -> None:
    assert await call(tools, "deleteTicket", {"id": 3}, key="del-3") is None
    seen = helpdesk.last()
    assert (seen.method, seen.path, seen.headers["Idempotency-Key"]) == ("DELETE", "/tickets/3", "del-3")


async def test_api_key_in_query_and_anonymous_operation(tools: Tools, helpdesk: Helpdesk) -> None:
    assert await call(tools, "queueStats", {}) == {"open": 3, "pending": 1}
    assert helpdesk.last().query == {"api_key": [API_KEY]}
    assert "Authorization" not in helpdesk.last().headers
    assert await call(tools, "get_health", {}, credentials={}) == "ok"


async def test_not_found_is_a_non_retryable_tool_error(tools: Tools) -> None:
    with pytest.raises(ToolError) as info:
        await call(tools, "getTicket", {"id": 404})
    error = info.value
    assert error.retryable is False
    assert "GET /tickets/{id} returned 404" in error.message
    assert "no ticket 404" in error.message
    assert error.hint is not None


async def test_server_errors_and_rate_limits_are_retryable(tools: Tools) -> None:
    with pytest.raises(ToolError, match="returned 500") as info:
        await call(tools, "getTicket", {"id": 500})
    assert info.value.retryable is True
    assert "database unavailable" in info.value.message
    with pytest.raises(ToolError, match="returned 429") as limited:
        await call(tools, "getTicket", {"id": 429})
    assert limited.value.retryable is True


async def test_missing_credential_and_rejected_credential(tools: Tools) -> None:
    with pytest.raises(ToolError, match="needs credential bearerAuth") as missing:
        await call(tools, "getTicket", {"id": 1}, credentials={})
    assert missing.value.retryable is False
    wrong = "wrong-token-value"
    with pytest.raises(ToolError, match="returned 401") as rejected:
        await call(tools, "getTicket", {"id": 1}, credentials={"bearerAuth": wrong})
    assert rejected.value.retryable is False
    assert wrong not in str(rejected.value)


async def test_connection_refused_is_retryable_and_does_not_leak_the_key(tools: Tools) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    definition = tools["helpdesk.queueStats"][0]
    moved = definition.model_copy(
        update={"environments": {"default": Binding(endpoint=f"http://127.0.0.1:{port}")}}
    )
    with pytest.raises(ToolError, match="could not reach") as info:
        await openapi_executor(moved)({}, ctx(moved))
    assert info.value.retryable is True
    assert API_KEY not in str(info.value)


async def test_dev_binding_points_the_same_tool_at_a_sandbox(helpdesk: Helpdesk) -> None:
    pairs = import_openapi(
        DOC_PATH, owner="support", environments={"dev": Binding(endpoint=helpdesk.url)}
    )  # default stays the unreachable servers[0] URL
    definition, execute = next(p for p in pairs if p[0].name == "getTicket")
    assert (await execute({"id": 2}, ctx(definition, env="dev")))["id"] == 2
    assert helpdesk.last().path == "/tickets/2"


@pytest.mark.parametrize("servers", [None, [{"url": "/api"}]])
async def test_missing_endpoint_is_a_clear_error(servers: list[dict[str, str]] | None) -> None:
    doc = load_openapi_document(DOC_PATH)
    del doc["servers"]
    if servers is not None:
        doc["servers"] = servers  # relative: the host is unknown
    definition, execute = import_openapi(doc)[0]
    assert definition.binding("prod").endpoint is None
    with pytest.raises(ToolError, match="has no endpoint for environment 'prod'"):
        await execute({}, ctx(definition))


def test_server_variables_are_filled_with_defaults() -> None:
    doc = load_openapi_document(DOC_PATH)
    doc["servers"] = [{"url": "https://{region}.example.invalid/v{major}", "variables": {
        "region": {"default": "eu"}, "major": {"default": "2"}}}]  # fmt: skip
    assert import_openapi(doc)[0][0].binding("dev").endpoint == "https://eu.example.invalid/v2"


@pytest.fixture
async def shared_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def test_shared_client_and_rebuild_from_definition(
    helpdesk: Helpdesk, shared_client: httpx.AsyncClient
) -> None:
    pairs = import_openapi(DOC_PATH, base_url=helpdesk.url, client=shared_client)
    definition = next(d for d, _ in pairs if d.name == "replyToTicket")
    # A stored definition is enough to execute: the registry rebuilds executors this way.
    stored = ToolDefinition.model_validate_json(definition.model_dump_json())
    execute = openapi_executor(stored, client=shared_client)
    result = await execute({"id": 9, "body": {"message": "done"}}, ctx(stored, key="k9"))
    assert result["idempotency_key"] == "k9"
    assert not shared_client.is_closed


# -- broken documents --------------------------------------------------------------------------


def broken(mutate: Any) -> dict[str, Any]:
    doc = copy.deepcopy(load_openapi_document(DOC_PATH))
    mutate(doc)
    return doc


def external_ref(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["Reply"] = {"$ref": "other.yaml#/Ticket"}


def self_loop(doc: dict[str, Any]) -> None:
    doc["components"]["parameters"]["TicketId"] = {"$ref": "#/components/parameters/TicketId"}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"swagger": "2.0", "paths": {}}, ["Swagger/OpenAPI 2.0 is not supported"]),
        ({"openapi": "4.0.0", "paths": {}}, ["unsupported OpenAPI version '4.0.0'"]),
        ({"openapi": "3.1.0"}, ["missing 'paths'"]),
        (
            broken(lambda d: d["components"]["schemas"].pop("Status")),
            ["$ref '#/components/schemas/Status' does not resolve"],
        ),
        (
            broken(lambda d: d["components"].pop("parameters")),
            [
                "$ref '#/components/parameters/TicketId' does not resolve",
                "path parameter {id} is not declared",
            ],
        ),
        (
            broken(lambda d: d["paths"]["/tickets"]["get"].update({"x-side-effect": "maybe"})),
            ["x-side-effect must be one of"],
        ),
        (
            broken(lambda d: d["paths"]["/stats"]["get"].update({"security": [{"nope": []}]})),
            ["security scheme 'nope' is not defined"],
        ),
        (broken(external_ref), ["$ref 'other.yaml#/Ticket' is not local"]),
        (
            broken(lambda d: d["paths"]["/health"]["get"].update({"operationId": "getTicket"})),
            ["tool name 'getTicket' is already used"],
        ),
    ],
)
def test_broken_documents_are_source_errors_listing_every_problem(document: Any, expected: list[str]) -> None:
    with pytest.raises(ToolSourceError) as info:
        import_openapi(document)
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_self_referencing_parameter_loop_is_reported() -> None:
    doc = broken(self_loop)
    with pytest.raises(ToolSourceError, match="refers to itself in a loop"):
        import_openapi(doc)


def test_unreadable_files_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ToolSourceError, match="cannot read OpenAPI document"):
        import_openapi(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ToolSourceError, match="not valid JSON/YAML"):
        import_openapi(bad)
    good = tmp_path / "doc.json"
    good.write_text(json.dumps(load_openapi_document(DOC_PATH)))
    assert len(import_openapi(good)) == 7
