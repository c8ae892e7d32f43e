"""Rendering: the Jinja2 environment (autoescaped), its filters and the page responses."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from controltower.api.deps import Services
from controltower.api.deps import services as app_services
from controltower.auth import Principal
from controltower.dashboard import charts
from controltower.dashboard import session as sess
from controltower.dashboard.charts import DASH


def services(request: Request) -> Services:
    return app_services(request)


def ts(value: float | None) -> str:
    if value is None:
        return DASH
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(value: float | None) -> str:
    if value is None:
        return DASH
    return duration(max(0.0, time.time() - value)) + " ago"


def duration(value: float | None) -> str:
    if value is None:
        return DASH
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def dom_id(value: str) -> str:
    """A stable, valid HTML id for any text (step keys hold '/', '[' and '#')."""
    return "k" + hashlib.sha1(value.encode(), usedforsecurity=False).hexdigest()[:12]


def money(micros: int | float | None) -> str:
    if not micros:
        return "0"
    return f"{micros / 1_000_000:,.6f}".rstrip("0").rstrip(".")


class Pages:
    def __init__(self) -> None:
        self.env = Environment(
            loader=PackageLoader("controltower.dashboard", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            ts=ts, ago=ago, duration=duration, pretty=pretty, money=money, fmt=charts.fmt, dom_id=dom_id
        )
        self.env.filters["zip"] = lambda left, right: list(zip(left, right, strict=False))
        self.env.globals.update(bar_chart=charts.bar_chart, now=time.time)

    def _html(self, name: str, http_status: int, **context: Any) -> HTMLResponse:
        body = self.env.get_template(name).render(**context)
        response = HTMLResponse(body, status_code=http_status)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "frame-ancestors 'none'; form-action 'self'"
        )
        return response

    def render(
        self, request: Request, who: Principal, name: str, *, http_status: int = 200, **context: Any
    ) -> HTMLResponse:
        sid = request.cookies.get(sess.SESSION_COOKIE, "")
        can_decide = who.can("approvals:decide")
        return self._html(
            name, http_status, request=request, who=who, csrf=sess.csrf_token(sid), can_decide=can_decide,
            path=request.url.path, **context,
        )  # fmt: skip

    def error(self, request: Request, who: Principal, status: int, message: str) -> HTMLResponse:
        titles = {400: "Bad request", 403: "Not allowed", 404: "Not found", 409: "Conflict"}
        title = titles.get(status, "Unavailable")
        return self.render(request, who, "error.html", http_status=status, title=title, message=message)

    def login(
        self,
        request: Request,
        *,
        next: str = "/ui/runs",
        error: str | None = None,
        tenant: str = "default",
        username: str = "",
        http_status: int = 200,
    ) -> HTMLResponse:
        token = sess.new_login_csrf()
        response = self._html(
            "login.html", http_status, csrf=token, next=next, error=error, tenant=tenant, username=username
        )
        response.set_cookie(
            sess.LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=sess.secure(request),
            path="/ui", max_age=3600,
        )  # fmt: skip
        return response
