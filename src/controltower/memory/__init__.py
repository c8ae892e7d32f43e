"""Long-term agent memory: key-value and semantic search per tenant and workflow.

Step code uses ``ctx.memory`` (a :class:`MemoryView` of the run's tenant and workflow);
everything else uses ``Memory(store).view(tenant, workflow)``.
"""

from __future__ import annotations

from controltower.memory.binding import MemoryUnavailable, bind_memory, current_memory
from controltower.memory.embeddings import (
    Embedder,
    EmbedderUnavailable,
    HashedEmbedder,
    SentenceTransformerEmbedder,
    default_embedder,
)
from controltower.memory.knn import Example, NearestExamples, Prediction, nearest_examples, vote
from controltower.memory.store import Memory, MemoryEntry, MemoryHit, MemoryView

__all__ = [
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
]
