"""Plugs the gateway into the engine: every tool step and every agent's tool call goes through it.

Tools declared inside a workflow spec are registered when the workflow is published, as
``<workflow>.<tool>`` at version ``<tool version>.w<workflow version>``: immutable with the
workflow version a run is pinned to. Other names resolve in the tenant's registry.
"""

from __future__ import annotations

from typing import Any

from controltower.engine.context import GateOutcome, ToolInvocation, WaitInfo
from controltower.gateway.approvals import GATE_SIGNAL
from controltower.gateway.audit import AuditEvent
from controltower.gateway.pipeline import ApprovalSettings, ToolCallRequest, ToolGateway, ToolResult
from controltower.gateway.tools import ToolDefinition
from controltower.spec.models import ToolSpec, WorkflowSpec
from controltower.store.base import WorkflowRecord


class GovernedToolGate:
    def __init__(self, gateway: ToolGateway) -> None:
        self.gateway = gateway
        # the engine commits each step after its tool calls, on the same store, in order:
        # a read's record needs no commit of its own
        gateway.defer_read_records = True
        # (tenant, tool, version) of spec-local tools known to be in the registry
        self._spec_tools: set[tuple[str, str, str]] = set()

    async def aclose(self) -> None:
        await self.gateway.flush()
        await self.gateway.registry.aclose()

    async def on_publish(self, spec: WorkflowSpec, record: WorkflowRecord, base_dir: str | None) -> None:
        owner = spec.owner.team if spec.owner else "unowned"
        for name, tool in spec.tools.items():
            definition = spec_tool(spec.name, record.version, name, tool, owner, base_dir)
            await self.gateway.registry.register(definition)
            self._spec_tools.add(("default", definition.name, definition.version))

    async def _ensure_spec_tools(self, spec: WorkflowSpec, tenant: str, ctx: Any) -> None:
        """A workflow's own tools belong to every tenant that runs it: register all of them in the
        run's tenant on first use (publishing does not know which tenants will run the workflow,
        and the tenant's policies may name any of them)."""
        version = ctx.workflow_version or 0
        owner = spec.owner.team if spec.owner else "unowned"
        for name, tool in spec.tools.items():
            key = (tenant, f"{spec.name}.{name}", f"{tool.version}.w{version}")
            if key in self._spec_tools:
                continue
            definition = spec_tool(spec.name, version, name, tool, owner, ctx.base_dir)
            await self.gateway.registry.register(definition, tenant=tenant)
            self._spec_tools.add(key)

    async def invoke(self, call: ToolInvocation) -> GateOutcome:
        ctx = call.ctx
        spec = ctx.spec
        name, version = call.tool, None
        governance = spec.governance if spec is not None else None
        level: str = governance.autonomy if governance is not None else "approve_writes"
        department = None
        agent_level: str | None = None
        if spec is not None:
            department = spec.owner.team if spec.owner else None
            if call.tool in spec.tools:
                if ctx.tenant != "default":
                    await self._ensure_spec_tools(spec, ctx.tenant, ctx)
                name = f"{spec.name}.{call.tool}"
                version = f"{spec.tools[call.tool].version}.w{ctx.workflow_version}"
            if call.agent and call.agent in spec.agents:
                agent_level = spec.agents[call.agent].autonomy
        approval = ApprovalSettings()
        if governance is not None:
            approval = ApprovalSettings(
                sla=governance.approval_sla,
                on_timeout=governance.on_approval_timeout,
                escalate_to=governance.escalate_to,
                group=governance.approval_group,
            )
        args = call.args if isinstance(call.args, dict) else {"input": call.args}
        request = ToolCallRequest(
            tool=name,
            version=version,
            args=args,
            tenant=ctx.tenant,
            workflow=ctx.workflow,
            agent=call.agent,
            department=department,
            run_id=ctx.run_id,
            step_key=ctx.step_key,
            call_index=call.index,
            autonomy=level,
            agent_autonomy=agent_level,
            risk_threshold=governance.risk_threshold if governance is not None else "low",
            approval=approval,
            proposal=call.proposal,
        )
        result = await self.gateway.call(request)
        reads = (call.proposal or {}).get("data_read")
        if reads and not result.replayed and result.status != "pending_approval":
            await self._record_reads(request, result, reads)
        wait = None
        if result.status == "pending_approval":
            wait = WaitInfo(
                ctx.step_key, "tool_approval", GATE_SIGNAL + request.call_key, result.approval_due
            )
        return GateOutcome(
            status=result.status,
            output=result.output,
            code=result.code,
            reason=result.reason,
            retryable=result.retryable,
            wait=wait,
        )

    async def _record_reads(self, request: ToolCallRequest, result: ToolResult, reads: Any) -> None:
        """The provenance of a decided call: what the agent had read when it asked for it.

        Written once per call (a replayed result records nothing), beside the call's own record;
        while the call waits for approval, the reads are in the approval request instead.
        """
        event = AuditEvent(
            tenant=request.tenant,
            actor=request.actor,
            kind="data_read",
            subject=result.tool,
            run_id=request.run_id,
            workflow=request.workflow,
            outcome=result.status,
            data={
                "call_key": request.call_key,
                "step_key": request.step_key,
                "call_index": request.call_index,
                "data_read": reads,
            },
        )
        await self.gateway.audit.append(event)


def spec_tool(
    workflow: str, workflow_version: int, name: str, tool: ToolSpec, owner: str, base_dir: str | None
) -> ToolDefinition:
    ref: dict[str, Any] = {"impl": tool.impl, "base_dir": base_dir}
    return ToolDefinition(
        name=f"{workflow}.{name}",
        version=f"{tool.version}.w{workflow_version}",
        owner=owner,
        description=tool.description or "",
        input_schema=tool.input_schema or {"type": "object"},
        output_schema=tool.output_schema,
        side_effect=tool.side_effect,
        risk=tool.risk,
        source="spec",
        source_ref=ref,
    )
