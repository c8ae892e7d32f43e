"""Classification by nearest labelled examples (k-NN with a similarity-weighted vote).

Templates use it to classify offline: a handful of labelled examples per class, embedded
once, and each new text takes the label its nearest examples vote for. The confidence is the
winning label's share of the vote, damped by how similar its closest example is, so both an
ambiguous text (neighbours split between labels) and one with no similar example at all come
out with a low confidence and can escalate.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controltower.memory.embeddings import Embedder, HashedEmbedder, dot
from controltower.spec.errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True, slots=True)
class Neighbour:
    label: str
    score: float
    ref: str  # the example's text, or the memory key it came from


@dataclass(frozen=True, slots=True)
class Prediction:
    """``label`` is None when no neighbour had a positive similarity."""

    label: str | None
    confidence: float  # share * sqrt(similarity), in [0, 1]: 1.0 only for a unanimous exact match
    similarity: float  # the best similarity among the winner's neighbours
    share: float = 0.0  # the winner's share of the similarity-weighted vote
    votes: dict[str, float] = field(default_factory=dict)
    neighbours: tuple[Neighbour, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "confidence": round(self.confidence, 4),
            "similarity": round(self.similarity, 4),
            "share": round(self.share, 4),
            "votes": {k: round(v, 4) for k, v in self.votes.items()},
            "neighbours": [
                {"label": n.label, "score": round(n.score, 4), "ref": n.ref} for n in self.neighbours
            ],
        }


def vote(neighbours: Iterable[tuple[str, float, str]]) -> Prediction:
    """Weighted vote of (label, similarity, ref) triples; non-positive similarities do not vote."""
    ranked = tuple(Neighbour(label, score, ref) for label, score, ref in neighbours)
    votes: dict[str, float] = {}
    for n in ranked:
        if n.score > 0:
            votes[n.label] = votes.get(n.label, 0.0) + n.score
    total = sum(votes.values())
    if total <= 0:
        return Prediction(None, 0.0, 0.0, 0.0, {}, ranked)
    best = max(ranked, key=lambda n: n.score)
    # ties go to the label of the single most similar example
    label = max(votes, key=lambda lab: (votes[lab], lab == best.label))
    similarity = max(n.score for n in ranked if n.label == label)
    share = votes[label] / total
    confidence = share * math.sqrt(min(1.0, similarity))
    return Prediction(label, confidence, similarity, share, votes, ranked)


ExampleLike = Example | tuple[str, str] | Mapping[str, Any]


def _example(item: ExampleLike) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return Example(str(item[0]), str(item[1]))
    if isinstance(item, Mapping) and "text" in item and "label" in item:
        return Example(str(item["text"]), str(item["label"]))
    raise InvalidInputError(
        f"not a labelled example: {item!r}", hint="use Example(text, label), (text, label) or {text, label}"
    )


class NearestExamples:
    """Labelled examples embedded once; :meth:`classify` many texts against them.

    With no ``embedder`` the deterministic :class:`HashedEmbedder` is used, so results are
    the same on every machine; pass ``default_embedder()`` to follow ``TOWER_EMBEDDER``.
    """

    def __init__(self, examples: Sequence[ExampleLike], embedder: Embedder | None = None) -> None:
        self.examples = [_example(e) for e in examples]
        if not self.examples:
            raise InvalidInputError("nearest-example classification needs at least one labelled example")
        self.embedder = embedder if embedder is not None else HashedEmbedder()
        self._vectors = self.embedder.embed([e.text for e in self.examples])

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.examples})

    def classify(self, text: str, k: int = 5) -> Prediction:
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        (q,) = self.embedder.embed([text])
        scored = [(dot(q, v), i) for i, v in enumerate(self._vectors)]
        top = heapq.nsmallest(k, scored, key=lambda pair: (-pair[0], pair[1]))
        return vote((self.examples[i].label, score, self.examples[i].text) for score, i in top)


def nearest_examples(
    text: str, examples: Sequence[ExampleLike], k: int = 5, *, embedder: Embedder | None = None
) -> Prediction:
    """One-off classification; build a :class:`NearestExamples` to classify many texts."""
    return NearestExamples(examples, embedder).classify(text, k)
