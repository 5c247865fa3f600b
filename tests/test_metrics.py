"""Shared and private accuracy from per-class counts."""

from __future__ import annotations

import numpy as np

from agents.messages import EvalCounts
from sim.reporting.metrics import agent_accuracies, head_summary, round_bytes


def test_private_accuracy_reweights_to_the_agents_class_mix() -> None:
    seen = np.array([10, 10], dtype=np.int64)
    # main head perfect on class 0, useless on class 1; aux head the other way round
    correct = np.array([[10, 0], [0, 10]], dtype=np.int64)
    class_counts = np.array([[90, 10], [0, 50]])
    result = agent_accuracies({0: EvalCounts(correct, seen), 1: EvalCounts(correct, seen)}, class_counts)
    assert result[0]["main"] == {"shared_acc": 0.5, "private_acc": 0.9}
    assert result[0]["aux1"]["private_acc"] == 0.1
    assert result[1]["main"]["private_acc"] == 0.0
    summary = head_summary(result)
    assert summary["main"]["private_acc"] == 0.45
    assert summary["main"]["private_acc_min"] == 0.0 and summary["main"]["private_acc_max"] == 0.9


def test_bytes_count_one_message_per_out_edge() -> None:
    metrics = {0: {"comm/message_bytes": 100.0}, 1: {"comm/message_bytes": 100.0}, 2: {}}
    assert round_bytes(metrics, {0: 2, 1: 1, 2: 5}) == 300
