"""privacy=noisy_probs and privacy=randomized_response: the mechanisms' distributions, their accounting, the checks.

The statistical tests use a fixed seed and a tolerance of 4 binomial (or sampling) standard
deviations, so they fail when a probability or a scale is off by a few percent, not by chance.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from agents.agent import Agent
from agents.output_privacy import (
    NOISE,
    OutputPrivacyConfig,
    debias_label_frequencies,
    keep_probability,
    noisy_probabilities,
    project_to_simplex,
    randomized_response,
)
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from sim.experiment.output_privacy import (
    L2_SENSITIVITY,
    OutputPrivacyPlan,
    gaussian_delta,
    gaussian_epsilon,
    pure_composition,
)
from sim.experiment.settings import check_config
from sim.run.main import run
from tests.conftest import PLAIN_CPU, TINY, make_config

SERIAL = [*TINY, "runtime.backend=serial", "logger.report=false"]
RR = [*SERIAL, "privacy=randomized_response", "method.message_codec=topk", "method.message_topk=1"]


def test_randomized_response_keeps_the_label_with_the_documented_probability() -> None:
    classes, epsilon, n = 10, 1.5, 40_000
    labels = torch.randint(classes, (1, n), generator=torch.Generator().manual_seed(1))
    logits = torch.nn.functional.one_hot(labels, classes).float() * 5  # [1, n, C], argmax = labels
    config = OutputPrivacyConfig("randomized_response", "none", 0.0, epsilon)
    released = randomized_response(logits, config, torch.Generator().manual_seed(0))
    sent = released.argmax(dim=-1)
    p = math.exp(epsilon) / (math.exp(epsilon) + classes - 1)
    assert keep_probability(epsilon, classes) == pytest.approx(p)
    kept = float((sent == labels).float().mean())
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n)
    # a flip lands on each other label with probability 1 / (e^eps + C - 1): offsets 1..C-1 uniform
    offsets = ((sent - labels) % classes)[sent != labels]
    share = torch.bincount(offsets, minlength=classes)[1:].float() / n
    q = 1 / (math.exp(epsilon) + classes - 1)
    assert float((share - q).abs().max()) < 4 * math.sqrt(q * (1 - q) / n)
    probs = released.exp()  # the message is a floored one-hot
    assert torch.allclose(probs.amax(dim=-1), torch.ones(1, n)) and bool((probs.sum(dim=-1) < 1.01).all())


def test_debiasing_recovers_the_true_label_frequencies() -> None:
    classes, epsilon, n = 4, 1.0, 40_000
    true = torch.tensor([0.6, 0.3, 0.1, 0.0])
    labels = torch.multinomial(true, n, replacement=True, generator=torch.Generator().manual_seed(2))[None]
    logits = torch.nn.functional.one_hot(labels, classes).float()
    config = OutputPrivacyConfig("randomized_response", "none", 0.0, epsilon)
    sent = randomized_response(logits, config, torch.Generator().manual_seed(3)).argmax(dim=-1)[0]
    reported = torch.bincount(sent, minlength=classes).float() / n
    assert float((reported - true).abs().max()) > 0.1  # the reports alone are biased towards uniform
    estimate = debias_label_frequencies(reported, epsilon)
    p = keep_probability(epsilon, classes)
    std = math.sqrt(0.25 / n) / (p - (1 - p) / (classes - 1))  # the inverse's scale times a share's largest std
    assert float((estimate - true).abs().max()) < 4 * std


@pytest.mark.parametrize(("noise", "std_per_scale"), [("gaussian", 1.0), ("laplace", math.sqrt(2))])
def test_noisy_probabilities_have_the_documented_noise_scale(noise: str, std_per_scale: float) -> None:
    """Uniform probabilities plus small noise stay inside the simplex, where the projection only removes the
    noise's mean: released - p = z - mean(z), of std scale * std_per_scale * sqrt((C - 1) / C)."""
    classes, n, scale = 10, 20_000, 0.005
    config = OutputPrivacyConfig("noisy_probs", noise, scale, 1.0)
    released = noisy_probabilities(torch.zeros(1, n, classes), config, torch.Generator().manual_seed(0)).exp()
    deviation = released - 1 / classes
    expected = scale * std_per_scale * math.sqrt((classes - 1) / classes)
    samples = deviation.numel()
    assert abs(float(deviation.std()) / expected - 1) < 4 * math.sqrt(2 / samples) * (3 if noise == "laplace" else 1)
    assert torch.allclose(released.sum(dim=-1), torch.ones(1, n), atol=1e-5)
    raw = NOISE.get(noise)(torch.Size([200_000]), 0.3, torch.Generator().manual_seed(1))
    assert abs(float(raw.std()) / (0.3 * std_per_scale) - 1) < 0.02


def test_projection_onto_the_simplex() -> None:
    v = torch.tensor([[0.5, 0.5, 0.5], [2.0, -1.0, 0.0], [0.2, 0.3, 0.5]])
    projected = project_to_simplex(v)
    assert torch.allclose(projected, torch.tensor([[1 / 3] * 3, [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]), atol=1e-6)


def test_the_accounting_composes_every_release() -> None:
    """Gaussian: k releases of mu_0 are sqrt(k) mu_0-GDP, converted exactly; pure epsilon: min(basic, advanced)."""
    mu, delta = 0.8, 1e-5
    exact = brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 50)
    assert gaussian_epsilon(mu, delta) == pytest.approx(exact, rel=1e-6)
    assert gaussian_delta(gaussian_epsilon(mu, delta), mu) == pytest.approx(delta, rel=1e-4)
    assert pure_composition(0.5, 4, delta) == 2.0  # basic is smaller for few releases
    advanced = 0.01 * math.sqrt(2 * 10_000 * math.log(1 / delta)) + 10_000 * 0.01 * math.expm1(0.01)
    assert pure_composition(0.01, 10_000, delta) == pytest.approx(advanced)
    experiment = build_experiment(make_config(*SERIAL, "privacy=noisy_probs", "privacy.epsilon=2"))
    plan = experiment.privacy
    assert isinstance(plan, OutputPrivacyPlan)
    assert plan.releases_per_message == 4 * experiment.public.public_batch_size  # 1 + 3 heads
    assert gaussian_delta(2.0, L2_SENSITIVITY / plan.scale) == pytest.approx(1e-5, rel=1e-4)  # calibrated exactly
    k = plan.releases_per_message * 3
    assert plan.epsilon(3) == pytest.approx(gaussian_epsilon(math.sqrt(k) * L2_SENSITIVITY / plan.scale, 1e-5))
    laplace = build_experiment(make_config(*SERIAL, "privacy=noisy_probs", "privacy.noise=laplace")).privacy
    assert isinstance(laplace, OutputPrivacyPlan) and laplace.scale == pytest.approx(2 / 4.0)


def test_a_randomized_response_run_sends_labels_and_reports_its_epsilon(tmp_path: Path) -> None:
    summary = run(make_config(*RR, "privacy.epsilon=2"), tmp_path)
    privacy = summary["privacy"]
    experiment = build_experiment(make_config(*RR, "privacy.epsilon=2"))
    plan = experiment.privacy
    assert isinstance(plan, OutputPrivacyPlan) and privacy["mechanism"] == "randomized_response"
    messages = summary["rounds"] - 1  # the last round publishes nothing
    assert privacy["epsilon"] == {str(agent): plan.epsilon(messages) for agent in range(4)}
    assert privacy["epsilon_per_message"] == pytest.approx(plan.epsilon(1))
    agent = Agent(experiment.specs[0], experiment.public, PLAIN_CPU)
    message = agent.predict(1)
    assert message.codec == "topk" and message.payload["classes"].shape[-1] == 1
    assert agent.release_metrics() == {"privacy/messages": 1.0}


def test_the_output_noise_stream_survives_a_checkpoint() -> None:
    experiment = build_experiment(make_config(*SERIAL, "privacy=noisy_probs"))
    first, second = (Agent(experiment.specs[0], experiment.public, PLAIN_CPU) for _ in range(2))
    first.predict(1)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    again = first.predict(2), second.predict(2)
    assert np.array_equal(again[0].payload["logits"], again[1].payload["logits"])
    assert second.release_metrics() == {"privacy/messages": 2.0}


def test_privacy_none_publishes_the_codec_encoding_unchanged() -> None:
    experiment = build_experiment(make_config(*SERIAL))
    assert all(spec.output_privacy is None for spec in experiment.specs)
    agent = Agent(experiment.specs[0], experiment.public, PLAIN_CPU)
    message = agent.predict(1)
    with torch.inference_mode():
        logits = agent.model(agent.public_batch(1))[0]
    assert np.array_equal(message.payload["logits"], agent.spec.message_codec.encode(logits)["logits"])
    assert agent.release_metrics() == {} and "output_privacy" not in agent.state_dict()
    noisy = dataclasses.replace(
        experiment.specs[0], output_privacy=OutputPrivacyConfig("noisy_probs", "gaussian", 0.1, 1.0)
    )
    assert not np.array_equal(
        Agent(noisy, experiment.public, PLAIN_CPU).predict(1).payload["logits"], message.payload["logits"]
    )


BAD = [
    (["privacy=noisy_probs", "privacy.noise=uniform"], "privacy.noise"),
    (["privacy=noisy_probs", "privacy.epsilon=0"], "privacy.epsilon"),
    (["privacy=noisy_probs", "privacy.delta=1"], "privacy.delta"),
    (["privacy=noisy_probs", "method=isolated"], "method"),
    (["privacy=noisy_probs", "method=fedavg"], "method"),
    (["privacy=noisy_probs", "method.nu_emb=1"], "method.nu_emb"),
    (["privacy=randomized_response"], "method.message_codec"),  # float16 logits are no label
    (["privacy=randomized_response", "method.message_codec=topk", "method.message_topk=3"], "method.message_topk"),
    (
        ["privacy=randomized_response", "method.message_codec=topk", "method.message_topk=1", "privacy.epsilon=-1"],
        "privacy.epsilon",
    ),
    (["privacy=dp_sgd", "+privacy.train.momentum=0.5"], "privacy.train.momentum"),
    (["privacy=dp_sgd", "privacy.train.batch_size=0"], "privacy.train.batch_size"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD)
def test_bad_output_settings_are_one_line_errors_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_config(make_config(*SERIAL, *overrides))
    assert error.value.key == key and "\n" not in str(error.value)
