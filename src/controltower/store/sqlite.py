"""SQLite: the zero-set-up default. WAL, one writer thread, `BEGIN IMMEDIATE` transactions."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect

from controltower.store.sql import SqlStore

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SqliteStore(SqlStore):
    insert = staticmethod(sqlite_dialect.insert)

    def __init__(
        self,
        url: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 30_000,
        background_checkpoint: bool | None = None,
    ) -> None:
        sync = synchronous.upper()
        if sync not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        if background_checkpoint is None:
            background_checkpoint = os.environ.get("TOWER_SQLITE_BG_CHECKPOINT", "1") != "0"
        checkpointer = bool(background_checkpoint and path and path != ":memory:")

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={sync}")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if checkpointer:
                # the background checkpointer keeps the WAL short; this is only the backstop
                cur.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            cur.close()

        # Relaxed commits (SqlStore.run(durable=False)): NORMAL in WAL mode commits without an
        # fsync but still syncs checkpoints (no corruption on an OS crash, unlike OFF); the next
        # FULL commit's fsync of the WAL makes the earlier frames durable too. The pragma is per
        # connection and cannot change inside a transaction: the committer calls this between
        # them, and it only issues the pragma when the level must change.
        relaxed_level = "NORMAL" if sync in ("FULL", "EXTRA") else None

        def set_sync(conn: sa.Connection, relaxed: bool) -> None:
            fairy = conn.connection
            want = relaxed_level if relaxed and relaxed_level else sync
            if fairy.info.get("tower_sync", sync) != want:
                fairy.dbapi_connection.execute(f"PRAGMA synchronous={want}")  # type: ignore[union-attr]
                fairy.info["tower_sync"] = want

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # Take the write lock up front: a deferred transaction that later writes can fail
            # with SQLITE_BUSY when another process (a CLI approving a step) wrote meanwhile.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        super().__init__(url, engine, set_sync=set_sync if relaxed_level else None)
        self._checkpointer = _Checkpointer(str(path), busy_timeout_ms) if checkpointer else None

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        await super().close()


BACKSTOP_PAGES = 20_000  # ~80 MB of WAL before a commit checkpoints by itself
CHECKPOINT_PAGES = 256  # the background thread checkpoints once the WAL holds this many pages


class _Checkpointer:
    """Moves WAL frames into the database file on its own thread and connection.

    SQLite's automatic checkpoint runs inside the commit that crosses the threshold, so every
    few hundred commits one caller waits for a whole checkpoint (its fsyncs included): that is
    the p99 of a commit. A PASSIVE checkpoint from another connection takes no write lock, so
    commits go on while it copies; the writer restarts the WAL once it has been copied.
    """

    def __init__(self, path: str, busy_timeout_ms: int, interval: float = 0.02) -> None:
        self._path = path
        self._busy = busy_timeout_ms
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="tower-checkpoint", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return
        last: tuple[float, int] | None = None
        try:
            while not self._stop.wait(self._interval):
                try:
                    st = os.stat(self._path + "-wal")
                except OSError:
                    continue
                # the WAL file keeps its size when SQLite restarts it: its mtime says "written"
                if st.st_size < CHECKPOINT_PAGES * 4096 or (st.st_mtime, st.st_size) == last:
                    continue
                last = (st.st_mtime, st.st_size)
                with contextlib.suppress(sqlite3.Error):  # another connection is checkpointing
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def default_sqlite_url() -> str:
    root = Path(os.environ.get("TOWER_HOME", ".tower"))
    return f"sqlite:///{(root / 'tower.db').resolve()}"
