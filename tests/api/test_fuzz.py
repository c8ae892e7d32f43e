"""Schemathesis fuzzes every operation of /openapi.json on a real server: no response is a 5xx.

Bounded: 15 examples (TOWER_FUZZ_EXAMPLES, at most 30) per operation and generation mode
(valid and invalid input), as an admin of a seeded tenant with a published workflow and a
waiting run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from .conftest import SPEC, make_services, seed  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
EXAMPLES = int(os.environ.get("TOWER_FUZZ_EXAMPLES", "15"))  # the brief allows up to 30


class ServerThread:
    """A uvicorn server with its own services and event loop, in a daemon thread."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.ready = threading.Event()
        self.base = ""
        self.token = ""
        self.error: BaseException | None = None
        self._server: Any = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self.ready.wait(60), "the server did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        import uvicorn

        from controltower.api import create_app

        svc = await make_services(f"sqlite:///{self.db}")
        tokens = await seed(svc)
        self.token = tokens[("acme", "admin")]
        admin = await svc.auth.user_principal("acme", "admin-acme")
        assert admin.tenant == "acme"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(
            uvicorn.Config(create_app(svc), log_level="critical", lifespan="off", timeout_graceful_shutdown=5)
        )
        task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        import httpx

        async with httpx.AsyncClient(
            base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}
        ) as c:
            r = await c.post("/v1/workflows", json={"spec": SPEC})
            assert r.status_code == 201, r.text
            r = await c.post("/v1/runs", json={"workflow": "payout", "input": {"amount": 1}})
            assert r.status_code == 201, r.text
        self.ready.set()
        await task
        await svc.engine.close()
        sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(tmp_path_factory.mktemp("fuzz") / "tower.db") as running:
        yield running


def test_no_operation_answers_5xx(server: ServerThread) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    headers = {"Authorization": f"Bearer {server.token}"}
    failures: list[str] = []
    operations = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # endless streams; covered by the SSE tests
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call(base_url=server.base, headers=headers, timeout=10)
                if response.status_code >= 500:
                    where = f"{case.method} {case.formatted_path}"
                    failures.append(f"{where} -> {response.status_code}: {response.text[:200]}")
                else:
                    assert response.status_code < 500

            try:
                run()
            except Exception as exc:  # a generation problem must not hide the other operations
                if "Unsatisfiable" not in type(exc).__name__:
                    failures.append(
                        f"{operation.method.upper()} {operation.path}: {type(exc).__name__}: {exc}"[:300]
                    )
    assert operations >= 25
    assert failures == [], "\n".join(failures)
    assert time.monotonic() - started < 600
