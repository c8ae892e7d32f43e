"""`tower triggers list|run|sign`: the triggers of published workflows from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
from dataclasses import dataclass
from typing import Any

import click

from controltower.engine import EmbeddedEngine
from controltower.spec.errors import InvalidInputError
from controltower.store import SqlStore


@dataclass
class _Services:
    engine: EmbeddedEngine
    store: SqlStore
    gateway: Any = None
    base_url: str | None = None


def register(cli: click.Group) -> None:
    from controltower.cli import main as m

    out, err, run_async = m.out, m.err, m.run_async

    @cli.group()
    def triggers() -> None:
        """Webhooks, cron schedules and queue consumers that start published workflows."""

    @triggers.command("list")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    @run_async
    async def list_triggers(ctx: click.Context, as_json: bool) -> None:
        """Every trigger of the latest version of each published workflow."""
        from controltower.store import open_store
        from controltower.triggers._common import latest_published
        from controltower.triggers.runner import describe

        store = await open_store(ctx.obj["db"])
        try:
            published = await latest_published(store)
        finally:
            await store.close()
        rows = [
            (p.spec.name, p.record.version, p.tenant, trig)
            for p in published
            for trig in p.spec.triggers
            if trig.kind != "manual"
        ]
        if as_json:
            data = [
                {"workflow": n, "version": v, "tenant": t, "trigger": trig.model_dump(mode="json")}
                for n, v, t, trig in rows
            ]
            click.echo(json.dumps(data, indent=2))
            return
        if not rows:
            out.print("no published workflow has a webhook, cron or queue trigger")
            return
        for name, version, tenant, trig in rows:
            out.print(f"{name} v{version} [{tenant}]  {describe(name, trig)}", markup=False)

    @triggers.command("run")
    @click.option("--refresh", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600))
    @click.option("--base-url", envvar="TOWER_BASE_URL", help="Dashboard URL for links in notifications.")
    @click.option(
        "--no-worker", is_flag=True, help="Only start runs; leave executing them to `tower worker`."
    )
    @click.pass_context
    @run_async
    async def run_triggers(ctx: click.Context, refresh: float, base_url: str | None, no_worker: bool) -> None:
        """Fire cron schedules and consume queues of all published workflows until interrupted."""
        from controltower.triggers import TriggerRunner

        async def body(engine: EmbeddedEngine) -> None:
            gateway = getattr(engine.tool_gate, "gateway", None)
            services = _Services(engine, engine.store, gateway, base_url)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
            runner = TriggerRunner(services, refresh=refresh)
            await runner.start()
            err.print(f"tower triggers running (db {engine.store.url}); Ctrl-C stops")
            try:
                if no_worker:
                    await stop.wait()
                else:
                    await engine.recover()
                    await engine.work(stop)
            finally:
                await runner.stop()
                err.print("tower triggers stopped")

        await m.with_engine(ctx, body)

    @triggers.command("sign")
    @click.option("--secret-env", required=True, help="Env var holding the signing secret.")
    @click.option("--data", "raw", default="{}", show_default=True, help="JSON body, or @file.json.")
    @click.option("--delivery", help="Delivery id (a repeat with the same id starts no second run).")
    @click.option("--url", help="Print a curl command posting to this URL.")
    def sign_delivery(secret_env: str, raw: str, delivery: str | None, url: str | None) -> None:
        """Sign a webhook body: prints the headers (or a curl command); never the secret."""
        from controltower.triggers.signing import sign

        try:
            secret = os.environ.get(secret_env)
            if not secret:
                raise InvalidInputError(f"${secret_env} is not set", hint="export it with the signing secret")
            text = raw
            if raw.startswith("@"):
                try:
                    with open(raw[1:], encoding="utf-8") as fh:
                        text = fh.read()
                except OSError as exc:
                    raise InvalidInputError(f"cannot read {raw[1:]}: {exc.strerror}") from None
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"the body is not JSON: {exc}") from None
            body, headers = sign(secret, text.encode(), delivery_id=delivery)
        except InvalidInputError as exc:
            m.fail(exc)
            return
        if url is None:
            click.echo(json.dumps(headers, indent=2))
            return
        parts = ["curl", "-sS", "-X", "POST", url]
        for name, value in headers.items():
            parts += ["-H", f"{name}: {value}"]
        parts += ["--data-binary", body.decode()]
        click.echo(" ".join(shlex.quote(p) for p in parts))
