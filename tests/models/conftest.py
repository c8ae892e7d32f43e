"""Fixtures of the model tests: the same as the agent tests' (a governed engine, no real requests)."""

from tests.agents.conftest import governed, governed_sqlite, no_real_model_requests

__all__ = ["governed", "governed_sqlite", "no_real_model_requests"]
