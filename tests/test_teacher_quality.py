"""scripts/teacher_quality.py: the diagnostic scores targets against the public labels the simulator hides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from agents.messages import Prediction
from sim.data.datasets import split_public_private
from tests.conftest import load_script, make_config

quality = load_script("teacher_quality")


def _message(agent: int, logits: list[list[float]]) -> Prediction:
    payload = np.asarray([logits], dtype=np.float32)  # [heads=1, P, C]
    return Prediction(agent, 1, "float32", 3, {"logits": payload}, None)


def test_the_scores_of_known_candidates() -> None:
    y = torch.tensor([0, 1])
    neighbour = _message(1, [[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # right on sample 0, confidently wrong on 1
    own = _message(0, [[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]])  # wrong on 0, right but less sure on 1
    scores = quality.score([neighbour, own], y, seen={1}, own_last=True)
    assert scores["most_confident"] == 0.5  # picks the neighbour twice: right, then wrong
    assert scores["any_candidate"] == 1.0
    assert scores["self_chosen"] == 0.0 and scores["self_chosen_wrong"] == 0.0
    assert "aux1_most_confident" not in scores  # one head only


def test_public_labels_are_those_of_the_simulators_public_set() -> None:
    cfg = make_config()
    from sim.data.datasets import load_dataset

    splits = load_dataset("digits", None, 0, test_fraction=cfg.data.test_fraction)
    public = split_public_private(splits.train, int(cfg.data.public_size), 0).public_x
    labels = quality.public_labels(cfg)
    assert len(labels) == len(public)
    nearest = [int(np.argmin(((splits.train.x - image) ** 2).sum(axis=(1, 2, 3)))) for image in public[:5]]
    assert [int(splits.train.y[row]) for row in nearest] == labels[:5].tolist()


def test_a_tiny_audit_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    quality.main(
        ["--out", str(out), "--", "num_agents=3", "rounds=2", "train.local_steps=2", "runtime.torch_threads=1"]
    )
    rows = json.loads(out.read_text())["rounds"]
    assert [row["round"] for row in rows] == [0, 1]
    for row in rows:
        assert 0 <= row["most_confident"] <= row["any_candidate"] <= 1
        assert row["self_chosen_wrong"] <= row["self_chosen"]
