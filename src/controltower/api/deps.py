"""What every route needs: the services of this server and the authenticated caller.

Routers (the API's own, the dashboard's, the webhooks') reach the process-wide
objects through ``Depends(services)`` and the caller through
``Depends(current_principal)`` or ``Depends(require("runs:start"))``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi import Request

from controltower.auth import AuthError, AuthService, PermissionDeniedError, Principal
from controltower.engine import EmbeddedEngine
from controltower.store.sql import SqlStore

if TYPE_CHECKING:
    from controltower.gateway.pipeline import ToolGateway

SESSION_COOKIE = "tower_session"


@dataclass
class Services:
    """The long-lived objects of one server process."""

    store: SqlStore
    engine: EmbeddedEngine
    gateway: ToolGateway | None
    auth: AuthService
    base_url: str = "http://127.0.0.1:8000"
    max_body_bytes: int = 1024 * 1024
    # how often the event stream polls the store for run changes (there is no event bus)
    stream_poll_seconds: float = 0.5


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


async def optional_principal(request: Request) -> Principal | None:
    """The caller from ``Authorization: Bearer <token>`` or the ``tower_session`` cookie; None if neither.

    A bearer header that is present but invalid is an error (never silently anonymous).
    """
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    svc = services(request)
    header = request.headers.get("authorization")
    principal: Principal | None = None
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("malformed Authorization header", hint="send 'Authorization: Bearer <token>'")
        principal = await svc.auth.verify_token(token.strip())
    else:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            principal = await svc.auth.session_principal(sid)
            if principal is not None and request.method not in _SAFE_METHODS:
                _check_same_origin(request)
    request.state.principal = principal
    return principal


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _check_same_origin(request: Request) -> None:
    """A cookie-authenticated change must come from this server's own pages (CSRF defence).

    Browsers send ``Origin`` with every cross-origin POST; a mismatch with ``Host`` is refused.
    (The session cookie is also SameSite; API clients use bearer tokens and are not affected.)
    """
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if origin == "null" or urlsplit(origin).netloc != host:
        raise PermissionDeniedError(
            "cross-origin request refused for a session-authenticated change",
            hint="call the API with a bearer token, or from the dashboard's own pages",
        )


async def current_principal(request: Request) -> Principal:
    """The authenticated caller, or a 401 problem."""
    principal = await optional_principal(request)
    if principal is None:
        raise AuthError(
            "authentication required",
            hint="send 'Authorization: Bearer <token>' (tower tokens issue) or log in at /ui/login",
        )
    return principal


def require(permission: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency: the caller, who must hold ``permission`` (by role and token scope)."""

    async def dependency(request: Request) -> Principal:
        principal = await current_principal(request)
        if not principal.can(permission):
            raise PermissionDeniedError(
                f"{principal.subject} may not do {permission!r}",
                hint="ask an admin for a role (or a token scope) that grants it",
            )
        return principal

    dependency.__name__ = f"require_{permission.replace(':', '_').replace('*', 'all')}"
    return dependency
