"""`create_app`: the HTTP API (``/v1``), the dashboard (``/ui``) and the webhook triggers."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from fastapi import APIRouter, FastAPI

from controltower import __version__
from controltower.api import problems
from controltower.api.deps import Services
from controltower.api.limits import BodyLimitMiddleware, JsonTextGuard

log = logging.getLogger("controltower.api")

DESCRIPTION = """The HTTP API of Control Tower.

Authenticate with `Authorization: Bearer <token>` (issue one with `tower tokens issue`) or
the dashboard's session cookie. Every error is an RFC 9457 problem document
(`application/problem+json`) with a stable `code`. Lists are paginated with `limit` and
an opaque `cursor` (the `next_cursor` of the previous page). Everything is scoped to the
caller's tenant: other tenants' objects answer 404.
"""


def _plugin_router(module: str) -> APIRouter | None:
    """A router from a sibling stream's module, if that module is installed."""
    try:
        mod: Any = importlib.import_module(module)
    except ImportError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            log.info("%s is not available; its routes are not served", module)
            return None
        raise
    router: APIRouter = mod.build_router()
    return router


def create_app(services: Services) -> FastAPI:
    from controltower.api.routes import build_routers

    app = FastAPI(
        title="Control Tower",
        version=__version__,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.services = services
    problems.install(app)
    app.add_middleware(JsonTextGuard)  # inside the size limit: it reads bodies already bounded
    app.add_middleware(BodyLimitMiddleware, max_bytes=services.max_body_bytes)
    for router in build_routers():
        app.include_router(router)
    for module in ("controltower.dashboard", "controltower.triggers.webhooks"):
        plugin = _plugin_router(module)
        if plugin is not None:
            app.include_router(plugin)
    return app
