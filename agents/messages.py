"""The privacy boundary as a type.

Only two kinds of value ever leave an agent: a `Prediction` on the shared public set and
metric numbers. Both validate themselves on construction (Flower's MetricRecord habit), so a
tensor that is not a prediction of the expected shape cannot be smuggled out by mistake: the
payload is a plain numpy array (no autograd graph, no parameter object), of a whitelisted
float dtype, with exactly `heads x public_batch x classes` entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MESSAGE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}


@dataclass(frozen=True)
class Prediction:
    """One agent's logits for every head on one public batch.

    Attributes:
        sender: id of the agent that made the prediction.
        batch_id: which public batch (the round whose distillation step consumes it).
        logits: [heads, batch, classes] array in a dtype of MESSAGE_DTYPES.
        embeddings: optional [batch, features] array (opt-in embedding distillation).
    """

    sender: int
    batch_id: int
    logits: np.ndarray
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_payload("logits", self.logits, ndim=3)
        if self.embeddings is not None:
            _check_payload("embeddings", self.embeddings, ndim=2)
            if self.embeddings.shape[0] != self.logits.shape[1]:
                raise ValueError("embeddings and logits disagree on the public batch size")
        if not isinstance(self.sender, int) or not isinstance(self.batch_id, int):
            raise TypeError("Prediction.sender and .batch_id must be ints")

    @property
    def num_heads(self) -> int:
        return int(self.logits.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of payload this message puts on one edge."""
        extra = 0 if self.embeddings is None else self.embeddings.nbytes
        return int(self.logits.nbytes) + int(extra)


def _check_payload(name: str, array: np.ndarray, ndim: int) -> None:
    if type(array) is not np.ndarray:
        raise TypeError(f"Prediction.{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype not in MESSAGE_DTYPES.values():
        raise TypeError(f"Prediction.{name} dtype {array.dtype} is not one of {sorted(MESSAGE_DTYPES)}")
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
