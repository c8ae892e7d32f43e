"""Which tenant owns a workflow name.

Workflow versions (table ``workflows``) are keyed by name only; runs, tools, approvals,
budgets and audit records carry their tenant. A name is owned by one tenant (table
``workflow_owners``); a name without an owner row belongs to tenant ``default`` (it was
published with the CLI). Another tenant's workflow looks exactly like a missing one.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from controltower.auth import DEFAULT_TENANT
from controltower.spec.errors import ConflictError, NotFoundError
from controltower.store import tables as t
from controltower.store.sql import SqlStore


def owner_tenant(conn: Connection, name: str) -> str | None:
    """The tenant owning ``name``; None if no version of it exists."""
    tenant = conn.execute(
        sa.select(t.workflow_owners.c.tenant).where(t.workflow_owners.c.workflow == name)
    ).scalar_one_or_none()
    if tenant is not None:
        return str(tenant)
    exists = conn.execute(sa.select(t.workflows.c.name).where(t.workflows.c.name == name).limit(1)).first()
    return DEFAULT_TENANT if exists else None


async def check_visible(store: SqlStore, tenant: str, name: str) -> None:
    """Raise NotFoundError unless ``tenant`` owns a published workflow called ``name``."""
    owner = await store.run(lambda conn: owner_tenant(conn, name))
    if owner != tenant:
        raise NotFoundError(f"no published workflow named {name!r}", hint="list them with GET /v1/workflows")


async def claim(store: SqlStore, tenant: str, name: str, subject: str) -> None:
    """Make ``tenant`` the owner of ``name`` before its first version is published there."""

    def fn(conn: Connection) -> str | None:
        owner = owner_tenant(conn, name)
        if owner is None:
            conn.execute(
                t.workflow_owners.insert().values(
                    workflow=name, tenant=tenant, owner=subject, created_at=time.time()
                )
            )
            return tenant
        return owner

    try:
        owner = await store.run(fn)
    except sa.exc.IntegrityError:  # another request claimed it first
        owner = await store.run(lambda conn: owner_tenant(conn, name))
    if owner != tenant:
        raise ConflictError(
            f"the workflow name {name!r} is not available", hint="choose another name for the workflow"
        )


async def visible_names(store: SqlStore, tenant: str, *, after: str | None, limit: int) -> list[str]:
    def fn(conn: Connection) -> list[str]:
        owned = sa.select(t.workflow_owners.c.workflow)
        query = sa.select(t.workflows.c.name).distinct()
        if tenant == DEFAULT_TENANT:
            query = query.where(
                sa.or_(
                    t.workflows.c.name.not_in(owned),
                    t.workflows.c.name.in_(owned.where(t.workflow_owners.c.tenant == tenant)),
                )
            )
        else:
            query = query.where(t.workflows.c.name.in_(owned.where(t.workflow_owners.c.tenant == tenant)))
        if after is not None:
            query = query.where(t.workflows.c.name > after)
        return [str(n) for n in conn.execute(query.order_by(t.workflows.c.name).limit(limit)).scalars()]

    return await store.run(fn)
