"""Privacy audit: in a real multi-round Ray run, inspect every object crossing an actor boundary.

What crosses: (1) the metrics each actor returns, (2) the bundles of predictions that actors
put into the object store for other actors, (3) evaluation counts. Each must be a Prediction
of shape heads x public_batch x classes in float16, or numbers — never a tensor, a parameter,
an optimizer state or a private sample. The audit goes on after one actor is killed and the
population is restored from a checkpoint (the restored actors re-send their in-flight
predictions, which are audited too).
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from agents.messages import EvalCounts, Prediction
from sim.backends import create_backend
from sim.backends.base import WorkerLostError
from sim.checkpoint import CheckpointStore, LoopState
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


def test_only_predictions_and_numbers_cross_actor_boundaries(ray_session: None, tmp_path: Path) -> None:
    cfg = make_config(*TINY, "rounds=6", "runtime.agents_per_actor=2")
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment.runtime, experiment.num_agents)
    store = CheckpointStore(tmp_path, keep=1)
    private_rows = {spec.private_x[i].tobytes() for spec in experiment.specs for i in range(len(spec.private_x))}
    shape = (1 + cfg.model.aux_heads, cfg.data.public_batch_size, 10)
    audited_predictions = 0

    def audit_bundles() -> None:  # (2)
        nonlocal audited_predictions
        for bundle in ray.get([ref for ref in backend.bundle_refs if ref is not None]):
            for sender, message in bundle.items():
                assert isinstance(sender, int) and type(message) is Prediction
                assert message.logits.shape == shape and message.logits.dtype == np.float16
                assert message.nbytes == shape[0] * shape[1] * shape[2] * 2
                assert message.embeddings is None  # embedding exchange is opt-in
                audited_predictions += 1
            for leaf in _leaves(bundle):
                assert not isinstance(leaf, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer))
                if isinstance(leaf, np.ndarray):
                    assert leaf.ndim == 3 and leaf.dtype == np.float16  # never image-shaped
                    assert leaf.tobytes() not in private_rows

    try:
        backend.start(group_plans(experiment, groups), experiment.public)
        round_idx = 0
        while round_idx < experiment.rounds:
            if round_idx == 3 and not store.latest():
                store.save(backend, LoopState(next_round=3))
                os.kill(backend.describe()["pids"][0], signal.SIGKILL)  # type: ignore[index]
            try:
                metrics = backend.run_round(round_idx, publish=True)
            except WorkerLostError:
                checkpoint = store.latest()
                assert checkpoint is not None
                backend.restore(checkpoint.directory)  # restarted actor + re-sent predictions
                audit_bundles()
                continue
            for leaf in _leaves(metrics):  # (1) metric numbers only
                assert type(leaf) in (int, float, str), type(leaf)
            audit_bundles()
            round_idx += 1
        for counts in backend.evaluate().values():  # (3)
            assert type(counts) is EvalCounts and counts.correct.dtype == np.int64
    finally:
        backend.shutdown()
    # every agent's prediction of every round, plus the 4 re-sent after the restore
    assert audited_predictions == experiment.num_agents * (experiment.rounds + 1)
