"""The names users import are pinned: removing one is a deliberate, visible change."""

from __future__ import annotations

import controltower.engine
import controltower.store


def test_engine_exports() -> None:
    assert set(controltower.engine.__all__) == {"EmbeddedEngine", "Engine", "StepContext", "spec_digest"}


def test_store_exports() -> None:
    assert {"Store", "SqlStore", "open_store", "RunRecord", "StepRecord", "TERMINAL"} <= set(
        controltower.store.__all__
    )
