"""Fixtures of the agent tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic_ai.models import override_allow_model_requests
from tests.agents.helpers import governed_engine

from controltower.engine import EmbeddedEngine
from controltower.gateway.pipeline import ToolGateway


@pytest.fixture
async def governed(store_url: str) -> AsyncIterator[tuple[EmbeddedEngine, ToolGateway]]:
    async with governed_engine(store_url) as pair:
        yield pair


@pytest.fixture
async def governed_sqlite(sqlite_url: str) -> AsyncIterator[tuple[EmbeddedEngine, ToolGateway]]:
    """SQLite only: for tests whose subject is not the store."""
    async with governed_engine(sqlite_url) as pair:
        yield pair


@pytest.fixture(autouse=True)
def no_real_model_requests() -> Iterator[None]:
    """pydantic-ai's guard: a real provider model refuses to send (the loopback test opts in)."""
    with override_allow_model_requests(False):
        yield
