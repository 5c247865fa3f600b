"""The Agent in a plain loop (no Ray): it learns, distils, and publishes only predictions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from agents.agent import Agent
from agents.messages import Prediction
from sim.experiment.assembly import build_experiment
from tests.conftest import PLAIN_CPU as PLAIN
from tests.conftest import TINY, make_config


def _agent(*overrides: str, agent_id: int = 0) -> Agent:
    experiment = build_experiment(make_config(*TINY, *overrides))
    return Agent(experiment.specs[agent_id], experiment.public, PLAIN)


def test_an_isolated_agent_learns_its_own_classes_on_digits() -> None:
    agent = _agent("method=isolated", "train.local_steps=20")
    dominant = np.argsort(np.bincount(agent.spec.private_y, minlength=10))[-2:]

    def dominant_accuracy() -> float:
        counts = agent.evaluate(full=True)
        return float(counts.correct[0, dominant].sum() / counts.seen[dominant].sum())

    before = dominant_accuracy()
    for round_idx in range(5):
        agent.train_round(round_idx, [])
    after = dominant_accuracy()
    assert after > 0.9 > before + 0.3


def test_distillation_pulls_every_head_towards_its_teacher() -> None:
    agent = _agent("method.nu_main=5", "method.nu_aux=5")
    teacher = _agent("method.nu_main=5", "method.nu_aux=5", agent_id=1)
    for round_idx in range(5):  # a teacher with opinions of its own classes
        teacher.train_round(round_idx, [])
    message = teacher.predict(0)
    before = agent.train_round(0, [message])
    for _ in range(10):
        after = agent.train_round(0, [message])
    assert set(before) >= {"loss/ce", "loss/kl_main", "loss/kl_aux1", "loss/kl_aux2", "loss/kl_aux3", "loss/total"}
    assert after["loss/kl_main"] < before["loss/kl_main"] / 2


def test_predictions_cover_every_head_on_the_public_batch() -> None:
    agent = _agent()
    message = agent.predict(5)
    assert isinstance(message, Prediction)
    assert message.payload["logits"].shape == (4, agent.public.public_batch_size, 10)
    assert message.payload["logits"].dtype == np.float16
    assert message.batch_id == 5 and message.sender == 0


def test_an_agent_is_reproducible_from_its_spec() -> None:
    first, second = _agent(), _agent()
    for agent in (first, second):
        agent.train_round(0, [])
    assert np.array_equal(first.predict(1).payload["logits"], second.predict(1).payload["logits"])


def test_channels_last_computes_the_same_predictions() -> None:
    """A speed option must not change what is computed (beyond float rounding)."""
    experiment = build_experiment(make_config(*TINY))
    plain, nhwc = (
        Agent(experiment.specs[0], experiment.public, replace(PLAIN, channels_last=channels_last))
        for channels_last in (False, True)
    )
    assert np.allclose(plain.predict(0).payload["logits"], nhwc.predict(0).payload["logits"], atol=1e-2)
    for agent in (plain, nhwc):
        agent.train_round(0, [])
    assert np.allclose(plain.predict(1).payload["logits"], nhwc.predict(1).payload["logits"], atol=5e-2)
    assert np.array_equal(plain.evaluate(full=True).seen, nhwc.evaluate(full=True).seen)


def test_bf16_autocast_learns_like_float32() -> None:
    """bf16 changes numerics (not the method): same predictions to bf16 precision, still learns."""
    experiment = build_experiment(make_config(*TINY, "method=isolated", "train.local_steps=20"))
    plain, bf16 = (
        Agent(experiment.specs[0], experiment.public, replace(PLAIN, bf16=enabled)) for enabled in (False, True)
    )
    assert np.allclose(plain.predict(0).payload["logits"], bf16.predict(0).payload["logits"], atol=0.1)
    for round_idx in range(3):
        for agent in (plain, bf16):
            losses = agent.train_round(round_idx, [])
    assert losses["loss/ce"] < 0.5  # bf16's last round
    counts = [agent.evaluate(full=True) for agent in (plain, bf16)]
    accuracies = [count.correct[0].sum() / count.seen.sum() for count in counts]
    assert abs(accuracies[0] - accuracies[1]) < 0.05
