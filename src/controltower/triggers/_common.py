"""What every trigger needs: the services it runs on, published workflows and their tenant."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import sqlalchemy as sa

from controltower.engine import EmbeddedEngine
from controltower.spec.models import WorkflowSpec
from controltower.store import SqlStore, WorkflowRecord
from controltower.store import tables as t


class TriggerServices(Protocol):
    """The part of ``controltower.api.deps.Services`` triggers use."""

    @property
    def engine(self) -> EmbeddedEngine: ...

    @property
    def store(self) -> SqlStore: ...


@dataclass(frozen=True, slots=True)
class Published:
    """The latest published version of a workflow and the tenant that owns its name."""

    record: WorkflowRecord
    spec: WorkflowSpec
    tenant: str


async def latest_published(store: SqlStore) -> list[Published]:
    """The newest version of every published workflow (an unreadable old spec is skipped)."""

    def fn(conn: sa.Connection) -> list[tuple[WorkflowRecord, str]]:
        newest = (
            sa.select(t.workflows.c.name, sa.func.max(t.workflows.c.version).label("version"))
            .group_by(t.workflows.c.name)
            .subquery()
        )
        query = (
            sa.select(t.workflows, t.workflow_owners.c.tenant)
            .join(
                newest,
                sa.and_(t.workflows.c.name == newest.c.name, t.workflows.c.version == newest.c.version),
            )
            .outerjoin(t.workflow_owners, t.workflow_owners.c.workflow == t.workflows.c.name)
            .order_by(t.workflows.c.name)
        )
        out: list[tuple[WorkflowRecord, str]] = []
        for row in conn.execute(query):
            m = row._mapping
            record = WorkflowRecord(
                m["name"], m["version"], m["digest"], json.loads(m["spec"]), m["base_dir"], m["created_at"]
            )
            out.append((record, m["tenant"] or "default"))
        return out

    published: list[Published] = []
    for record, tenant in await store.run(fn):
        try:
            spec = WorkflowSpec.model_validate(record.spec)
        except ValueError:
            continue
        published.append(Published(record, spec, tenant))
    return published


async def workflow_tenant(store: SqlStore, name: str) -> str:
    """The tenant owning a workflow name (names without an owner row belong to "default")."""

    def fn(conn: sa.Connection) -> str | None:
        query = sa.select(t.workflow_owners.c.tenant).where(t.workflow_owners.c.workflow == name)
        value: str | None = conn.execute(query).scalar_one_or_none()
        return value

    return await store.run(fn) or "default"
