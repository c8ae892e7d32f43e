"""`tower`: the command line. Every error is one clear line and a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from controltower import __version__
from controltower.cli import render
from controltower.engine import EmbeddedEngine
from controltower.spec.errors import InvalidInputError, SpecError, TowerError
from controltower.store import TERMINAL, RunFilter

if TYPE_CHECKING:
    from controltower.notify import Notifier

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
T = TypeVar("T")

EXIT_ERROR = 1
EXIT_SPEC = 2


def fail(exc: BaseException) -> None:
    """Print one line per problem and exit; tracebacks only with TOWER_DEBUG=1."""
    if os.environ.get("TOWER_DEBUG"):
        raise exc
    if isinstance(exc, SpecError):
        for issue in exc.issues:
            err.print(f"[red]error[/red] {render.escape(issue.render())}")
        err.print(f"{len(exc.issues)} problem(s) found")
        sys.exit(EXIT_SPEC)
    if isinstance(exc, TowerError):
        hint = f" [dim](hint: {render.escape(exc.hint)})[/dim]" if exc.hint else ""
        err.print(f"[red]error\\[{exc.code}][/red] {render.escape(exc.message)}{hint}")
        sys.exit(EXIT_ERROR)
    if isinstance(exc, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    err.print(
        f"[red]internal error[/red] {type(exc).__name__}: {render.escape(str(exc))} "
        "[dim](set TOWER_DEBUG=1 for a traceback, and please report it)[/dim]"
    )
    sys.exit(EXIT_ERROR)


def run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T | None]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except (Exception, KeyboardInterrupt) as exc:
            fail(exc)
        return None

    return wrapper


def policy_dir(ctx: click.Context, base_dir: str | None = None) -> str | None:
    """--policies / TOWER_POLICIES, else a ``policies/`` folder beside the workflow file."""
    chosen: str | None = ctx.obj.get("policies")
    if chosen:
        return chosen
    if base_dir is not None and (Path(base_dir) / "policies").is_dir():
        return str(Path(base_dir) / "policies")
    return None


async def with_engine(
    ctx: click.Context, body: Callable[[EmbeddedEngine], Awaitable[T]], *, base_dir: str | None = None
) -> T:
    """Open the engine; with policies configured, every tool call goes through the gateway."""
    engine = await EmbeddedEngine.open(ctx.obj["db"])
    try:
        texts = await gather_policies(ctx, engine, base_dir)
        if texts is not None:
            from controltower.gateway.engine_gate import GovernedToolGate
            from controltower.gateway.pipeline import open_gateway

            gateway = await open_gateway(engine.store, policy_texts=texts, env=ctx.obj["env"])
            engine.tool_gate = GovernedToolGate(gateway)
        notifier = _notifier(engine)
        try:
            return await body(engine)
        finally:
            if notifier is not None:
                # a short wait for this command's notifications; what is undelivered stays in the
                # outbox for the next worker or server
                await notifier.flush(5)
                await notifier.aclose()
    finally:
        await engine.close()


def _notifier(engine: EmbeddedEngine) -> Notifier | None:
    """With TOWER_NOTIFY_* / TOWER_SMTP_* set, approval requests (steps and governed calls),
    escalations and failures notify from every command, not only from `tower serve`."""
    from controltower.notify import Notifier

    notifier = Notifier.from_env(store=engine.store)
    if notifier is not None:
        notifier.attach(engine=engine, gateway=getattr(engine.tool_gate, "gateway", None))
        notifier.start()
    return notifier


async def gather_policies(
    ctx: click.Context, engine: EmbeddedEngine, base_dir: str | None
) -> dict[str, str] | None:
    """The policy texts to govern with, or None when nothing is governed.

    Explicit --policies wins. Otherwise the ``policies/`` folders beside the workflow
    being run and beside every published workflow are merged, so a worker or an approval
    that continues a governed run is governed too.
    """
    from controltower.gateway.policy import read_policy_dir

    chosen = policy_dir(ctx, base_dir)
    if ctx.obj.get("policies"):
        return read_policy_dir(ctx.obj["policies"])
    dirs: dict[str, str] = {}
    if chosen is not None:
        dirs[chosen] = Path(chosen).parent.name
    for record in await engine.store.list_workflows():
        if record.base_dir and (Path(record.base_dir) / "policies").is_dir():
            dirs.setdefault(str(Path(record.base_dir) / "policies"), record.name)
    if not dirs:
        return None
    texts: dict[str, str] = {}
    for folder, label in sorted(dirs.items()):
        for name, text in read_policy_dir(folder).items():
            texts[f"{label}/{name}"] = text
    return texts


def parse_input(raw: str | None) -> Any:
    """JSON text, or @path to a JSON or YAML file."""
    if raw is None:
        return {}
    text = raw
    source = "--input"
    if raw.startswith("@"):
        path = Path(raw[1:])
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(f"cannot read input file {path}: {exc.strerror}") from None
        if path.suffix in (".yaml", ".yml"):
            from ruamel.yaml import YAML
            from ruamel.yaml.error import YAMLError

            try:
                return YAML(typ="safe").load(text)
            except YAMLError as exc:
                raise InvalidInputError(f"{source} is not valid YAML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            hint='quote it for the shell, e.g. --input \'{"ticket": "T-1"}\', or use --input @file.json',
        ) from None


def load_target(target: str) -> tuple[Any, str | None]:
    """A spec file (published on run) or the name of a published workflow."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        from controltower.spec.loader import load_spec_file

        spec = load_spec_file(path)
        return spec, str(path.resolve().parent)
    return target, None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="TOWER_DB_URL",
    default=None,
    help="Store URL (sqlite:///file.db or postgresql://...). Default: .tower/tower.db",
)
@click.option(
    "--policies",
    envvar="TOWER_POLICIES",
    default=None,
    help="Directory of Cedar policies: tool calls go through the governed gateway. "
    "Default: a policies/ folder beside the workflow file, if there is one.",
)
@click.option(
    "--env",
    "env_name",
    envvar="TOWER_ENV",
    default="dev",
    show_default=True,
    type=click.Choice(["dev", "staging", "prod"]),
    help="Environment: picks tool bindings and credentials; prod is stricter.",
)
@click.version_option(__version__, prog_name="tower")
@click.pass_context
def cli(ctx: click.Context, db: str | None, policies: str | None, env_name: str) -> None:
    """Control Tower: run governed, durable agent workflows."""
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    ctx.obj["policies"] = policies
    ctx.obj["env"] = env_name


@cli.command()
def schema() -> None:
    """Print the JSON Schema of workflow specs (for editors and CI)."""
    from controltower.spec.models import WorkflowSpec

    click.echo(json.dumps(WorkflowSpec.model_json_schema(), indent=2))


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Check spec files; report every problem with file, line and a hint."""
    from controltower.spec.loader import load_spec_file

    problems = []
    for file in files:
        try:
            spec = load_spec_file(file)
        except SpecError as exc:
            problems.extend(exc.issues)
            continue
        except Exception as exc:
            fail(exc)
        out.print(f"[green]ok[/green] {file}: workflow {spec.name!r}, {len(spec.steps)} top-level steps")
    if problems:
        fail(SpecError(problems))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
@run_async
async def publish(ctx: click.Context, file: str) -> None:
    """Publish a spec as an immutable version (unchanged content keeps its version)."""
    from controltower.spec.loader import load_spec_file

    spec = load_spec_file(file)
    base_dir = str(Path(file).resolve().parent)

    async def body(engine: EmbeddedEngine) -> None:
        record = await engine.publish(spec, base_dir)
        out.print(f"published {record.name} version {record.version} ({record.digest[:12]})")

    await with_engine(ctx, body, base_dir=base_dir)


@cli.command()
@click.pass_context
@run_async
async def workflows(ctx: click.Context) -> None:
    """List published workflows and their versions."""

    async def body(engine: EmbeddedEngine) -> None:
        out.print(render.workflows_table(await engine.store.list_workflows()))

    await with_engine(ctx, body)


@cli.command()
@click.argument("target")
@click.option("--input", "-i", "raw_input", help="JSON, or @file.json / @file.yaml")
@click.option("--wait", is_flag=True, help="Keep waiting through parked states until the run ends.")
@click.option("--detach", is_flag=True, help="Only enqueue the run for a `tower worker`.")
@click.option("--idempotency-key", help="Starting twice with the same key returns the first run.")
@click.option("--version", "version", type=int, help="Version of a published workflow.")
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@click.pass_context
@run_async
async def run(
    ctx: click.Context,
    target: str,
    raw_input: str | None,
    wait: bool,
    detach: bool,
    idempotency_key: str | None,
    version: int | None,
    as_json: bool,
) -> None:
    """Run a workflow (spec FILE or published NAME) here until it ends or parks."""
    spec, base_dir = load_target(target)
    payload = parse_input(raw_input)

    async def body(engine: EmbeddedEngine) -> None:
        run_id = await engine.start(
            spec,
            payload,
            version=version,
            idempotency_key=idempotency_key,
            base_dir=base_dir,
            execute=not detach,
        )
        if detach:
            out.print(f"enqueued {run_id}; a `tower worker` will run it")
            return
        statuses = TERMINAL if wait else TERMINAL | {"waiting"}
        info = await render.watch(engine, run_id, statuses, quiet=as_json)
        if as_json:
            click.echo(json.dumps(render.run_json(info, None), indent=2, default=str))
        else:
            out.print(render.run_summary(info))
        if info.status == "failed":
            sys.exit(EXIT_ERROR)

    await with_engine(ctx, body, base_dir=base_dir)


@cli.command()
@click.option("--workflow", "-w", help="Only runs of this workflow.")
@click.option("--status", "-s", multiple=True, help="Only runs in this status (repeatable).")
@click.option("--limit", "-n", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", help="Page: runs older than this run id.")
@click.pass_context
@run_async
async def runs(
    ctx: click.Context,
    workflow: str | None,
    status: tuple[str, ...],
    limit: int,
    before: str | None,
) -> None:
    """List runs, newest first."""

    async def body(engine: EmbeddedEngine) -> None:
        flt = RunFilter(workflow=workflow, status=status or None, limit=limit, before_id=before)
        records = await engine.store.list_runs(flt)
        out.print(render.runs_table(records))
        if len(records) == limit:
            out.print(f"[dim]more: tower runs --before {records[-1].id}[/dim]")

    await with_engine(ctx, body)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print the run and its steps as JSON.")
@click.pass_context
@run_async
async def show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run: status, then a timeline of its steps."""

    async def body(engine: EmbeddedEngine) -> None:
        info = await engine.get(run_id)
        steps = await engine.store.load_steps(run_id)
        if as_json:
            click.echo(json.dumps(render.run_json(info, steps), indent=2, default=str))
            return
        out.print(render.run_summary(info))
        out.print(render.timeline(steps))

    await with_engine(ctx, body)


@cli.command()
@click.argument("run_id")
@click.option("--reason", help="Recorded with the cancellation.")
@click.pass_context
@run_async
async def cancel(ctx: click.Context, run_id: str, reason: str | None) -> None:
    """Cancel a run (a run executing in another process stops at its next heartbeat)."""

    async def body(engine: EmbeddedEngine) -> None:
        info = await engine.cancel(run_id, reason=reason)
        out.print(f"{run_id}: {info.status}" + ("" if info.status == "cancelled" else " (cancel requested)"))

    await with_engine(ctx, body)


@cli.command()
@click.argument("run_id")
@click.option("--wait", is_flag=True, help="Wait until the run ends.")
@click.pass_context
@run_async
async def resume(ctx: click.Context, run_id: str, wait: bool) -> None:
    """Resume a failed run from the step that failed."""

    async def body(engine: EmbeddedEngine) -> None:
        await engine.resume(run_id)
        statuses = TERMINAL if wait else TERMINAL | {"waiting"}
        out.print(render.run_summary(await render.watch(engine, run_id, statuses)))

    await with_engine(ctx, body)


@cli.command()
@click.argument("run_id")
@click.argument("event")
@click.option("--data", help="Event payload: JSON or @file.")
@click.pass_context
@run_async
async def signal(ctx: click.Context, run_id: str, event: str, data: str | None) -> None:
    """Send EVENT to a run waiting on it."""
    payload = parse_input(data) if data is not None else None

    async def body(engine: EmbeddedEngine) -> None:
        await engine.signal(run_id, event, payload)
        info = await render.watch(engine, run_id, TERMINAL | {"waiting"}, quiet=True)
        out.print(f"sent {event!r} to {run_id}")
        out.print(render.run_summary(info))

    await with_engine(ctx, body)


def _decide_command(approved: bool) -> Callable[..., Any]:
    @click.argument("run_id")
    @click.argument("step")
    @click.option("--by", default=lambda: os.environ.get("USER") or "cli", help="Who decides.")
    @click.option("--comment", "--reason", "comment", help="Why (recorded).")
    @click.pass_context
    @run_async
    async def decide(ctx: click.Context, run_id: str, step: str, by: str, comment: str | None) -> None:
        async def body(engine: EmbeddedEngine) -> None:
            key = await engine.decide(run_id, step, approved=approved, by=by, comment=comment)
            info = await render.watch(engine, run_id, TERMINAL | {"waiting"}, quiet=True)
            out.print(f"{'approved' if approved else 'rejected'} {key} of {run_id} as {by}")
            out.print(render.run_summary(info))

        await with_engine(ctx, body)

    return decide


cli.command("approve", help="Approve the approval step STEP (id or key) of a run.")(_decide_command(True))
cli.command("reject", help="Reject the approval step STEP (id or key) of a run.")(_decide_command(False))


@cli.command()
@click.option("--once", is_flag=True, help="Take over runnable runs, finish what can finish, exit.")
@click.pass_context
@run_async
async def worker(ctx: click.Context, once: bool) -> None:
    """Execute runs from the store: new, woken by signals or timers, or orphaned by a crash."""

    async def body(engine: EmbeddedEngine) -> None:
        # notifications (TOWER_NOTIFY_* / TOWER_SMTP_*) are attached by with_engine
        if once:
            count = await engine.recover()
            await engine.drain()
            out.print(f"worked on {count} run(s)")
            return
        out.print(f"worker {engine.owner} on {engine.store.url}; Ctrl-C to stop")
        await engine.work()

    await with_engine(ctx, body)


@cli.command()
@click.option("--tickets", default=30, show_default=True, type=click.IntRange(1, 500))
@click.pass_context
@run_async
async def demo(ctx: click.Context, tickets: int) -> None:
    """Run the support-triage example over sample tickets and print a summary."""
    from controltower.cli.demo import run_demo

    await run_demo(ctx.obj["db"], tickets, out)


def _register_governance() -> None:
    from controltower.cli.governance import register

    register(cli)


_register_governance()


def _register_server() -> None:
    from controltower.cli.server import register

    register(cli)


_register_server()


def _register_evals() -> None:
    from controltower.cli.evals import register

    register(cli)


_register_evals()


def _register_memory() -> None:
    from controltower.cli.memory import register

    register(cli)


_register_memory()


def _register_triggers() -> None:
    from controltower.cli.triggers import register

    register(cli)


_register_triggers()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        err.print(f"[red]error\\[usage][/red] {render.escape(exc.format_message())}")
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except BaseException as exc:
        fail(exc)


if __name__ == "__main__":
    main()
