"""`tower serve`, `tower users ...` and `tower tokens ...`: the HTTP server and who may use it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import click

from controltower.auth import ROLES, AuthService
from controltower.spec.errors import ExtraMissingError, InvalidInputError

log = logging.getLogger("controltower.server")


def _seconds(text: str) -> float:
    from controltower.spec.models import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def _trigger_runner(services: Any) -> Any:
    """TRIG's cron/queue runner when that module is installed, else None."""
    try:
        module: Any = importlib.import_module("controltower.triggers")
    except ImportError as exc:
        if exc.name in ("controltower.triggers",):
            return None
        raise
    runner_cls = getattr(module, "TriggerRunner", None)
    return None if runner_cls is None else runner_cls(services)


def _graceful_server_class() -> Any:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, minus re-raising the stop signal after shutdown.

        uvicorn re-raises SIGINT/SIGTERM once it has stopped serving, which would kill the
        process before the engine releases its runs; here a signal means "stop cleanly", exit 0.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


async def serve_forever(
    ctx: click.Context, host: str, port: int, db: str | None, max_body: int, base_url: str | None
) -> None:
    import uvicorn

    from controltower.api import Services, create_app
    from controltower.cli.main import gather_policies
    from controltower.engine import EmbeddedEngine

    graceful_server = _graceful_server_class()
    engine = await EmbeddedEngine.open(db or ctx.obj["db"])
    gateway = None
    runner: Any = None
    try:
        texts = await gather_policies(ctx, engine, None)
        if texts is not None:
            from controltower.gateway.engine_gate import GovernedToolGate
            from controltower.gateway.pipeline import open_gateway

            gateway = await open_gateway(engine.store, policy_texts=texts, env=ctx.obj["env"])
            engine.tool_gate = GovernedToolGate(gateway)
        services = Services(
            store=engine.store,
            engine=engine,
            gateway=gateway,
            auth=AuthService(engine.store),
            base_url=base_url or f"http://{host}:{port}",
            max_body_bytes=max_body,
        )
        app = create_app(services)
        server = graceful_server(uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="off"))
        stop = asyncio.Event()
        runner = _trigger_runner(services)
        if runner is not None:
            await runner.start()
        recovered = await engine.recover()
        worker = asyncio.create_task(engine.work(stop), name="engine-worker")
        click.echo(
            f"tower serving on {services.base_url} (db {engine.store.url}, "
            f"{'governed' if gateway else 'ungoverned: no policies found'}, {recovered} run(s) recovered)",
            err=True,
        )
        try:
            await server.serve()
        finally:
            stop.set()
            await worker
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.stop()
        await engine.close()


def _require_server_extra() -> None:
    """The server's packages are an extra (the core install stays light): say which one."""
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import multipart  # type: ignore[import-untyped]  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ExtraMissingError(
            f"tower serve needs the server extra ({exc.name or exc} is not installed)",
            hint="pip install 'controltower[server]'",
        ) from None


def register(cli: click.Group) -> None:
    from controltower.cli import main as m

    run_async, out = m.run_async, m.out

    @cli.command()
    @click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
    @click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
    @click.option("--db", "serve_db", help="Database URL (default: the global --db / TOWER_DB_URL).")
    @click.option(
        "--max-body",
        default=1024 * 1024,
        show_default=True,
        type=click.IntRange(1024, 1024**3),
        help="Largest request body in bytes (larger ones get 413).",
    )
    @click.option(
        "--base-url", envvar="TOWER_BASE_URL", help="Public URL of this server (for links in notifications)."
    )
    @click.pass_context
    @run_async
    async def serve(
        ctx: click.Context, host: str, port: int, serve_db: str | None, max_body: int, base_url: str | None
    ) -> None:
        """Serve the HTTP API and dashboard, and run the engine's workers in this process."""
        _require_server_extra()
        await serve_forever(ctx, host, port, serve_db, max_body, base_url)

    async def with_auth(ctx: click.Context, body: Any) -> Any:
        from controltower.store import open_store

        store = await open_store(ctx.obj["db"])
        try:
            return await body(AuthService(store))
        finally:
            await store.close()

    @cli.group()
    def users() -> None:
        """Users of the dashboard and API (per tenant)."""

    @users.command("add")
    @click.argument("username")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES))
    @click.option("--group", "groups", multiple=True, help="Approval group (repeatable).")
    @click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
    @click.pass_context
    @run_async
    async def users_add(
        ctx: click.Context,
        username: str,
        tenant: str,
        roles: tuple[str, ...],
        groups: tuple[str, ...],
        password_stdin: bool,
    ) -> None:
        """Add a user; the password is prompted for (or read with --password-stdin)."""
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = click.prompt("password", hide_input=True, confirmation_prompt=True)

        async def body(auth: AuthService) -> None:
            await auth.create_user(tenant, username, password, roles, groups)
            out.print(f"added {username} to tenant {tenant} as {', '.join(sorted(roles))}")

        await with_auth(ctx, body)

    @users.command("list")
    @click.option("--tenant", default="default", show_default=True)
    @click.pass_context
    @run_async
    async def users_list(ctx: click.Context, tenant: str) -> None:
        """Users of a tenant."""

        async def body(auth: AuthService) -> None:
            found = await auth.list_users(tenant)
            for u in found:
                state = " (disabled)" if u.disabled else ""
                groups = f" groups {', '.join(u.groups)}" if u.groups else ""
                out.print(f"{u.username}  {', '.join(u.roles)}{groups}{state}")
            if not found:
                out.print(f"no users in tenant {tenant}")

        await with_auth(ctx, body)

    @cli.group()
    def tokens() -> None:
        """API tokens: stored hashed, scoped, expiring, revocable."""

    @tokens.command("issue")
    @click.option("--tenant", default="default", show_default=True)
    @click.option("--user", "username", required=True, help="The token acts as this user.")
    @click.option("--scope", "scopes", multiple=True, default=("*",), show_default=True)
    @click.option("--ttl", default="30d", show_default=True, help="Lifetime, e.g. 1h, 30d.")
    @click.option("--description", help="What the token is for.")
    @click.pass_context
    @run_async
    async def tokens_issue(
        ctx: click.Context,
        tenant: str,
        username: str,
        scopes: tuple[str, ...],
        ttl: str,
        description: str | None,
    ) -> None:
        """Issue a token; it is printed once and cannot be shown again."""
        seconds = _seconds(ttl)

        async def body(auth: AuthService) -> None:
            principal = await auth.user_principal(tenant, username)
            token, info = await auth.issue_token_info(principal, scopes, seconds, description=description)
            click.echo(token)
            expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info.expires_at))
            click.echo(f"token {info.id} for {username}@{tenant}, expires {expires}", err=True)

        await with_auth(ctx, body)

    @tokens.command("list")
    @click.option("--tenant", default="default", show_default=True)
    @click.pass_context
    @run_async
    async def tokens_list(ctx: click.Context, tenant: str) -> None:
        """Tokens of a tenant (never the secrets)."""

        async def body(auth: AuthService) -> None:
            found = await auth.list_tokens(tenant)
            for x in found:
                state = "active" if x.active else ("revoked" if x.revoked_at else "expired")
                expires = time.strftime("%Y-%m-%d", time.gmtime(x.expires_at))
                out.print(f"{x.id}  {x.subject}  {state}  expires {expires}  scopes {', '.join(x.scopes)}")
            if not found:
                out.print(f"no tokens in tenant {tenant}")

        await with_auth(ctx, body)

    @tokens.command("revoke")
    @click.argument("token_id")
    @click.pass_context
    @run_async
    async def tokens_revoke(ctx: click.Context, token_id: str) -> None:
        """Revoke a token by id (the part before the dot)."""
        token_id = token_id.split(".", 1)[0]

        async def body(auth: AuthService) -> None:
            await auth.revoke_token(token_id)
            out.print(f"revoked {token_id}")

        await with_auth(ctx, body)
