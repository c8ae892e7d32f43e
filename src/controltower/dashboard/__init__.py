"""The web dashboard: server-rendered pages under ``/ui`` (Jinja2 + HTMX, assets in the package)."""

from __future__ import annotations

from controltower.dashboard.router import build_router

__all__ = ["build_router"]
