"""Sandbox systems for workflow templates: one seeded SQLite file per system under TOWER_HOME.

A template's offline tools need a stand-in for the system they call in production (a CRM, an
ERP, a helpdesk). ``SandboxDB`` is that stand-in: ``$TOWER_HOME/sandbox/<system>.sqlite``
(TOWER_HOME defaults to ``.tower``), created from a schema script and seeded exactly once, even
when several threads or processes open it for the first time together. The eval runner points
TOWER_HOME at a fresh folder per suite, so every suite starts from the seed.

Build one per system in your template's ``<name>_agents.py``::

    SCHEMA = "CREATE TABLE IF NOT EXISTS contacts (email TEXT PRIMARY KEY, name TEXT);"

    def seed(conn: sqlite3.Connection) -> None:
        insert_rows(conn, "contacts", load_json(DATA / "contacts.json"))

    SANDBOX = SandboxDB("crm", SCHEMA, seed)

    def crm_lookup(payload: dict[str, Any]) -> dict[str, Any]:
        with SANDBOX.session() as conn:
            row = conn.execute("SELECT * FROM contacts WHERE email = ?", (payload["email"],)).fetchone()
        return dict(row) if row else {}
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controltower.spec.errors import InvalidInputError, InvalidStateError

__all__ = ["SandboxDB", "insert_rows", "load_json"]

_MARKER = "sandbox_meta"  # (key, value); key 'seeded' holds when the seed was committed
_SYSTEM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SandboxDB:
    """A template's sandbox system: ``$TOWER_HOME/sandbox/<system>.sqlite``, seeded once.

    ``schema`` is a script of ``CREATE ... IF NOT EXISTS`` statements, run on first use in each
    process. ``seed`` fills the tables inside one ``BEGIN IMMEDIATE`` transaction that also
    records the seed, so concurrent first users never seed twice and a failed seed leaves
    nothing behind (the next connection tries again); it must not commit itself.

    ``autocommit=True`` opens connections with ``isolation_level=None`` for tools that run their
    own ``BEGIN IMMEDIATE`` (an atomic check-then-write); otherwise Python's implicit
    transactions apply and ``session()`` commits on success.
    """

    def __init__(
        self,
        system: str,
        schema: str,
        seed: Callable[[sqlite3.Connection], None] | None = None,
        *,
        autocommit: bool = False,
        timeout: float = 30.0,
    ) -> None:
        if not _SYSTEM_NAME.fullmatch(system):
            raise InvalidInputError(
                f"sandbox system name {system!r} is not a plain file name",
                hint="use letters, digits, '_', '-' or '.', e.g. 'crm'",
            )
        if not sqlite3.complete_statement(schema):
            raise InvalidInputError(
                f"the schema of sandbox {system!r} is not complete SQL",
                hint="end every statement with ';'",
            )
        self.system = system
        self.schema = schema
        self.seed = seed
        self.autocommit = autocommit
        self.timeout = timeout
        self._lock = threading.Lock()
        self._ready: set[Path] = set()  # files whose schema and seed are in place

    @property
    def path(self) -> Path:
        """Where the file is now: TOWER_HOME is read on every call, as tests and evals change it."""
        home = Path(os.environ.get("TOWER_HOME", ".tower"))
        return (home / "sandbox" / f"{self.system}.sqlite").resolve()

    def connect(self) -> sqlite3.Connection:
        """A new connection (rows are ``sqlite3.Row``), creating and seeding the file on first use.

        The caller closes it; ``session()`` does that for you.
        """
        path = self.path
        self._prepare(path)
        return self._open(path, autocommit=self.autocommit)

    @contextlib.contextmanager
    def session(self) -> Iterator[sqlite3.Connection]:
        """``connect()`` for one block, closed after it; without autocommit the block is one
        transaction, committed when it ends and rolled back when it raises."""
        conn = self.connect()
        try:
            if self.autocommit:
                yield conn
            else:
                with conn:
                    yield conn
        finally:
            conn.close()

    def _open(self, path: Path, *, autocommit: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=self.timeout, isolation_level=None if autocommit else "DEFERRED")
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _prepare(self, path: Path) -> None:
        if path in self._ready and path.exists():
            return
        with self._lock:
            if path in self._ready and path.exists():
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._open(path, autocommit=True)
            try:
                self._wal(conn)
                conn.executescript(self.schema)
                conn.execute(f"CREATE TABLE IF NOT EXISTS {_MARKER} (key TEXT PRIMARY KEY, value TEXT)")
                conn.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
                try:
                    self._seed_once(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                conn.close()
            self._ready.add(path)

    def _wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL. Changing the journal mode needs the database to itself and SQLite does
        not always wait for that (no busy handler): when another process is opening or seeding
        the same file, retry until ``timeout``."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _seed_once(self, conn: sqlite3.Connection) -> None:
        if conn.execute(f"SELECT 1 FROM {_MARKER} WHERE key = 'seeded'").fetchone() is not None:
            return
        if self.seed is not None:
            self.seed(conn)
        if not conn.in_transaction:
            raise InvalidStateError(
                f"the seed of sandbox {self.system!r} ended the seeding transaction",
                hint="do not commit, roll back or use 'with conn:' in a seed function; SandboxDB commits",
            )
        conn.execute(f"INSERT INTO {_MARKER} VALUES ('seeded', ?)", (datetime.now(UTC).isoformat(),))


def load_json(path: str | os.PathLike[str]) -> Any:
    """A JSON data file (UTF-8), typically a list of rows for ``insert_rows``."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def insert_rows(conn: sqlite3.Connection, table: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert mappings into ``table`` by column name and return how many rows were new.

    Keys that are not columns are ignored (data files may carry more than the table keeps); a
    column a row lacks gets the schema's default (NULL unless it names one). A row whose key
    already exists is skipped, so one call serves seeding and idempotent tool writes (a retry
    inserts nothing).
    """
    quoted = _quote(table)
    columns = [str(info[1]) for info in conn.execute(f"PRAGMA table_info({quoted})")]
    if not columns:
        raise InvalidInputError(f"the sandbox has no table {table!r}", hint="add it to the schema")
    inserted = 0
    # consecutive rows with the same columns go in one executemany, keeping the data file's order
    for shared, group in itertools.groupby(rows, key=lambda row: tuple(c for c in columns if c in row)):
        if not shared:
            raise InvalidInputError(
                f"a row for table {table!r} has none of its columns", hint=f"columns: {', '.join(columns)}"
            )
        names = ", ".join(_quote(c) for c in shared)
        marks = ", ".join("?" for _ in shared)
        cur = conn.executemany(
            f"INSERT OR IGNORE INTO {quoted} ({names}) VALUES ({marks})",
            [tuple(row[c] for c in shared) for row in group],
        )
        inserted += cur.rowcount
    return inserted


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
