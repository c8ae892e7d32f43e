"""The memory names users import are pinned: removing one is a deliberate, visible change."""

from __future__ import annotations

import controltower.memory


def test_memory_exports() -> None:
    assert set(controltower.memory.__all__) == {
        "Embedder",
        "EmbedderUnavailable",
        "Example",
        "HashedEmbedder",
        "Memory",
        "MemoryEntry",
        "MemoryHit",
        "MemoryUnavailable",
        "MemoryView",
        "NearestExamples",
        "Prediction",
        "SentenceTransformerEmbedder",
        "bind_memory",
        "current_memory",
        "default_embedder",
        "nearest_examples",
        "vote",
    }
    assert all(hasattr(controltower.memory, name) for name in controltower.memory.__all__)
