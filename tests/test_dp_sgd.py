"""privacy=dp_sgd: the mechanism's properties, its accounting, its budgets and its config checks.

Each property the guarantee rests on is checked on its own: clipping bounds what one sample can
add, the noise has the std the accountant assumes, the accountant agrees with the exact epsilon
of a composition it can be checked against, and a budget is never passed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from agents.agent import Agent
from agents.privacy import DPSGD, PrivacyConfig, clip_factors, per_sample_gradients
from sim.core.errors import ConfigError
from sim.experiment.assembly import Experiment, build_experiment
from sim.experiment.privacy import prv_epsilon, rdp_epsilon
from sim.experiment.settings import check_config
from sim.reporting.loggers import privacy_line
from sim.reporting.report import privacy_section
from sim.run.main import run
from tests.conftest import PLAIN_CPU, TINY, make_config

SERIAL = [*TINY, "runtime.backend=serial", "logger.report=false"]
# privacy.train's tuned defaults off: these tests reason about train's own steps and batches (TINY's)
TRAIN_AS_IS = [
    f"privacy.train.{key}=null" for key in ("local_steps", "batch_size", "optimizer.lr", "optimizer.momentum")
]
DP = [*SERIAL, "privacy=dp_sgd", *TRAIN_AS_IS]


@pytest.fixture(scope="module")
def experiment() -> Experiment:
    return build_experiment(make_config(*SERIAL))


def _agent(experiment: Experiment, privacy: PrivacyConfig | None, agent_id: int = 0) -> Agent:
    spec = dataclasses.replace(experiment.specs[agent_id], privacy=privacy)
    return Agent(spec, experiment.public, PLAIN_CPU)


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def test_clipping_bounds_each_samples_contribution(experiment: Experiment) -> None:
    """Every clipped per-sample gradient has norm <= C, so one sample moves the sum by at most C."""
    agent = _agent(experiment, None)
    clip = 0.05  # far below the raw norms of an untrained model, so every sample is clipped
    x, y = agent.private_x[:16], agent.private_y[:16]
    params = {name: p.detach() for name, p in agent.model.named_parameters()}
    grads, _ = per_sample_gradients(agent.model, params, x, y)
    raw = torch.stack([g.reshape(16, -1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    assert bool((raw > clip).all())
    clipped = raw * clip_factors(grads, clip)
    assert torch.allclose(clipped, torch.full_like(clipped, clip), rtol=1e-4)
    dp = DPSGD(PrivacyConfig(0.0, clip, "poisson", None), 0, len(agent.private_y), 32)
    with_all, _ = dp.private_gradient(agent.model, x, y, normaliser=1.0)
    without_last, _ = dp.private_gradient(agent.model, x[:-1], y[:-1], normaliser=1.0)
    assert float((_flat(with_all) - _flat(without_last)).norm()) <= clip * (1 + 1e-4)


def test_noise_has_std_sigma_times_clip_over_the_expected_batch(experiment: Experiment) -> None:
    agent = _agent(experiment, None)
    sigma, clip, normaliser = 1.5, 0.7, 4.0
    dp = DPSGD(PrivacyConfig(sigma, clip, "poisson", None), 0, len(agent.private_y), 32)
    noise, _ = dp.private_gradient(agent.model, agent.private_x[:0], agent.private_y[:0], normaliser)  # no sample
    assert dp.reach is not None
    values = _flat({name: g[dp.reach[name]] for name, g in noise.items() if name in dp.reach})
    assert values.numel() > 10_000
    assert abs(float(values.std()) / (sigma * clip / normaliser) - 1) < 0.02
    assert abs(float(values.mean())) < 0.02 * sigma * clip / normaliser
    assert dp.steps == 1  # an empty batch is a step of the mechanism all the same


def _unreached(noise: dict[str, torch.Tensor], reach: dict[str, torch.Tensor]) -> torch.Tensor:
    """The coordinates outside `reach`, flattened."""
    return torch.cat([g[~reach[name]] if name in reach else g.reshape(-1) for name, g in noise.items()])


def test_only_the_coordinates_the_private_loss_reaches_are_noised() -> None:
    """Aux heads' rows and the projection get an exact 0 (their CE gradient is 0 for every sample); the main
    head's rows and every backbone coordinate are noised. The accountant's assumption is unchanged: one
    sample moves the released sum by at most C, all of it inside the noised coordinates."""
    experiment = build_experiment(make_config(*SERIAL, "method.nu_emb=1.0"))
    agent = _agent(experiment, None)
    model, classes = agent.model, agent.model.num_classes
    dp = DPSGD(PrivacyConfig(2.0, 1.0, "poisson", None), 0, len(agent.private_y), 32)
    noise, _ = dp.private_gradient(model, agent.private_x[:0], agent.private_y[:0], 1.0)
    reach = dp.reach
    assert reach is not None and "projection.weight" not in reach and "projection.bias" not in reach
    assert bool(reach["heads.weight"][:classes].all()) and not bool(reach["heads.weight"][classes:].any())
    assert bool(reach["heads.bias"][:classes].all()) and not bool(reach["heads.bias"][classes:].any())
    backbone = [name for name, _ in model.named_parameters() if name.startswith("backbone.")]
    assert backbone and all(bool(reach[name].all()) for name in backbone)  # whatever their values
    assert bool((_unreached(noise, reach) == 0).all())
    assert bool((noise["heads.weight"][:classes] != 0).all()) and bool((noise["backbone.embed.weight"] != 0).all())
    # structurally zero: the per-sample gradients of real samples vanish exactly where no noise goes
    x, y = agent.private_x[:16], agent.private_y[:16]
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads, _ = per_sample_gradients(model, params, x, y)
    assert bool((grads["heads.weight"][:, :classes] != 0).any())
    for name, g in grads.items():
        outside = g.reshape(16, -1)[:, ~reach[name].reshape(-1)] if name in reach else g
        assert bool((outside == 0).all()), name
    clip = 0.05
    exact = DPSGD(PrivacyConfig(0.0, clip, "poisson", None), 0, len(agent.private_y), 32)
    with_all, _ = exact.private_gradient(model, x, y, normaliser=1.0)
    without_last, _ = exact.private_gradient(model, x[:-1], y[:-1], normaliser=1.0)
    change = {name: with_all[name] - without_last[name] for name in with_all}
    assert bool((_unreached(change, reach) == 0).all())
    assert 0 < float(_flat(change).norm()) <= clip * (1 + 1e-4)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with sensitivity/std ratio mu (Balle & Wang 2018, Thm 8)."""

    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return float(brentq(excess, 0.0, 100.0))


def test_accountants_match_the_exact_epsilon_of_full_batch_composition() -> None:
    """With q = 1, T steps of noise sigma are one Gaussian mechanism with mu = sqrt(T) / sigma: its exact
    epsilon is known. PRV must match it closely; RDP must bound it from above, not far off."""
    sigma, steps, delta = 2.0, 16, 1e-5
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    assert abs(prv_epsilon(sigma, 1.0, steps, delta) / exact - 1) < 0.02
    assert exact <= rdp_epsilon(sigma, 1.0, steps, delta) < 1.25 * exact


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    q, delta = 32 / 190, 1e-5
    by_steps = [rdp_epsilon(1.0, q, steps, delta) for steps in (0, 2, 8, 32)]
    assert by_steps[0] == 0 and by_steps == sorted(by_steps) and len(set(by_steps)) == 4
    assert rdp_epsilon(2.0, q, 32, delta) < rdp_epsilon(1.0, q, 32, delta)
    assert math.isinf(rdp_epsilon(0.0, q, 32, delta))


def test_no_noise_no_clipping_and_shuffled_batches_equal_the_non_private_step(experiment: Experiment) -> None:
    """The privatised step with its mechanism switched off is the ordinary MHD step (to float rounding)."""
    plain = _agent(experiment, None)
    private = _agent(experiment, PrivacyConfig(0.0, None, "shuffle", None))
    inbox = [Agent(spec, experiment.public, PLAIN_CPU).predict(0) for spec in experiment.specs[1:]]
    for round_idx in range(2):
        losses = plain.train_round(round_idx, inbox), private.train_round(round_idx, inbox)
        assert losses[0].keys() <= losses[1].keys() and "loss/kl_aux1" in losses[1] or round_idx == 1
        for name, value in losses[0].items():
            assert losses[1][name] == pytest.approx(value, rel=1e-5)
    for p, q in zip(plain.model.parameters(), private.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_privacy_none_leaves_the_agent_as_it_was(experiment: Experiment) -> None:
    agent = _agent(experiment, None)
    assert experiment.privacy is None and all(spec.privacy is None for spec in experiment.specs)
    assert agent.dp is None and "privacy" not in agent.state_dict()
    assert "privacy/steps" not in agent.train_round(0, [])


def test_accountant_state_survives_a_checkpoint(experiment: Experiment) -> None:
    """A restored agent continues with the same step count and noise stream: the same weights as uninterrupted."""
    config = PrivacyConfig(1.0, 1.0, "poisson", None)
    first, second = _agent(experiment, config), _agent(experiment, config)
    first.train_round(0, [])
    state = copy.deepcopy(first.state_dict())  # a checkpoint file, not views of the live tensors
    first.train_round(1, [])
    second.load_state_dict(state)
    assert second.dp is not None and second.dp.steps == experiment.specs[0].train.local_steps
    second.train_round(1, [])
    assert first.dp is not None and second.dp.steps == first.dp.steps
    for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_calibrated_noise_meets_the_target_at_the_planned_end() -> None:
    target = 6.0
    experiment = build_experiment(
        make_config(*DP, "privacy.noise_multiplier=null", f"privacy.target_epsilon={target}", "rounds=5")
    )
    plan = experiment.privacy
    assert plan is not None
    steps = experiment.settings.rounds * plan.local_steps
    for spec in experiment.specs:
        assert spec.privacy is not None and spec.privacy.max_steps == steps
        epsilon = plan.epsilon(spec.agent_id, steps)
        assert epsilon is not None and target - 0.1 <= epsilon <= target


@pytest.mark.parametrize("policy", ["stop_sharing", "stop_run"])
def test_a_budget_stops_the_agents_or_the_run_before_it_is_passed(tmp_path: Path, policy: str) -> None:
    # sigma 1, q ~ 0.17, 2 steps a round: epsilon ~3.2 after one round, ~3.8 after two, ~4.3 after three
    cfg = make_config(
        *DP, "rounds=4", "eval_every=1", "privacy.target_epsilon=4", f"privacy.on_budget_exhausted={policy}"
    )
    summary = run(cfg, tmp_path)
    privacy = summary["privacy"]
    assert all(0 < epsilon <= 4 for epsilon in privacy["epsilon"].values())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    maxima = [line["privacy/epsilon_max"] for line in lines]
    assert maxima[0] < maxima[1]  # grows while agents train
    if policy == "stop_run":
        assert summary["rounds"] == privacy["rounds"] == 2 and privacy["planned_rounds"] == 4
        assert privacy["stopped_sharing"] == []
        assert privacy_line(privacy).endswith("run stopped after 2 of 4 rounds")
    else:
        assert summary["rounds"] == 4 and maxima[1] == maxima[2] == maxima[3]  # nothing spent once stopped
        assert privacy["stopped_sharing"] == [0, 1, 2, 3] and lines[1]["privacy"]["stopped_sharing"] == []
        rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
        assert [r["comm/bytes"] > 0 for r in rounds] == [True, True, False, False]
        assert privacy_line(privacy).endswith("stopped sharing: agents 0, 1, 2, 3")
    assert "epsilon" in privacy_section(summary)[-1]  # the report's per-agent table


BAD_WITHOUT_DATA = [
    (["privacy.target_epsilon=0"], "privacy.target_epsilon"),
    (["privacy.target_epsilon=-1"], "privacy.target_epsilon"),
    (["privacy.delta=1"], "privacy.delta"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier"),
    (["privacy.noise_multiplier=null"], "privacy.noise_multiplier"),
    (["privacy.clip_norm=null"], "privacy.clip_norm"),
    (["privacy.clip_norm=0"], "privacy.clip_norm"),
    (["privacy.accountant=gdp"], "privacy.accountant"),
    (["privacy.sampling=shuffle", "privacy.target_epsilon=4"], "privacy.sampling"),
    (["privacy.on_budget_exhausted=ignore"], "privacy.on_budget_exhausted"),
    (["method=fedavg"], "method"),
    (["method=central"], "method"),
    (["runtime.vectorize=true"], "runtime.vectorize"),
    (["runtime.bf16=true"], "runtime.bf16"),
    (["runtime.compile=true"], "runtime.compile"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_WITHOUT_DATA)
def test_bad_settings_are_one_line_errors_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_config(make_config(*DP, *overrides))
    assert error.value.key == key and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["backbone=resnet8"], "backbone.norm"),  # batch norm by default
        (["backbone=hypertransformer"], "backbone"),  # reads a private support set
        (["privacy.delta=0.01"], "privacy.delta"),  # not below 1 / n of a ~190-sample shard
        (["privacy.target_epsilon=1", "privacy.on_budget_exhausted=stop_run"], "privacy.target_epsilon"),
    ],
)
def test_settings_that_need_the_data_are_rejected_before_any_work(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_experiment(make_config(*DP, *overrides))
    assert error.value.key == key and "\n" not in str(error.value)


def test_group_norm_and_plain_backbones_are_accepted() -> None:
    experiment = build_experiment(make_config(*DP, "backbone=resnet8", "backbone.norm=group"))
    assert experiment.privacy is not None
    assert {spec.privacy for spec in experiment.specs} == {PrivacyConfig(1.0, 10.0, "poisson", None)}
    assert np.isclose(experiment.privacy.agents[0].sample_rate, 32 / len(experiment.specs[0].private_y))


def test_privacy_train_sets_dp_sgds_own_steps_batches_and_optimizer() -> None:
    """privacy.train overrides train.* for DP-SGD only: q and the calibration follow it; privacy=none ignores it."""
    overrides = ["privacy.train.batch_size=64", "privacy.train.local_steps=3", "privacy.train.optimizer.lr=0.01"]
    experiment = build_experiment(make_config(*DP, *overrides))
    plan = experiment.privacy
    assert plan is not None and plan.local_steps == 3
    for spec in experiment.specs:
        assert (spec.train.batch_size, spec.train.local_steps, spec.train.optimizer["lr"]) == (64, 3, 0.01)
        assert spec.train.optimizer["momentum"] == make_config().train.optimizer.momentum  # kept: null
        assert np.isclose(plan.agents[spec.agent_id].sample_rate, 64 / len(spec.private_y))
    plain = build_experiment(make_config(*SERIAL))
    assert {spec.train for spec in plain.specs} == set(plain.settings.agent_train)
