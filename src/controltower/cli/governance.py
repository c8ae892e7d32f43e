"""`tower tools|policy|approvals|audit|pause|unpause|calls`: the gateway from the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from controltower.cli import render
from controltower.engine import EmbeddedEngine
from controltower.gateway.approvals import ApprovalRequest, Approver
from controltower.gateway.pipeline import ToolGateway
from controltower.gateway.tools import ToolDefinition
from controltower.spec.errors import InvalidInputError, NotFoundError
from controltower.store import TERMINAL


def register(cli: click.Group) -> None:
    from controltower.cli import main as m

    out, run_async, with_engine, parse_input = m.out, m.run_async, m.with_engine, m.parse_input

    async def with_gateway(ctx: click.Context, body: Any) -> Any:
        """The engine with its gateway (governed by the configured or discovered policies)."""

        async def inner(engine: EmbeddedEngine) -> Any:
            gate = engine.tool_gate
            if gate is None:
                from controltower.gateway.engine_gate import GovernedToolGate
                from controltower.gateway.pipeline import open_gateway

                gateway = await open_gateway(engine.store, env=ctx.obj["env"])
                engine.tool_gate = gate = GovernedToolGate(gateway)
            return await body(engine, gate.gateway)  # type: ignore[attr-defined]

        return await with_engine(ctx, inner)

    # -- tools ----------------------------------------------------------------------------

    @cli.group()
    def tools() -> None:
        """The tool registry: versions, owners, side effects, who may call what."""

    @tools.command("list")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    @run_async
    async def tools_list(ctx: click.Context, tenant: str, as_json: bool) -> None:
        """Every tool at its newest version."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            found = await gw.registry.latest(tenant=tenant)
            if as_json:
                click.echo(json.dumps([t.model_dump(mode="json") for t in found], indent=2))
                return
            table = Table("tool", "version", "owner", "side effect", "risk", "source", "note")
            for t in found:
                note = f"deprecated: {t.deprecated}" if t.deprecated else ""
                table.add_row(t.name, t.version, t.owner, t.side_effect, t.risk, t.source, note)
            out.print(table if found else "no tools registered (tools join when a workflow is published)")

        await with_gateway(ctx, body)

    @tools.command("show")
    @click.argument("name")
    @click.option("--version", "version", default=None)
    @click.option("--tenant", default="default", show_default=True)
    @click.pass_context
    @run_async
    async def tools_show(ctx: click.Context, name: str, version: str | None, tenant: str) -> None:
        """One tool: schemas, bindings (credential references only), rate limit, versions."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            tool = await gw.registry.resolve(name, version, tenant=tenant)
            versions = [v.version for v in await gw.registry.versions(name, tenant=tenant)]
            data = tool.model_dump(mode="json")
            data["all_versions"] = versions
            click.echo(json.dumps(data, indent=2))

        await with_gateway(ctx, body)

    @tools.command("who-can")
    @click.argument("name")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--all-operations", is_flag=True, help="Also list read access.")
    @click.pass_context
    @run_async
    async def tools_who_can(ctx: click.Context, name: str, tenant: str, all_operations: bool) -> None:
        """Which workflows and agents may call this tool (its writes, by default), and how."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            rows = await who_can(engine, gw, name, tenant)
            tool = await gw.registry.resolve(name, tenant=tenant)
            if not tool.writes and not all_operations:
                out.print(f"{name} is a read tool; pass --all-operations to list read access")
                return
            table = Table("workflow", "agent", "decision", "policies", "approval group")
            table.caption = "decided with minimal arguments; conditions on values may refuse specific calls"
            for row in rows:
                table.add_row(*row)
            out.print(table if rows else f"nobody may call {name}")

        await with_gateway(ctx, body)

    @tools.command("import-openapi")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--base-url", help="Server URL (default: the document's servers[0]).")
    @click.option("--owner", required=True, help="Team that owns these tools.")
    @click.option("--prefix", help="Name prefix, e.g. helpdesk -> helpdesk.get_ticket")
    @click.option("--version", "version", default=None)
    @click.option("--tenant", default="default", show_default=True)
    @click.pass_context
    @run_async
    async def tools_import_openapi(
        ctx: click.Context,
        file: str,
        base_url: str | None,
        owner: str,
        prefix: str | None,
        version: str | None,
        tenant: str,
    ) -> None:
        """Register each operation of an OpenAPI 3 document as a tool."""
        from controltower.gateway.sources.openapi import import_openapi

        pairs = import_openapi(Path(file), base_url=base_url, owner=owner, prefix=prefix, version=version)

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            for tool, _executor in pairs:
                await gw.registry.register(tool, tenant=tenant)
                out.print(f"registered {tool.name} v{tool.version} ({tool.side_effect}, risk {tool.risk})")

        await with_gateway(ctx, body)

    # -- policy ---------------------------------------------------------------------------

    @cli.group()
    def policy() -> None:
        """Cedar policies: test a request, run a policy suite."""

    @policy.command("test")
    @click.argument("suite", required=False, type=click.Path(exists=True, dir_okay=False))
    @click.option("--tool", help="Explain one request instead of running a suite.")
    @click.option("--workflow")
    @click.option("--agent")
    @click.option("--department")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--args", "raw_args", help="Tool arguments: JSON or @file.")
    @click.pass_context
    @run_async
    async def policy_test(
        ctx: click.Context,
        suite: str | None,
        tool: str | None,
        workflow: str | None,
        agent: str | None,
        department: str | None,
        tenant: str,
        raw_args: str | None,
    ) -> None:
        """Run a YAML policy suite (exit 1 on a failing case), or explain one request (--tool)."""
        import sys

        if suite is not None:
            from controltower.gateway.policy_suite import run_suite

            result = run_suite(suite)
            out.print(render.escape(result.render()))
            if not result.ok:
                sys.exit(1)
            return
        if tool is None:
            raise InvalidInputError("give a suite file or --tool NAME", hint="tower policy test suite.yaml")
        args = parse_input(raw_args)

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            from controltower.gateway.policy import PolicyError, PolicyRequest

            definition = await gw.registry.resolve(tool, tenant=tenant)
            engine_or_error = await gw.policy_for(definition, tenant)
            if isinstance(engine_or_error, PolicyError):
                raise engine_or_error
            request = PolicyRequest(
                tool=definition,
                agent=agent,
                workflow=workflow,
                department=department,
                tenant=tenant,
                env=ctx.obj["env"],
                args=args if isinstance(args, dict) else {},
            )
            out.print(render.escape(engine_or_error.explain(request)))

        await with_gateway(ctx, body)

    # -- approvals ------------------------------------------------------------------------

    @cli.group(invoke_without_command=True)
    @click.option("--all", "show_all", is_flag=True, help="Include decided ones.")
    @click.option("--tenant", default=None)
    @click.pass_context
    def approvals(ctx: click.Context, show_all: bool, tenant: str | None) -> None:
        """The approvals inbox of governed tool calls (list, show, approve, reject)."""
        if ctx.invoked_subcommand is None:
            ctx.invoke(approvals_list, show_all=show_all, tenant=tenant)

    @approvals.command("list")
    @click.option("--all", "show_all", is_flag=True, help="Include decided ones.")
    @click.option("--tenant", default=None)
    @click.pass_context
    @run_async
    async def approvals_list(ctx: click.Context, show_all: bool, tenant: str | None) -> None:
        """Pending approvals, oldest first."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            found = await gw.approvals.list(tenant=tenant, status=None if show_all else ("pending",))
            table = Table("status", "tool", "group", "risk", "args")
            for a in found:
                args = json.dumps(a.args, sort_keys=True)
                table.add_row(a.status, a.tool, a.approval_group or "-", a.risk, args[:60])
                table.add_row(f"[dim]{a.id}[/dim]", f"[dim]run {a.run_id or '-'}[/dim]", "", "", "")
            out.print(table if found else "no approvals waiting")

        await with_gateway(ctx, body)

    @approvals.command("show")
    @click.argument("approval_id")
    @click.pass_context
    @run_async
    async def approvals_show(ctx: click.Context, approval_id: str) -> None:
        """The whole picture: proposal, reasoning, exact arguments and digest, policy, cost, risk."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            click.echo(json.dumps(describe(await gw.approvals.get(approval_id)), indent=2, default=str))

        await with_gateway(ctx, body)

    def decide_command(approve: bool) -> Any:
        @click.argument("approval_id")
        @click.option("--as", "who", default=lambda: os.environ.get("USER") or "cli", help="Approver name.")
        @click.option(
            "--role",
            default="admin",
            show_default=True,
            type=click.Choice(["admin", "operator", "approver", "viewer"]),
            help="Role of the approver (the API checks it against tokens; here you act locally).",
        )
        @click.option("--group", "groups", multiple=True, help="Approver's groups (repeatable).")
        @click.option("--reason", help="Why; required to reject.")
        @click.option("--edit", "raw_edit", help="Approve with edited arguments: JSON or @file.")
        @click.pass_context
        @run_async
        async def decide(
            ctx: click.Context,
            approval_id: str,
            who: str,
            role: str,
            groups: tuple[str, ...],
            reason: str | None,
            raw_edit: str | None,
        ) -> None:
            edited = parse_input(raw_edit) if raw_edit is not None else None
            if edited is not None and not approve:
                raise InvalidInputError("--edit only applies to approve")

            async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
                decided = await gw.decide(
                    approval_id,
                    approver=Approver(who, role, groups),
                    approve=approve,
                    reason=reason,
                    edited_args=edited,
                )
                verb = "approved" if approve else "rejected"
                suffix = " with edited arguments" if decided.edited else ""
                out.print(f"{verb} {decided.id} ({decided.tool}){suffix} as {who}")
                if decided.run_id:
                    await engine.wake(decided.run_id)
                    info = await render.watch(engine, decided.run_id, TERMINAL | {"waiting"}, quiet=True)
                    out.print(render.run_summary(info))

            await with_gateway(ctx, body)

        return decide

    approvals.command("approve", help="Approve a governed tool call (optionally --edit its arguments).")(
        decide_command(True)
    )
    approvals.command("reject", help="Reject a governed tool call (--reason required).")(
        decide_command(False)
    )

    # -- audit ----------------------------------------------------------------------------

    @cli.group()
    def audit() -> None:
        """The hash-chained audit trail: list, verify, export."""

    @audit.command("list")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--run", "run_id")
    @click.option("--kind")
    @click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1, 10_000))
    @click.pass_context
    @run_async
    async def audit_list(
        ctx: click.Context, tenant: str, run_id: str | None, kind: str | None, limit: int
    ) -> None:
        """Audit records, oldest first."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            records = await gw.audit.query(tenant, run_id=run_id, kind=kind, limit=limit)
            table = Table("seq", "actor", "kind", "subject", "outcome", "reason")
            for r in records:
                table.add_row(str(r.seq), r.actor, r.kind, r.subject or "", r.outcome, (r.reason or "")[:70])
            out.print(table if records else "no audit records")

        await with_gateway(ctx, body)

    @audit.command("verify")
    @click.pass_context
    @run_async
    async def audit_verify(ctx: click.Context) -> None:
        """Walk the chain; exit 1 if a record was edited, deleted, inserted or reordered."""
        import sys

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            result = await gw.audit.verify()
            if result.ok:
                out.print(f"[green]ok[/green] audit chain intact: {result.checked} record(s)")
                return
            out.print(f"[red]TAMPERED[/red] {render.escape(str(result.message))}")
            sys.exit(1)

        await with_gateway(ctx, body)

    @audit.command("export")
    @click.argument("file", type=click.Path(dir_okay=False))
    @click.option("--tenant", default=None)
    @click.pass_context
    @run_async
    async def audit_export(ctx: click.Context, file: str, tenant: str | None) -> None:
        """Write the audit trail as JSONL (with hashes, so it can be verified elsewhere)."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            count = await gw.audit.export_jsonl(Path(file), tenant=tenant)
            out.print(f"wrote {count} record(s) to {file}")

        await with_gateway(ctx, body)

    # -- kill switch, reconciliation ------------------------------------------------------

    @cli.command()
    @click.argument("workflow")
    @click.option("--reason", required=True, help="Recorded in the audit trail.")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--by", default=lambda: os.environ.get("USER") or "cli")
    @click.pass_context
    @run_async
    async def pause(ctx: click.Context, workflow: str, reason: str, tenant: str, by: str) -> None:
        """Kill switch: every tool call of WORKFLOW is refused until `tower unpause`."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            changed = await gw.controls.pause(tenant, workflow, reason, by)
            out.print(f"paused {workflow}" if changed else f"{workflow} was already paused")

        await with_gateway(ctx, body)

    @cli.command()
    @click.argument("workflow")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--by", default=lambda: os.environ.get("USER") or "cli")
    @click.pass_context
    @run_async
    async def unpause(ctx: click.Context, workflow: str, tenant: str, by: str) -> None:
        """Lift the kill switch of WORKFLOW."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            changed = await gw.controls.resume(tenant, workflow, by)
            out.print(f"unpaused {workflow}" if changed else f"{workflow} was not paused")

        await with_gateway(ctx, body)

    @cli.group()
    def autonomy() -> None:
        """Autonomy overrides: tighten at once; loosening waits for a second person."""

    def _scope(workflow: str, agent: str | None) -> str:
        return f"agent:{workflow}/{agent}" if agent else f"workflow:{workflow}"

    @autonomy.command("set")
    @click.argument("workflow")
    @click.argument(
        "level", type=click.Choice(["draft_only", "approve_writes", "autonomous_low_risk", "expanded"])
    )
    @click.option("--agent", help="Override one agent of the workflow instead.")
    @click.option("--reason", required=True)
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--as", "who", default=lambda: os.environ.get("USER") or "cli")
    @click.pass_context
    @run_async
    async def autonomy_set(
        ctx: click.Context, workflow: str, level: str, agent: str | None, reason: str, tenant: str, who: str
    ) -> None:
        """Set the level of WORKFLOW (or --agent): applied if tighter, else pending approval."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            current = await current_level(engine, workflow, agent)
            change = await gw.autonomy.request(
                tenant, _scope(workflow, agent), level, by=who, reason=reason, current=current
            )
            if change.status == "applied":
                out.print(f"{change.scope}: autonomy is now {level}")
            else:
                out.print(
                    f"{change.scope}: {level} is looser than {current}; it waits for another person: "
                    f"tower autonomy approve {workflow}" + (f" --agent {agent}" if agent else "")
                )

        await with_gateway(ctx, body)

    @autonomy.command("approve")
    @click.argument("workflow")
    @click.option("--agent")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--as", "who", default=lambda: os.environ.get("USER") or "cli")
    @click.pass_context
    @run_async
    async def autonomy_approve(
        ctx: click.Context, workflow: str, agent: str | None, tenant: str, who: str
    ) -> None:
        """Approve a pending loosening (not by the person who asked)."""

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            change = await gw.autonomy.approve(tenant, _scope(workflow, agent), by=who)
            out.print(f"{change.scope}: autonomy is now {change.level} (asked by {change.requested_by})")

        await with_gateway(ctx, body)

    @cli.command("reconcile")
    @click.argument("call_key")
    @click.option("--result", "raw_result", help="What the call really returned: JSON or @file.")
    @click.option("--failed", is_flag=True, help="The call did not take effect.")
    @click.option("--as", "who", default=lambda: os.environ.get("USER") or "cli")
    @click.pass_context
    @run_async
    async def reconcile(
        ctx: click.Context, call_key: str, raw_result: str | None, failed: bool, who: str
    ) -> None:
        """Settle an in-doubt tool call (a crash hid its outcome), then `tower resume` the run."""
        if failed == (raw_result is not None):
            raise InvalidInputError("give exactly one of --result JSON or --failed")

        async def body(engine: EmbeddedEngine, gw: ToolGateway) -> None:
            result = parse_input(raw_result) if raw_result else None
            await gw.reconcile(call_key, by=who, result=result, failed=failed)
            out.print(f"recorded {call_key} as {'failed' if failed else 'completed'}")

        await with_gateway(ctx, body)


async def who_can(engine: EmbeddedEngine, gw: ToolGateway, name: str, tenant: str) -> list[tuple[str, ...]]:
    """Evaluate the policy for every published workflow and its agents against one tool."""
    from controltower.gateway.policy import PolicyError, PolicyRequest
    from controltower.spec.models import WorkflowSpec

    tool: ToolDefinition = await gw.registry.resolve(name, tenant=tenant)
    policy = await gw.policy_for(tool, tenant)
    if isinstance(policy, PolicyError):
        raise policy
    rows: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for record in await engine.store.list_workflows():
        if record.name in seen:
            continue
        seen.add(record.name)
        spec = WorkflowSpec.model_validate(record.spec)
        department = spec.owner.team if spec.owner else None
        for agent in [None, *spec.agents]:
            decision = policy.decide(
                PolicyRequest(
                    tool=tool,
                    agent=agent,
                    workflow=spec.name,
                    department=department,
                    tenant=tenant,
                    env=gw.env,
                    args=minimal_args(tool.input_schema),
                )
            )
            if decision.effect != "deny":
                rows.append(
                    (
                        spec.name,
                        agent or "(tool steps)",
                        decision.effect,
                        ", ".join(decision.policy_ids),
                        decision.approval_group or "",
                    )
                )
    return rows


async def current_level(engine: EmbeddedEngine, workflow: str, agent: str | None) -> str:
    """The level the newest published version of ``workflow`` declares (for the agent, if given)."""
    from controltower.spec.models import WorkflowSpec

    record = await engine.store.get_workflow(workflow)
    if record is None:
        raise NotFoundError(f"no published workflow {workflow!r}", hint="tower publish FILE")
    spec = WorkflowSpec.model_validate(record.spec)
    if agent is None:
        return spec.governance.autonomy
    if agent not in spec.agents:
        raise NotFoundError(f"workflow {workflow} has no agent {agent!r}")
    return spec.agents[agent].autonomy


def minimal_args(schema: dict[str, Any]) -> Any:
    """The smallest value a schema accepts (required fields only): a probe for "may X call T at all".

    Conditions on argument values are evaluated with these, so a policy that only allows
    small amounts still shows as a grant; what a particular call may do is `tower policy test`.
    """
    kind = schema.get("type")
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: minimal_args(props.get(name, {})) for name in schema.get("required", [])}
    defaults: dict[str, Any] = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": []}
    return defaults.get(kind if isinstance(kind, str) else "")


def describe(a: ApprovalRequest) -> dict[str, Any]:
    data = a.to_dict()
    data["what"] = f"{a.tool} v{a.tool_version} ({a.risk} risk)"
    return data
