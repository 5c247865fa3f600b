"""GPU placement: fractional GPUs per actor, device chosen from what Ray assigned.

Skipped where torch sees no CUDA device (CI, laptops); run on a GPU machine with
`python -m pytest -m gpu`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agents.agent import Agent
from sim.experiment.assembly import build_experiment
from sim.run.main import run
from tests.conftest import PLAIN_CPU, TINY, make_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_an_agent_trains_and_predicts_on_the_gpu() -> None:
    experiment = build_experiment(make_config(*TINY))
    agent = Agent(
        experiment.specs[0],
        experiment.public,
        replace(PLAIN_CPU, device="cuda", channels_last=True),
    )
    losses = agent.train_round(0, [])
    assert losses["loss/ce"] > 0
    assert next(agent.model.parameters()).is_cuda
    assert agent.predict(1).num_heads == 4


def test_two_actors_share_one_gpu_and_match_the_cpu_run(tmp_path: Path) -> None:
    summary = run(
        make_config(*TINY, "runtime.backend=ray", "runtime.num_gpus_per_actor=0.5", "runtime.agents_per_actor=2"),
        tmp_path / "gpu",
    )
    assert summary["runtime"]["devices"] == ["cuda", "cuda"]
    cpu = run(make_config(*TINY, "runtime.backend=serial"), tmp_path / "cpu")
    for head, row in summary["final"]["heads"].items():  # same learning, up to GPU float rounding
        assert abs(row["shared_acc"] - cpu["final"]["heads"][head]["shared_acc"]) < 0.1
