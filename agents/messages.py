"""The privacy boundary as a type (docs/design.md#privacy-boundary).

Only two kinds of value ever leave an agent: a `Prediction` on the shared public set and
metric numbers. Both validate themselves on construction (Flower's MetricRecord habit), so a
tensor that is not a prediction of the expected shape cannot be smuggled out by mistake: the
payload is exactly the plain numpy arrays its codec declares (no autograd graph, no parameter
object), each of a whitelisted dtype and shaped `heads x public_batch x (classes or k)`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from agents.codecs import MESSAGE_CODECS, MessageCodec

EMBEDDING_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


@dataclass(frozen=True)
class Prediction:
    """One agent's prediction for every head on one public batch, as its codec encoded it.

    Attributes:
        sender: id of the agent that made the prediction.
        batch_id: which public batch (the round whose distillation step consumes it).
        codec: name in agents.codecs.MESSAGE_CODECS: how `payload` encodes the heads.
        num_classes: C, the classes each head predicts.
        payload: the codec's arrays by name, each [heads, batch, C or k] (agents/codecs.py).
        embeddings: optional [batch, features] float16/float32 array (opt-in embedding distillation).
    """

    sender: int
    batch_id: int
    codec: str
    num_classes: int
    payload: Mapping[str, np.ndarray]
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not all(isinstance(value, int) for value in (self.sender, self.batch_id, self.num_classes)):
            raise TypeError("Prediction.sender, .batch_id and .num_classes must be ints")
        if self.codec not in MESSAGE_CODECS:
            raise ValueError(f"Prediction.codec {self.codec!r} is not one of {MESSAGE_CODECS.names()}")
        codec = self._codec()
        if not isinstance(self.payload, dict) or set(self.payload) != set(codec.fields):
            raise TypeError(f"a {self.codec} Prediction's payload must be a dict of exactly {sorted(codec.fields)}")
        for name, dtypes in codec.fields.items():
            _check_array(f"payload[{name!r}]", self.payload[name], dtypes, ndim=3)
        if len({array.shape[:2] for array in self.payload.values()}) != 1 or self.num_heads < 1:
            raise ValueError("Prediction payload arrays must share [heads >= 1, batch] leading dims")
        codec.check(self.payload, self.num_classes)
        if self.embeddings is not None:
            _check_array("embeddings", self.embeddings, EMBEDDING_DTYPES, ndim=2)
            if self.embeddings.shape[0] != self.batch_size:
                raise ValueError("embeddings and payload disagree on the public batch size")

    def _codec(self) -> MessageCodec:
        return MESSAGE_CODECS.get(self.codec)

    def _first(self) -> np.ndarray:
        return next(iter(self.payload.values()))

    @property
    def num_heads(self) -> int:
        return int(self._first().shape[0])

    @property
    def batch_size(self) -> int:
        return int(self._first().shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of payload this message puts on one edge: its arrays, nothing else."""
        arrays = [*self.payload.values(), *([] if self.embeddings is None else [self.embeddings])]
        return sum(int(array.nbytes) for array in arrays)

    def decode(self, head: int) -> torch.Tensor:
        """Float32 logits or log-probabilities [batch, C] of one head: softmax(x / T) is its prediction at T."""
        return self._codec().decode(self.payload, head, self.num_classes)


def _check_array(name: str, array: np.ndarray, dtypes: tuple[np.dtype, ...], ndim: int) -> None:
    if type(array) is not np.ndarray:
        raise TypeError(f"Prediction.{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype not in dtypes:
        raise TypeError(f"Prediction.{name} dtype {array.dtype} is not one of {[str(d) for d in dtypes]}")
    if array.ndim != ndim:
        raise ValueError(f"Prediction.{name} must have {ndim} dims, got shape {array.shape}")


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Validate a metrics dict crossing the boundary: string keys, finite-or-nan float values."""
    checked: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric name {key!r} must be a string")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {key} must be a number, got {type(value).__name__}")
        number = float(value)
        if math.isinf(number):
            raise ValueError(f"metric {key} is infinite")
        checked[key] = number
    return checked


@dataclass(frozen=True)
class EvalCounts:
    """An agent's test result as counts (big_vision habit: sum correct and seen, divide once).

    Counting per class lets the driver compute both shared accuracy (all test samples) and
    private accuracy (test set re-weighted to an agent's class mix) from one evaluation.
    """

    correct: np.ndarray  # [heads, classes] int64: correctly classified test samples per class
    seen: np.ndarray  # [classes] int64: test samples per class

    def __post_init__(self) -> None:
        for name, array, ndim in (("correct", self.correct, 2), ("seen", self.seen, 1)):
            if type(array) is not np.ndarray or array.dtype != np.int64 or array.ndim != ndim:
                raise TypeError(f"EvalCounts.{name} must be a {ndim}-d int64 numpy array")
        if self.correct.shape[1] != self.seen.shape[0]:
            raise ValueError("EvalCounts.correct and .seen disagree on the number of classes")
