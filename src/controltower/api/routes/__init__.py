"""The ``/v1`` routers."""

from __future__ import annotations

from fastapi import APIRouter


def build_routers() -> list[APIRouter]:
    from controltower.api.routes import account, approvals, governance, runs, specs, stream

    return [
        account.router,
        specs.router,
        runs.router,
        stream.router,
        approvals.router,
        governance.router,
    ]
