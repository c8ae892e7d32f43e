"""`tower users`, `tower tokens` and `tower serve` as a user runs them (subprocesses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def tower(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controltower.cli.main", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_users_tokens_and_serve(tmp_path: Path) -> None:
    env = {**os.environ, "TOWER_DB_URL": f"sqlite:///{tmp_path / 'tower.db'}"}
    added = tower(
        env,
        "users",
        "add",
        "ada",
        "--tenant",
        "acme",
        "--role",
        "admin",
        "--password-stdin",
        stdin="s3cret-pass\n",
    )
    assert added.returncode == 0, added.stderr
    short = tower(env, "users", "add", "bob", "--role", "viewer", "--password-stdin", stdin="short\n")
    assert short.returncode == 1
    assert "error[invalid_input]" in short.stderr
    assert "Traceback" not in short.stderr

    issued = tower(env, "tokens", "issue", "--tenant", "acme", "--user", "ada", "--ttl", "1h")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    token_id = token.split(".", 1)[0]
    listed = tower(env, "tokens", "list", "--tenant", "acme").stdout
    assert token_id in listed
    assert token not in listed  # the secret is shown once, never listed
    bad = tower(env, "tokens", "issue", "--user", "nobody")
    assert (bad.returncode, "error[not_found]" in bad.stderr) == (1, True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "controltower.cli.main", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {token}"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "tower serve did not start"
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                time.sleep(0.2)
        assert r.status_code == 200
        assert (r.json()["tenant"], r.json()["subject"]) == ("acme", "ada")
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "Control Tower"
        revoked = tower(env, "tokens", "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        r = httpx.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert (r.status_code, r.json()["code"]) == (401, "unauthenticated")
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
    assert "tower serving on" in out
