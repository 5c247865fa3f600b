"""Privacy audit: in a real multi-round Ray run, inspect every object crossing an actor boundary.

What crosses: (1) the metrics each actor returns, (2) the bundles of predictions that actors
put into the object store for other actors, (3) evaluation counts. Each must be a Prediction
of shape heads x public_batch x classes in float16, or numbers — never a tensor, a parameter,
an optimizer state or a private sample.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import ray
import torch

from agents.messages import EvalCounts, Prediction
from sim.backends import create_backend
from sim.experiment import build_experiment
from sim.simulation import group_plans
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.slow


def _leaves(obj: Any) -> list[Any]:
    """Every leaf value reachable from obj (through dataclasses, dicts, lists, tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [leaf for field in dataclasses.fields(obj) for leaf in _leaves(getattr(obj, field.name))]
    if isinstance(obj, dict):
        return [leaf for key, value in obj.items() for leaf in (*_leaves(key), *_leaves(value))]
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    return [obj]


def test_only_predictions_and_numbers_cross_actor_boundaries(ray_session: None) -> None:
    cfg = make_config(*TINY, "rounds=4", "runtime.agents_per_actor=2")
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment.runtime, experiment.num_agents)
    private_rows = {spec.private_x[i].tobytes() for spec in experiment.specs for i in range(len(spec.private_x))}
    heads, batch, classes = 1 + cfg.model.aux_heads, cfg.data.public_batch_size, 10
    audited_predictions = 0
    try:
        backend.start(group_plans(experiment, groups), experiment.public)
        for round_idx in range(experiment.rounds):
            metrics = backend.run_round(round_idx, publish=True)
            for leaf in _leaves(metrics):  # (1) metric numbers only
                assert type(leaf) in (int, float, str), type(leaf)
            bundles = ray.get([ref for ref in backend.bundle_refs if ref is not None])  # (2)
            for bundle in bundles:
                for sender, message in bundle.items():
                    assert isinstance(sender, int) and type(message) is Prediction
                    assert message.logits.shape == (heads, batch, classes)
                    assert message.logits.dtype == np.float16
                    assert message.nbytes == heads * batch * classes * 2
                    assert message.embeddings is None  # embedding exchange is opt-in
                    audited_predictions += 1
                for leaf in _leaves(bundle):
                    assert not isinstance(leaf, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer))
                    if isinstance(leaf, np.ndarray):
                        assert leaf.ndim == 3 and leaf.dtype == np.float16  # never image-shaped
                        assert leaf.tobytes() not in private_rows
        for counts in backend.evaluate().values():  # (3)
            assert type(counts) is EvalCounts and counts.correct.dtype == np.int64
    finally:
        backend.shutdown()
    assert audited_predictions == experiment.num_agents * experiment.rounds
