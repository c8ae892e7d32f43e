"""SQLite: WAL checkpoints run on a background thread, not inside a caller's commit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controltower.store.sqlite import BACKSTOP_PAGES, SqliteStore

PAYLOAD = "x" * 3000  # about one page per row


def _setup(conn: Any) -> None:
    conn.execute(sa.text("CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, body TEXT)"))


def _insert(conn: Any) -> None:
    conn.execute(sa.text("INSERT INTO blobs (body) VALUES (:b)"), {"b": PAYLOAD})


async def _fill(store: SqliteStore, commits: int) -> None:
    await store.run(_setup)
    for _ in range(commits):
        await store.run(_insert)


async def test_the_background_checkpointer_keeps_the_wal_short(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SqliteStore(f"sqlite:///{path}")
    try:
        autocheckpoint = await store.run(lambda c: c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar())
        assert autocheckpoint == BACKSTOP_PAGES  # commits no longer checkpoint every 1,000 pages
        await _fill(store, 3000)  # ~3,000 pages: 3x the default threshold, 12x ours
        # the rows reach the database file itself only by a checkpoint; no commit crossed the
        # backstop, so only the background thread can have copied them
        deadline = time.monotonic() + 10
        while path.stat().st_size < 2500 * 4096 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert path.stat().st_size >= 2500 * 4096
    finally:
        await store.close()
    assert store._checkpointer is not None
    assert not store._checkpointer._thread.is_alive()


async def test_without_it_sqlite_checkpoints_in_the_commit(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 't.db'}", background_checkpoint=False)
    try:
        autocheckpoint = await store.run(lambda c: c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar())
        assert autocheckpoint == 1000  # SQLite's default
        assert store._checkpointer is None
        await _fill(store, 300)
        await asyncio.sleep(0.2)
        assert (tmp_path / "t.db").stat().st_size < 100 * 4096  # still all in the WAL
    finally:
        await store.close()
