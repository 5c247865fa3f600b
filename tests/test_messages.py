"""The privacy boundary's types refuse anything but predictions and numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.messages import EvalCounts, Prediction, check_metrics


def test_prediction_accepts_float16_logits_and_counts_bytes() -> None:
    message = Prediction(3, 7, np.zeros((4, 128, 10), dtype=np.float16))
    assert message.num_heads == 4
    assert message.nbytes == 4 * 128 * 10 * 2


@pytest.mark.parametrize(
    "logits",
    [
        torch.zeros(4, 128, 10),  # a tensor (could be a Parameter)
        np.zeros((4, 128, 10), dtype=np.int64),  # not a float payload
        np.zeros((128, 10), dtype=np.float16),  # wrong rank
        np.zeros((1, 1, 8, 8), dtype=np.float32),  # image-shaped
    ],
)
def test_prediction_rejects_anything_else(logits: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        Prediction(0, 0, logits)  # type: ignore[arg-type]


def test_embeddings_must_match_the_batch() -> None:
    with pytest.raises(ValueError):
        Prediction(0, 0, np.zeros((1, 8, 3), np.float16), np.zeros((9, 4), np.float16))


def test_metrics_are_numbers_only() -> None:
    assert check_metrics({"loss/ce": 1, "x": 0.5}) == {"loss/ce": 1.0, "x": 0.5}
    with pytest.raises(TypeError):
        check_metrics({"loss/ce": torch.tensor(1.0)})
    with pytest.raises(TypeError):
        check_metrics({"weights": [1.0, 2.0]})


def test_eval_counts_are_int_arrays() -> None:
    EvalCounts(np.zeros((2, 10), np.int64), np.ones(10, np.int64))
    with pytest.raises(TypeError):
        EvalCounts(np.zeros((2, 10), np.float32), np.ones(10, np.int64))
