"""The dashboard's assets ship inside the package and are served from it (one SQLite server)."""

from __future__ import annotations

import httpx

from .conftest import Tower


async def test_assets_are_served_from_the_package(tower: Tower) -> None:
    async with httpx.AsyncClient(base_url=tower.url, timeout=10) as client:
        await check_assets(client)


async def check_assets(client: httpx.AsyncClient) -> None:
    htmx = await client.get("/ui/static/htmx.min.js")
    assert htmx.status_code == 200
    assert htmx.text.startswith("/*! htmx.org")
    assert "Zero-Clause BSD" in htmx.text[:400]
    css = await client.get("/ui/static/tower.css")
    assert css.status_code == 200
    assert ":focus-visible" in css.text
    assert (await client.get("/ui/static/../router.py")).status_code == 404
    assert (await client.get("/ui/static/secret.py")).status_code == 404


def test_the_package_exports_one_router_factory() -> None:
    import controltower.dashboard

    assert controltower.dashboard.__all__ == ["build_router"]
    paths = {getattr(route, "path", "") for route in controltower.dashboard.build_router().routes}
    assert {"/ui/login", "/ui/runs", "/ui/approvals/{approval_id}", "/ui/static/{name}"} <= paths
