"""SandboxDB: the file lives under TOWER_HOME, is seeded exactly once (threads and processes),
keeps its data across reopening, and insert_rows maps rows to columns by name."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from controltower.sandbox import SandboxDB, insert_rows, load_json
from controltower.spec.errors import InvalidInputError, InvalidStateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS seeds (id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT);
CREATE TABLE IF NOT EXISTS notes (key TEXT PRIMARY KEY, body TEXT NOT NULL DEFAULT 'empty', tag TEXT);
"""


def _seed(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO seeds (who) VALUES ('seed')")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TOWER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _count(path: Path, table: str = "seeds") -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    conn.close()
    return count


def test_path_is_under_tower_home_read_at_each_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    db = SandboxDB("crm", SCHEMA, _seed)
    assert db.path == (home / "sandbox" / "crm.sqlite").resolve()
    with db.session() as conn:
        assert conn.execute("SELECT who FROM seeds").fetchone()["who"] == "seed"
    assert db.path.is_file()
    monkeypatch.delenv("TOWER_HOME")
    monkeypatch.chdir(tmp_path)
    assert db.path == (tmp_path / ".tower" / "sandbox" / "crm.sqlite").resolve()


def test_seeds_once_when_threads_open_it_together(home: Path) -> None:
    calls: list[int] = []

    def slow_seed(conn: sqlite3.Connection) -> None:
        calls.append(1)
        time.sleep(0.05)
        _seed(conn)

    db = SandboxDB("erp", SCHEMA, slow_seed)
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            with db.session() as conn:
                conn.execute("SELECT count(*) FROM seeds").fetchone()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1
    assert _count(db.path) == 1


@pytest.mark.slow
def test_seeds_once_when_processes_open_it_together(home: Path) -> None:
    """Each process has its own in-memory cache, so only BEGIN IMMEDIATE keeps them from both seeding."""
    script = textwrap.dedent(
        f"""
        import os, sqlite3, sys, time
        from controltower.sandbox import SandboxDB

        def seed(conn):
            conn.execute("INSERT INTO seeds (who) VALUES (?)", (str(os.getpid()),))
            time.sleep(0.3)

        db = SandboxDB("shared", {SCHEMA!r}, seed)
        time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
        with db.session() as conn:
            print(conn.execute("SELECT count(*) FROM seeds").fetchone()[0])
        """
    )
    go = str(time.time() + 1.5)
    env_home = str(home)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOWER_HOME": env_home},
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["1", "1", "1"]
    assert _count(home / "sandbox" / "shared.sqlite") == 1


def test_reopening_keeps_data_and_does_not_reseed(home: Path) -> None:
    first = SandboxDB("cms", SCHEMA, _seed)
    with first.session() as conn:
        conn.execute("INSERT INTO notes (key, body) VALUES ('a', 'kept')")
    again = SandboxDB("cms", SCHEMA, _seed)  # a new process would start with an empty cache like this
    with again.session() as conn:
        assert conn.execute("SELECT body FROM notes WHERE key = 'a'").fetchone()["body"] == "kept"
    assert _count(again.path) == 1


def test_a_deleted_file_is_recreated_and_reseeded(home: Path) -> None:
    db = SandboxDB("itsm", SCHEMA, _seed)
    db.connect().close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db.path}{suffix}").unlink(missing_ok=True)
    with db.session() as conn:
        assert conn.execute("SELECT count(*) FROM seeds").fetchone()[0] == 1


def test_a_failed_seed_leaves_nothing_and_is_retried(home: Path) -> None:
    attempts: list[int] = []

    def flaky(conn: sqlite3.Connection) -> None:
        attempts.append(1)
        _seed(conn)
        if len(attempts) == 1:
            raise RuntimeError("data file unreadable")

    db = SandboxDB("claims", SCHEMA, flaky)
    with pytest.raises(RuntimeError, match="unreadable"):
        db.connect()
    assert _count(db.path) == 0
    with db.session() as conn:
        assert conn.execute("SELECT count(*) FROM seeds").fetchone()[0] == 1
    assert len(attempts) == 2


def test_a_seed_that_commits_is_refused(home: Path) -> None:
    def committing(conn: sqlite3.Connection) -> None:
        with conn:
            _seed(conn)

    with pytest.raises(InvalidStateError, match="ended the seeding transaction"):
        SandboxDB("clm", SCHEMA, committing).connect()


def test_session_commits_or_rolls_back_the_block(home: Path) -> None:
    db = SandboxDB("cms", SCHEMA, _seed)
    with db.session() as conn:
        conn.execute("INSERT INTO notes (key) VALUES ('ok')")

    def failing_block() -> None:
        with db.session() as conn:
            conn.execute("INSERT INTO notes (key) VALUES ('lost')")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        failing_block()
    with db.session() as conn:
        assert [r["key"] for r in conn.execute("SELECT key FROM notes")] == ["ok"]


def test_autocommit_connections_run_their_own_transactions(home: Path) -> None:
    db = SandboxDB("crm", SCHEMA, _seed, autocommit=True)
    with db.session() as conn:
        assert conn.isolation_level is None
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO notes (key) VALUES ('x')")
        conn.execute("COMMIT")
    assert _count(db.path, "notes") == 1


def test_insert_rows_maps_columns_by_name(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "notes.json"
    data.write_text('[{"key": "a", "body": "one", "extra": 1}, {"key": "b", "tag": "t"}]', encoding="utf-8")
    with SandboxDB("cms", SCHEMA, _seed).session() as conn:
        assert insert_rows(conn, "notes", load_json(data)) == 2
        assert insert_rows(conn, "notes", [{"key": "a", "body": "changed"}]) == 0  # existing key: skipped
        rows = [tuple(r) for r in conn.execute("SELECT key, body, tag FROM notes ORDER BY key")]
        assert rows == [("a", "one", None), ("b", "empty", "t")]  # a missing column takes its default
        assert insert_rows(conn, "notes", []) == 0
        with pytest.raises(InvalidInputError, match="no table 'nope'"):
            insert_rows(conn, "nope", [{"key": "c"}])
        with pytest.raises(InvalidInputError, match="none of its columns"):
            insert_rows(conn, "notes", [{"unknown": 1}])


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden"])
def test_bad_system_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="plain file name"):
        SandboxDB(name, SCHEMA)


def test_incomplete_schema_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="not complete SQL"):
        SandboxDB("crm", "CREATE TABLE t (a TEXT)")
