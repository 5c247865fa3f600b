"""The `privacy` config group: checks, noise calibration, budgets and accounting (docs/privacy.md).

`privacy=none` changes nothing. `privacy=dp_sgd` gives every agent a `PrivacyConfig`
(agents/privacy.py): its noise multiplier (configured, or calibrated per agent so that its
epsilon after the planned rounds meets `target_epsilon`), the clip norm, the sampling, and the
number of private steps its budget allows. Accounting is Opacus's (RDP or PRV) for the Poisson
subsampled Gaussian mechanism with sample rate q_i = batch_size / n_i, composed over the agent's
private steps; it runs here, in the driver, from the step counts the agents report (their
accountant state, which their checkpoints carry).

Everything here is decided before any worker starts: a combination that DP-SGD does not cover
is a one-line ConfigError, and a budget that `on_budget_exhausted=stop_run` would end early
shortens the run to its last round within budget.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from agents.agent import AgentSpec, TrainConfig
from agents.model import ModelConfig, MultiHeadModel
from agents.privacy import SAMPLERS, PrivacyConfig
from sim.core.config import plain_dict
from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.core.validation import boolean, non_negative_number, positive_int, positive_number
from sim.experiment.optimizer import check_optimizer
from sim.experiment.output_privacy import (
    OUTPUT_CHECKS,
    OutputPrivacyPlan,
    OutputSettings,
    check_output_privacy,
    plan_output_privacy,
)

DP_METHODS = ("mhd", "mean_teacher", "isolated")
"""Methods whose agents train with the Agent's own step and share predictions or nothing."""

BUDGET_POLICIES = ("stop_sharing", "stop_run")
ACCOUNTED_SAMPLING = "poisson"  # the only sampling the accountants analyse


@dataclass(frozen=True)
class DPSettings:
    """`privacy=dp_sgd` as configured, checked without data."""

    noise_multiplier: float | None  # None: calibrated from target_epsilon
    target_epsilon: float | None
    delta: float
    clip_norm: float | None
    accountant: str
    sampling: str
    on_budget_exhausted: str
    train: dict[str, Any] = field(default_factory=dict, hash=False)  # privacy.train: DP-SGD's own train keys


TRAIN_KEYS = ("local_steps", "batch_size", "optimizer")
"""The train keys privacy.train may set for DP-SGD: they decide q, the step count and the step size, which
DP-SGD wants tuned apart from non-private training (docs/privacy.md#tuning)."""


EpsilonFunction = Callable[[float, float, int, float], float]  # (sigma, q, steps, delta) -> epsilon
ACCOUNTANTS: Registry[EpsilonFunction] = Registry("privacy.accountant")


@ACCOUNTANTS.register("rdp")
@lru_cache(maxsize=4096)
def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019) for `steps` steps."""
    from opacus.accountants import RDPAccountant

    return _epsilon(RDPAccountant(), sigma, sample_rate, steps, delta)


@ACCOUNTANTS.register("prv")
@lru_cache(maxsize=4096)
def prv_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's PRV accountant (Gopi, Lee, Wutschitz 2021): tighter than RDP, slower (~1 s a call)."""
    from opacus.accountants import PRVAccountant

    return _epsilon(PRVAccountant(), sigma, sample_rate, steps, delta)


def _epsilon(accountant: Any, sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    accountant.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def calibrated_noise(target: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to Opacus's 0.01 tolerance) whose epsilon after `steps` is <= target."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


def check_privacy(
    privacy: DictConfig | None, method: DictConfig, runtime: DictConfig
) -> DPSettings | OutputSettings | None:
    """The privacy group checked without data: None for privacy=none, else the mechanism's settings.

    Raises ConfigError for a bad value or a combination the mechanism here does not cover.
    """
    if privacy is None or privacy.name == "none":
        return None
    if privacy.name in OUTPUT_CHECKS:  # noisy_probs, randomized_response (sim/experiment/output_privacy.py)
        return check_output_privacy(str(privacy.name), plain_dict(privacy), method)
    if privacy.name != "dp_sgd":
        raise ConfigError("privacy", privacy.name, f"none, dp_sgd or one of {', '.join(OUTPUT_CHECKS.names())}")
    method_name = str(method.name)
    try:
        import opacus  # noqa: F401  (the accountants; imported where they run)
    except ImportError:
        raise ConfigError(
            "privacy", "dp_sgd", "installed Opacus for its accountants: pip install 'mhd-sim[privacy]'"
        ) from None
    settings = _dp_settings(plain_dict(privacy))
    if method_name not in DP_METHODS:
        raise ConfigError(
            "method",
            method_name,
            f"{', '.join(DP_METHODS)} under privacy=dp_sgd (central pools everyone's data; fedavg and gossip "
            "share weights: DP-SGD is not implemented for them)",
        )
    for switch, why in RUNTIME_CONFLICTS.items():
        if boolean(f"runtime.{switch}", runtime[switch]):
            raise ConfigError(f"runtime.{switch}", True, f"false under privacy=dp_sgd ({why})")
    return settings


RUNTIME_CONFLICTS = {
    "vectorize": "the vmapped group runs its own step, without per-sample clipping or noise",
    "bf16": "the per-sample gradients are computed in float32 and the DP step does not autocast",
    "compile": "the DP step is not tested with torch.compile",
}


def _dp_settings(params: dict[str, Any]) -> DPSettings:
    noise = params["noise_multiplier"]
    target = params["target_epsilon"]
    delta = params["delta"]
    clip = params["clip_norm"]
    accountant = str(params["accountant"])
    sampling = str(params["sampling"])
    policy = str(params["on_budget_exhausted"])
    ACCOUNTANTS.get(accountant)
    SAMPLERS.get(sampling)
    if policy not in BUDGET_POLICIES:
        raise ConfigError("privacy.on_budget_exhausted", policy, f"one of {', '.join(BUDGET_POLICIES)}")
    noise = None if noise is None else non_negative_number("privacy.noise_multiplier", noise)
    target = None if target is None else positive_number("privacy.target_epsilon", target)
    if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta < 1:
        raise ConfigError("privacy.delta", delta, "a number in (0, 1), far below 1 / (samples of a shard)")
    clip = None if clip is None else positive_number("privacy.clip_norm", clip)
    if noise is None and target is None:
        raise ConfigError(
            "privacy.noise_multiplier", None, "a number >= 0, or set privacy.target_epsilon to calibrate it"
        )
    if clip is None and noise != 0:
        raise ConfigError(
            "privacy.clip_norm", None, "a number > 0 (without clipping no noise bounds a sample's influence)"
        )
    if target is not None and sampling != ACCOUNTED_SAMPLING:
        raise ConfigError(
            "privacy.sampling",
            sampling,
            f"{ACCOUNTED_SAMPLING} with privacy.target_epsilon (no accountant covers {sampling})",
        )
    if target is not None and noise == 0:
        raise ConfigError(
            "privacy.noise_multiplier", 0, "> 0 with privacy.target_epsilon (no noise: no finite epsilon)"
        )
    return DPSettings(noise, target, float(delta), clip, accountant, sampling, policy, _train_overrides(params))


def _train_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """privacy.train without its null entries (null: keep train's value); ConfigError for an unknown key."""
    overrides = params.get("train") or {}  # a config from before privacy.train: none
    if not isinstance(overrides, dict):
        raise ConfigError("privacy.train", overrides, f"a mapping with keys among {', '.join(TRAIN_KEYS)}")
    found: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in TRAIN_KEYS:
            raise ConfigError(f"privacy.train.{key}", value, f"a key among {', '.join(TRAIN_KEYS)}")
        if value is None:
            continue
        if key == "optimizer":
            if not isinstance(value, dict) or "_target_" in value:
                raise ConfigError("privacy.train.optimizer", value, "a mapping of kwargs of train.optimizer's class")
            value = {name: kwarg for name, kwarg in value.items() if kwarg is not None}
            if not value:
                continue
        else:
            value = positive_int(f"privacy.train.{key}", value)
        found[key] = value
    return found


def dp_train(train: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """`train` with privacy.train's overrides: the optimizer's kwargs merged, the step and batch counts replaced."""
    optimizer = {**train.optimizer, **overrides.get("optimizer", {})}
    if optimizer != train.optimizer:
        check_optimizer(optimizer, "privacy.train.optimizer")
    counts = {key: overrides[key] for key in ("local_steps", "batch_size") if key in overrides}
    return replace(train, optimizer=optimizer, **counts)


@dataclass(frozen=True)
class AgentBudget:
    """One agent's mechanism: its noise, its sample rate and how many rounds its budget allows."""

    noise_multiplier: float
    sample_rate: float  # q = batch_size / n (1 when the shard is smaller than a batch)
    shard_size: int
    max_rounds: int  # rounds of private steps within target_epsilon (all planned rounds without a target)


@dataclass(frozen=True)
class PrivacyPlan:
    """What the driver knows about every agent's privacy: for the specs, the console and the reports."""

    settings: DPSettings
    agents: dict[int, AgentBudget]
    local_steps: int
    planned_rounds: int  # as configured
    rounds: int  # as run: fewer when on_budget_exhausted=stop_run ends it early

    @property
    def accounted(self) -> bool:
        """Whether an epsilon is reported: Poisson sampling (the shuffled batches are not analysed)."""
        return self.settings.sampling == ACCOUNTED_SAMPLING

    def config_for(self, agent_id: int) -> PrivacyConfig:
        budget = self.agents[agent_id]
        max_steps = None if self.settings.target_epsilon is None else budget.max_rounds * self.local_steps
        return PrivacyConfig(budget.noise_multiplier, self.settings.clip_norm, self.settings.sampling, max_steps)

    def epsilon(self, agent_id: int, steps: int) -> float | None:
        """The agent's epsilon at `delta` after `steps` private steps; None when not accounted or infinite."""
        if not self.accounted:
            return None
        budget = self.agents[agent_id]
        value = ACCOUNTANTS.get(self.settings.accountant)(
            budget.noise_multiplier, budget.sample_rate, steps, self.settings.delta
        )
        return None if math.isinf(value) else value

    def record(self, metrics: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
        """The evaluation's privacy numbers: per agent epsilon and whether it still shares, plus scalars for charts."""
        epsilons = {str(agent): self.epsilon(agent, int(m["privacy/steps"])) for agent, m in sorted(metrics.items())}
        stopped = [agent for agent, m in sorted(metrics.items()) if not m["privacy/sharing"]]
        known = [value for value in epsilons.values() if value is not None]
        scalars = (
            {} if not known else {"privacy/epsilon_max": max(known), "privacy/epsilon_mean": sum(known) / len(known)}
        )
        return {
            **scalars,
            "privacy/agents_stopped": len(stopped),
            "privacy": {"delta": self.settings.delta, "epsilon": epsilons, "stopped_sharing": stopped},
        }

    def summary(self, last: Mapping[str, Any]) -> dict[str, Any]:
        """summary.json's `privacy` block: the mechanism, the guarantee, and each agent's final epsilon."""
        settings = self.settings
        noises = sorted({budget.noise_multiplier for budget in self.agents.values()})
        final = last.get("privacy", {})
        return {
            "privacy": {
                "mechanism": "dp_sgd",
                "guarantee": self.guarantee(),
                "delta": settings.delta,
                "accountant": settings.accountant if self.accounted else None,
                "sampling": settings.sampling,
                "clip_norm": settings.clip_norm,
                "noise_multiplier": noises[0]
                if len(noises) == 1
                else {str(agent): budget.noise_multiplier for agent, budget in self.agents.items()},
                "target_epsilon": settings.target_epsilon,
                "on_budget_exhausted": settings.on_budget_exhausted,
                "train": settings.train,
                "planned_rounds": self.planned_rounds,
                "rounds": self.rounds,
                "epsilon": final.get("epsilon"),
                "stopped_sharing": final.get("stopped_sharing", []),
                "budget_rounds": {str(agent): budget.max_rounds for agent, budget in self.agents.items()},
            }
        }

    def guarantee(self) -> str:
        if not self.accounted:
            return "none claimed: shuffled batches are not covered by the accountant (privacy.sampling=shuffle)"
        if all(budget.noise_multiplier == 0 for budget in self.agents.values()):
            return "none: noise_multiplier=0"
        return (
            f"each agent's whole output stream is (epsilon_i, {self.settings.delta:g})-DP with respect to adding or "
            "removing one of its private samples (docs/privacy.md)"
        )

    def notices(self) -> list[str]:
        """Console lines for the start of the run: the mechanism, and every budget that ends sharing or the run."""
        settings = self.settings
        noises = [budget.noise_multiplier for budget in self.agents.values()]
        rates = [budget.sample_rate for budget in self.agents.values()]
        lines = [
            f"privacy=dp_sgd: clip_norm={settings.clip_norm} noise_multiplier={_span(noises)} "
            f"sampling={settings.sampling} (q={_span(rates)}) delta={settings.delta:g}"
        ]
        if settings.train:  # what privacy.train changed: the run does not train as train.* says
            lines.append(f"privacy=dp_sgd trains with privacy.train={settings.train} over train.*")
        if not self.accounted:
            lines.append("privacy: no epsilon is reported: shuffled batches are not covered by the accountant")
        for agent, budget in sorted(self.agents.items()):
            if budget.max_rounds < self.planned_rounds and settings.on_budget_exhausted == "stop_sharing":
                lines.append(
                    f"privacy: agent {agent} stops sharing after round {budget.max_rounds} "
                    f"(target_epsilon={settings.target_epsilon:g} would be passed in round {budget.max_rounds + 1})"
                )
        if self.rounds < self.planned_rounds:
            lines.append(
                f"privacy: the run stops after {self.rounds} of {self.planned_rounds} rounds: "
                f"target_epsilon={settings.target_epsilon:g} would be passed (on_budget_exhausted=stop_run)"
            )
        return lines


def _span(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3g}" if low == high else f"{low:.3g}-{high:.3g}"


def plan_privacy(
    settings: DPSettings | OutputSettings | None, specs: Sequence[AgentSpec], rounds: int, public_batch_size: int
) -> tuple[list[AgentSpec], PrivacyPlan | OutputPrivacyPlan | None]:
    """The specs with their PrivacyConfig, and the plan; unchanged specs and None for privacy=none.

    An output mechanism (privacy=noisy_probs, randomized_response) is planned by
    sim/experiment/output_privacy.py instead.

    Raises ConfigError for a backbone without per-sample gradients, a delta not far below
    1/n, or a budget that not even one round fits under on_budget_exhausted=stop_run.
    """
    if settings is None:
        return list(specs), None
    if isinstance(settings, OutputSettings):
        return plan_output_privacy(settings, list(specs), rounds, public_batch_size)
    specs = [replace(spec, train=dp_train(spec.train, settings.train)) for spec in specs]
    for model in dict.fromkeys(spec.model for spec in specs):
        check_backbone(model)
    largest = max(specs, key=lambda spec: len(spec.private_y))
    if settings.delta >= 1 / len(largest.private_y):
        raise ConfigError(
            "privacy.delta",
            settings.delta,
            f"below 1/n = {1 / len(largest.private_y):.3g} (agent {largest.agent_id} holds {len(largest.private_y)} "
            "samples): a larger delta allows releasing a sample outright",
        )
    local_steps = specs[0].train.local_steps
    budgets = {spec.agent_id: _budget(settings, spec, rounds) for spec in specs}
    run_rounds = rounds
    if settings.on_budget_exhausted == "stop_run" and settings.target_epsilon is not None:
        run_rounds = min(budget.max_rounds for budget in budgets.values())
        if run_rounds == 0:
            raise ConfigError(
                "privacy.target_epsilon",
                settings.target_epsilon,
                "a budget that allows at least one round for every agent (raise it or privacy.noise_multiplier)",
            )
    plan = PrivacyPlan(settings, budgets, local_steps, rounds, run_rounds)
    return [replace(spec, privacy=plan.config_for(spec.agent_id)) for spec in specs], plan


def _budget(settings: DPSettings, spec: AgentSpec, rounds: int) -> AgentBudget:
    """The agent's noise (configured or calibrated) and the last round its target epsilon allows."""
    n = len(spec.private_y)
    rate = min(1.0, spec.train.batch_size / n)
    steps_per_round = spec.train.local_steps
    noise = settings.noise_multiplier
    if noise is None:
        assert settings.target_epsilon is not None  # checked in _dp_settings
        noise = calibrated_noise(
            settings.target_epsilon, settings.delta, rate, rounds * steps_per_round, settings.accountant
        )
    target = settings.target_epsilon
    if target is None:
        return AgentBudget(noise, rate, n, rounds)
    epsilon = ACCOUNTANTS.get(settings.accountant)
    low, high = 0, rounds  # the largest round count r with epsilon(r * steps) <= target: epsilon grows with r
    while low < high:
        middle = (low + high + 1) // 2
        if epsilon(noise, rate, middle * steps_per_round, settings.delta) <= target:
            low = middle
        else:
            high = middle - 1
    return AgentBudget(noise, rate, n, low)


def check_backbone(model: ModelConfig) -> None:
    """ConfigError for a backbone that has no per-sample gradients: batch norm, or a private support set."""
    with torch.random.fork_rng(devices=[]):  # the agents seed their own models; the global stream stays as it was
        built = MultiHeadModel(model)
    if built.backbone.support_size > 0:
        raise ConfigError(
            "backbone",
            model.backbone,
            "a backbone without a support set under privacy=dp_sgd (its support samples would bypass the clipping)",
        )
    if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in built.modules()):
        key, value = (
            ("backbone.norm", model.backbone_params["norm"])
            if "norm" in model.backbone_params
            else (
                "backbone",
                model.backbone,
            )
        )
        raise ConfigError(
            key,
            value,
            "group (GroupNorm), or a backbone without batch norm such as small_cnn, under privacy=dp_sgd "
            "(batch norm mixes samples: no per-sample gradient, and its running statistics are not noised)",
        )


def privacy_group(cfg: DictConfig) -> DictConfig | None:
    """cfg.privacy, or None for a config from before the group existed (a resumed old run)."""
    node = cfg.get("privacy")
    return node if isinstance(node, DictConfig) else None
