"""scripts/leakage_audit.py: its statistics, its class-mix attack, and one tiny audited run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.messages import Prediction
from tests.conftest import load_script

audit = load_script("leakage_audit")


def test_auc_and_advantage_of_known_score_sets() -> None:
    assert audit.roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert audit.roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert audit.roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5  # ties count half
    assert audit.roc_auc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == 0.25
    assert audit.advantage(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert audit.advantage(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0


def test_class_mix_attack_reads_the_mean_prediction() -> None:
    mix = np.array([0.7, 0.2, 0.1])
    logits = torch.log(torch.tensor(mix, dtype=torch.float32)).expand(1, 8, 3)  # every public sample predicts the mix
    message = Prediction(0, 1, "float32", 3, {"logits": logits.numpy().copy()})
    found = audit.class_mix_attack(message, mix)
    assert found["tv_attack"] == pytest.approx(0.0, abs=1e-6) and found["top_class_hit"] == 1.0
    assert found["tv_uniform"] == pytest.approx(0.5 * (abs(0.7 - 1 / 3) + abs(0.2 - 1 / 3) + abs(0.1 - 1 / 3)))


def test_a_tiny_audit_reports_every_attack_with_and_without_dp() -> None:
    overrides = ["num_agents=3", "train.local_steps=1", "logger.progress=false", "runtime.torch_threads=1"]
    results = [
        audit.run_setting(setting, overrides, rounds=2, every=1) for setting in audit.settings([50.0], [4.0], [4.0])
    ]
    assert [len(result["rounds"]) for result in results] == [2, 2, 2, 2]
    for result in results:
        for point in result["rounds"]:
            assert point["agents_publishing"] == 3
            assert 0 <= point["observable_auc"] <= 1 and 0 <= point["query_auc"] <= 1
    assert results[0]["rounds"][-1].get("epsilon_max") is None
    assert 0 < results[1]["rounds"][-1]["epsilon_max"] <= 50
    assert all(result["rounds"][-1]["epsilon_max"] > 0 for result in results[2:])  # composed over the messages
    assert "final main head" in audit.table(results)


def test_the_class_mix_attack_debiases_randomized_response() -> None:
    """Reports of a mix through RR at epsilon 1 drift towards uniform; the debiased estimate does not."""
    mix = np.array([0.7, 0.2, 0.1])
    p = 1 / (1 + 2 * np.exp(-1.0))
    reported = p * mix + (1 - p) / 2 * (1 - mix)  # the expected report frequencies
    logits = torch.log(torch.tensor(reported, dtype=torch.float32)).expand(1, 8, 3)
    message = Prediction(0, 1, "float32", 3, {"logits": logits.numpy().copy()})
    assert audit.class_mix_attack(message, mix)["tv_attack"] > 0.1
    assert audit.class_mix_attack(message, mix, rr_epsilon=1.0)["tv_attack"] == pytest.approx(0.0, abs=1e-5)
