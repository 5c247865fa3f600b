"""Privacy audit: in a real multi-round Ray run, inspect every object crossing an actor boundary.

What crosses: (1) the metrics each actor returns, (2) the bundles of predictions that actors
put into the object store for other actors, (3) evaluation counts. Each must be a Prediction
of shape heads x public_batch x classes in float16, or numbers — never a tensor, a parameter,
an optimizer state or a private sample. A private sample could only leak inside a message's
arrays, cast to their dtype, so every message's bytes are searched for every private sample
in that encoding; a message with a sample planted in it shows that the search finds one. The
audit goes on after one actor is killed and the population is restored from a checkpoint (the
restored actors re-send their in-flight predictions, which are audited too).

Weights cross on purpose in two baselines only, `fedavg` and `gossip`, as a `WeightShare`
(agents/weight_sharing.py). The audit allows that type for exactly those methods: a run of
every other method must never build one, and a share must hold model weights and nothing else.
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
from agents.model import MultiHeadModel
from agents.weight_sharing import WeightShare
from sim.backends import create_backend
from sim.backends.base import WorkerLostError
from sim.experiment.assembly import build_experiment
from sim.experiment.methods import METHODS
from sim.run.checkpoint import CheckpointStore, LoopState
from sim.run.loop import group_plans
from sim.run.main import run
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.slow
CONF = Path(__file__).resolve().parents[1] / "conf"
WEIGHT_SHARING_BASELINES = {"fedavg", "gossip"}  # the only methods allowed to build a WeightShare


def _leaves(obj: Any) -> list[Any]:
    """Every leaf value reachable from obj (through dataclasses, dicts, lists, tuples)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [leaf for field in dataclasses.fields(obj) for leaf in _leaves(getattr(obj, field.name))]
    if isinstance(obj, dict):
        return [leaf for key, value in obj.items() for leaf in (*_leaves(key), *_leaves(value))]
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    return [obj]


class PrivateSamples:
    """Every agent's private samples, as the bytes they would have inside a message's arrays."""

    def __init__(self, samples: np.ndarray) -> None:
        self.samples = samples  # [N, C, H, W] float32
        self._encoded: dict[np.dtype, list[bytes]] = {}

    def encoded(self, dtype: np.dtype) -> list[bytes]:
        """Each sample cast to `dtype` (a message array's dtype), as raw bytes."""
        if dtype not in self._encoded:
            self._encoded[dtype] = [sample.astype(dtype).tobytes() for sample in self.samples]
        return self._encoded[dtype]

    def found_in(self, message: Prediction) -> list[int]:
        """Indices of the samples whose bytes, in the encoding of one of the message's arrays, occur in it."""
        arrays = [*message.payload.values(), *([] if message.embeddings is None else [message.embeddings])]
        found: set[int] = set()
        for array in arrays:
            haystack = array.tobytes()
            found.update(index for index, needle in enumerate(self.encoded(array.dtype)) if needle in haystack)
        return sorted(found)


def _with_planted_sample(message: Prediction, sample: np.ndarray) -> list[Prediction]:
    """Valid copies of `message` that carry `sample`: in the float16 logits, and as float32 embeddings."""
    logits = message.payload["logits"].copy()
    flat = logits.reshape(-1)
    offset = 7  # not at a row start: a leak need not be aligned with the [heads, batch, classes] rows
    flat[offset : offset + sample.size] = sample.ravel().astype(logits.dtype)
    in_logits = dataclasses.replace(message, payload={"logits": logits})
    embeddings = np.zeros((message.batch_size, sample.size), dtype=np.float32)
    embeddings[3] = sample.ravel()
    as_embeddings = dataclasses.replace(message, embeddings=embeddings)
    return [in_logits, as_embeddings]


def test_only_predictions_and_numbers_cross_actor_boundaries(ray_session: None, tmp_path: Path) -> None:
    cfg = make_config(*TINY, "rounds=6", "runtime.agents_per_actor=2")
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    store = CheckpointStore(tmp_path, keep=1)
    private = PrivateSamples(np.concatenate([spec.private_x for spec in experiment.specs]))
    shape = (1 + cfg.model.aux_heads, cfg.data.public_batch_size, 10)
    audited_predictions = 0
    audited: list[Prediction] = []

    def audit_bundles() -> None:  # (2)
        nonlocal audited_predictions
        for bundle in ray.get([ref for ref in backend.bundle_refs if ref is not None]):
            for sender, message in bundle.items():
                assert isinstance(sender, int) and type(message) is Prediction
                logits = message.payload["logits"]
                assert message.codec == "float16" and logits.shape == shape and logits.dtype == np.float16
                assert message.nbytes == shape[0] * shape[1] * shape[2] * 2
                assert message.embeddings is None  # embedding exchange is opt-in
                assert private.found_in(message) == [], f"agent {sender} sent private samples"
                audited_predictions += 1
                audited.append(message)
            for leaf in _leaves(bundle):
                assert not isinstance(leaf, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer))
                if isinstance(leaf, np.ndarray):
                    assert leaf.ndim == 3 and leaf.dtype == np.float16  # never image-shaped

    try:
        backend.start(group_plans(experiment, groups), experiment.public)
        round_idx = 0
        while round_idx < experiment.settings.rounds:
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
        for counts in backend.evaluate(full=True).values():  # (3)
            assert type(counts) is EvalCounts and counts.correct.dtype == np.int64
    finally:
        backend.shutdown()
    # every agent's prediction of every round, plus the 4 re-sent after the restore
    assert audited_predictions == experiment.num_agents * (experiment.settings.rounds + 1)
    # the search finds a private sample where one was put: in the float16 logits, or as float32 embeddings
    planted = 5
    for message in _with_planted_sample(audited[0], private.samples[planted]):
        assert planted in private.found_in(message)


@pytest.mark.parametrize("method", METHODS.names())
def test_weights_cross_only_in_the_weight_sharing_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    built: list[WeightShare] = []
    check = WeightShare.__post_init__

    def record(share: WeightShare) -> None:
        check(share)
        built.append(share)

    monkeypatch.setattr(WeightShare, "__post_init__", record)
    cfg = make_config(*TINY, f"method={method}", "rounds=2", "runtime.backend=serial", "logger.report=false")
    summary = run(cfg, tmp_path)
    allowed = method in WEIGHT_SHARING_BASELINES
    assert bool(built) == allowed == summary["shares_weights"]
    label = (CONF / "method" / f"{method}.yaml").read_text().splitlines()[0]
    assert (label == "# shares WEIGHTS — not privacy-preserving; a baseline.") == allowed
    if allowed:  # model weights only: no optimizer state, no sample, float32
        model = build_experiment(cfg).specs[0].model
        names = {name for name, tensor in MultiHeadModel(model).state_dict().items() if tensor.is_floating_point()}
        for share in built:
            assert set(share.tensors) == names
            assert all(array.dtype == np.float32 for array in share.tensors.values())
