"""Subprocess and store helpers shared by the durability tests."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from controltower.store.postgres import normalise_url

WORKER = Path(__file__).with_name("worker.py")
_OUR_VARS = ("DURA_LOG", "DURA_PG", "DURA_KILL_AT", "TOWER_FAULT_KILL_IN_COMMIT", "TOWER_DB_URL")


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OUR_VARS}
    env.update(extra)
    return env


class LineProc:
    """A Python script as a subprocess whose stdout lines can be awaited with a timeout.

    Shared by the durability workers and the gateway's crash, budget and rate-limit workers.
    """

    def __init__(
        self, script: Path | str, args: list[str], env: dict[str, str], stderr: Path, *, stdin: bool = False
    ) -> None:
        self.stderr_path = stderr
        self._stderr = stderr.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            cwd=stderr.parent,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix``; fails on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line within {timeout}s; {self.describe()}") from None
            if line is None:
                self.proc.wait(timeout=10)
                raise AssertionError(f"worker exited before printing {prefix!r}; {self.describe()}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout}s; {self.describe()}") from None

    def rest(self, timeout: float = 10) -> list[str]:
        """Every remaining stdout line (after the process exits)."""
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if line is None:
                return out
            self.seen.append(line)
            out.append(line)

    def describe(self) -> str:
        err = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path.exists() else ""
        return f"returncode={self.proc.poll()} stdout={self.seen[-5:]} stderr:\n{err}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._reader.join(timeout=5)
        self._stderr.close()


class Worker(LineProc):
    """A worker.py subprocess."""

    def __init__(self, args: list[str], env: dict[str, str], stderr: Path, *, stdin: bool = False) -> None:
        super().__init__(WORKER, args, env, stderr, stdin=stdin)


class PromptProc(LineProc):
    """A worker driven line by line: ``expect`` returns the rest of the line after the prefix
    and ``send`` sends one line."""

    def __init__(self, script: Path | str, args: list[str], env: dict[str, str], stderr: Path) -> None:
        super().__init__(script, args, env, stderr, stdin=True)

    def expect(self, prefix: str, timeout: float = 30.0) -> str:
        return super().expect(prefix, timeout)[len(prefix) :].strip()

    def send(self, text: str = "go") -> None:
        super().send(text + "\n")

    def wait(self, timeout: float = 30.0) -> int:
        return super().wait(timeout)


def sync_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return sa.create_engine(url, poolclass=sa.pool.NullPool)
    return sa.create_engine(normalise_url(url), poolclass=sa.pool.NullPool)


def query(url: str, sql: str, **params: Any) -> list[sa.Row[Any]]:
    engine = sync_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def read_log(path: Path) -> Counter[tuple[str, str]]:
    """Executions per (run_id, step_key) in the tool's log."""
    counts: Counter[tuple[str, str]] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            run_id, step_key, _pid = line.split(" ")
            counts[(run_id, step_key)] += 1
    return counts
