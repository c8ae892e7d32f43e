"""Browser sessions of the dashboard: the cookie, the signed-in principal, CSRF tokens.

The session itself lives in the store (``AuthService``); the cookie holds only its random
id (HttpOnly, SameSite=Lax). Every POST form carries a CSRF token derived from that id
with HMAC, so it is per session, needs no storage and cannot be computed by another site.
The login form, posted before any session exists, uses a double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from controltower.auth import Principal

SESSION_COOKIE = "tower_session"
LOGIN_CSRF_COOKIE = "tower_login_csrf"
ROLE_ORDER = ("admin", "approver", "operator", "viewer")


def csrf_token(sid: str) -> str:
    return hmac.new(sid.encode(), b"controltower-dashboard-csrf", hashlib.sha256).hexdigest()


def csrf_ok(request: Request, submitted: object) -> bool:
    sid = request.cookies.get(SESSION_COOKIE, "")
    return bool(sid) and isinstance(submitted, str) and hmac.compare_digest(csrf_token(sid), submitted)


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def login_csrf_ok(request: Request, submitted: object) -> bool:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    return bool(cookie) and isinstance(submitted, str) and hmac.compare_digest(cookie, submitted)


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(response: Response, request: Request, sid: str) -> None:
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", secure=secure(request), path="/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui")


def to_login(request: Request) -> Response:
    """Back to the login page, remembering where the user was going (HTMX requests too)."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if request.headers.get("HX-Request"):
        response = Response(status_code=204)
        response.headers["HX-Redirect"] = "/ui/login"
        return response
    return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)


def safe_next(value: str | None) -> str:
    """Only paths inside the dashboard: never an open redirect to another site."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/runs"


def approver_role(principal: Principal) -> str:
    """The one role the approval book records for a decision (the strongest the user holds)."""
    return next((role for role in ROLE_ORDER if role in principal.roles), "viewer")
