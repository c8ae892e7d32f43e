"""`tower memory list|get|search|forget|purge`: agents' long-term memory from the command line."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.table import Table

from controltower.cli import render
from controltower.spec.errors import InvalidInputError, NotFoundError
from controltower.store import SqlStore, open_store

T = TypeVar("T")


def _short(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def register(cli: click.Group) -> None:
    from controltower.cli import main as m
    from controltower.memory import Memory

    out, run_async = m.out, m.run_async

    async def with_memory(ctx: click.Context, body: Callable[[Memory], Awaitable[T]]) -> T:
        store: SqlStore = await open_store(ctx.obj["db"])
        try:
            from controltower.gateway.audit import AuditLog

            return await body(Memory(store, audit=AuditLog(store)))
        finally:
            await store.close()

    def need_workflow(workflow: str | None, what: str) -> str:
        if not workflow:
            raise InvalidInputError(f"{what} needs --workflow", hint="tower memory list shows the workflows")
        return workflow

    tenant_opt = click.option("--tenant", default="default", show_default=True)
    workflow_opt = click.option("--workflow", "-w", help="The workflow whose memory to use.")
    namespace_opt = click.option("--namespace", "-n", default="default", show_default=True)
    json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON.")

    @cli.group()
    def memory() -> None:
        """Agents' long-term memory per tenant and workflow: inspect, search, erase."""

    @memory.command("list")
    @tenant_opt
    @workflow_opt
    @namespace_opt
    @click.option("--prefix", default="", help="Only keys starting with this.")
    @click.option("--subject", help="Only entries tagged with this subject.")
    @click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10_000))
    @json_opt
    @click.pass_context
    @run_async
    async def memory_list(
        ctx: click.Context,
        tenant: str,
        workflow: str | None,
        namespace: str,
        prefix: str,
        subject: str | None,
        limit: int,
        as_json: bool,
    ) -> None:
        """Entries of a workflow's memory; without --workflow, which workflows hold memory."""

        async def body(mem: Memory) -> None:
            if workflow is None:
                scopes = await mem.scopes(tenant)
                if as_json:
                    rows = [{"workflow": w, "namespace": n, "entries": c} for w, n, c in scopes]
                    click.echo(json.dumps(rows, indent=2))
                    return
                table = Table("workflow", "namespace", "entries")
                for w, n, c in scopes:
                    table.add_row(render.escape(w), render.escape(n), str(c))
                out.print(table if scopes else f"no memory kept for tenant {tenant}")
                return
            view = mem.view(tenant, workflow, namespace)
            entries = await view.list(prefix, subject=subject, limit=limit)
            if as_json:
                click.echo(json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False))
                return
            table = Table("key", "value", "subjects", "expires")
            for e in entries:
                expires = render.escape(f"{e.expires_at:.0f}") if e.expires_at else ""
                table.add_row(
                    render.escape(e.key), render.escape(_short(e.value)), ", ".join(e.subjects), expires
                )
            out.print(table if entries else f"no entries in {workflow}/{namespace}")

        await with_memory(ctx, body)

    @memory.command("get")
    @click.argument("key")
    @tenant_opt
    @workflow_opt
    @namespace_opt
    @click.pass_context
    @run_async
    async def memory_get(
        ctx: click.Context, key: str, tenant: str, workflow: str | None, namespace: str
    ) -> None:
        """One entry, as JSON."""

        async def body(mem: Memory) -> None:
            view = mem.view(tenant, need_workflow(workflow, "get"), namespace)
            entry = await view.get_entry(key)
            if entry is None:
                raise NotFoundError(
                    f"no entry {key!r} in {view.workflow}/{namespace} (tenant {tenant})",
                    hint="tower memory list -w WORKFLOW shows the keys; expired entries are gone",
                )
            click.echo(json.dumps(entry.to_dict(), indent=2, ensure_ascii=False))

        await with_memory(ctx, body)

    @memory.command("search")
    @click.argument("query")
    @tenant_opt
    @workflow_opt
    @namespace_opt
    @click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1, 1000))
    @click.option("--where", "where", help='Keep values with these fields, JSON: {"label": "billing"}')
    @json_opt
    @click.pass_context
    @run_async
    async def memory_search(
        ctx: click.Context,
        query: str,
        tenant: str,
        workflow: str | None,
        namespace: str,
        k: int,
        where: str | None,
        as_json: bool,
    ) -> None:
        """The entries most similar to QUERY (exact cosine over the workflow's entries)."""
        flt: dict[str, Any] | None = None
        if where:
            try:
                parsed = json.loads(where)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(
                    f"--where is not JSON: {exc.msg}", hint="--where '{\"a\": 1}'"
                ) from None
            if not isinstance(parsed, dict):
                raise InvalidInputError("--where must be a JSON object of field values")
            flt = parsed

        async def body(mem: Memory) -> None:
            view = mem.view(tenant, need_workflow(workflow, "search"), namespace)
            hits = await view.search(query, k=k, filter=flt)
            if as_json:
                click.echo(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
                return
            table = Table("score", "key", "value")
            table.caption = f"embedder: {mem.get_embedder().name}"
            for h in hits:
                table.add_row(
                    f"{h.score:.3f}", render.escape(h.entry.key), render.escape(_short(h.entry.value))
                )
            out.print(table if hits else "nothing found")

        await with_memory(ctx, body)

    @memory.command("forget")
    @tenant_opt
    @workflow_opt
    @namespace_opt
    @click.option("--subject", help="Erase everything about this subject, in every workflow of the tenant.")
    @click.option("--key", help="Delete one entry.")
    @click.option("--prefix", help="Delete every entry whose key starts with this.")
    @click.option("--by", "by", default="cli", show_default=True, help="Who asked (for the audit trail).")
    @click.pass_context
    @run_async
    async def memory_forget(
        ctx: click.Context,
        tenant: str,
        workflow: str | None,
        namespace: str,
        subject: str | None,
        key: str | None,
        prefix: str | None,
        by: str,
    ) -> None:
        """Delete memory: one --key, a --prefix, or everything about a --subject (erasure)."""
        chosen = [name for name, v in (("--subject", subject), ("--key", key), ("--prefix", prefix)) if v]
        if len(chosen) != 1:
            raise InvalidInputError(
                "give exactly one of --subject, --key or --prefix",
                hint="tower memory forget --subject customer:42",
            )

        async def body(mem: Memory) -> None:
            if subject:
                erased = await mem.forget_subject(tenant, subject, by=f"user:{by}")
                out.print(f"erased {erased} entr{'y' if erased == 1 else 'ies'} about the subject (audited)")
                return
            view = mem.view(tenant, need_workflow(workflow, "forget --key/--prefix"), namespace)
            if key:
                if not await view.delete(key):
                    raise NotFoundError(f"no entry {key!r} in {view.workflow}/{namespace} (tenant {tenant})")
                out.print(f"deleted {render.escape(key)}")
                return
            assert prefix is not None
            count = await view.delete_prefix(prefix)
            out.print(f"deleted {count} entr{'y' if count == 1 else 'ies'}")

        await with_memory(ctx, body)

    @memory.command("purge")
    @tenant_opt
    @click.pass_context
    @run_async
    async def memory_purge(ctx: click.Context, tenant: str) -> None:
        """Remove entries whose time to live has passed (they are already invisible)."""

        async def body(mem: Memory) -> None:
            count = await mem.purge_expired(tenant=tenant)
            out.print(f"purged {count} expired entr{'y' if count == 1 else 'ies'}")

        await with_memory(ctx, body)
