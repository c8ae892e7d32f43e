"""Run workflows durably. `EmbeddedEngine` runs in-process on asyncio over a Store."""

from controltower.engine.context import StepContext
from controltower.engine.embedded import EmbeddedEngine, spec_digest
from controltower.engine.protocol import Engine

__all__ = ["EmbeddedEngine", "Engine", "StepContext", "spec_digest"]
