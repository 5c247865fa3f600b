"""Output-side privacy (`privacy=noisy_probs`, `privacy=randomized_response`): checks, calibration, accounting.

The mechanisms (agents/output_privacy.py) randomise each released value: one head's prediction
on one public sample. Each release is epsilon_0-LDP (Laplace, randomized response) or
mu_0-GDP (Gaussian) with respect to ANY two values of the sender's prediction, and so with
respect to any two private shards: it protects the message, not one training sample. An
agent's messages compose over every release: heads x public batch per message, one message per
round. The accounting here reports, at the configured delta:

- Gaussian: exact composition in Gaussian DP (Dong, Roth, Su 2019): k releases of mu_0 are
  sqrt(k) mu_0-GDP, converted to (epsilon, delta) exactly (Balle & Wang 2018);
- Laplace and randomized response (pure epsilon_0): the smaller of basic composition k epsilon_0
  and advanced composition (Dwork, Rothblum, Vadhan 2010)
  epsilon_0 sqrt(2 k ln(1/delta)) + k epsilon_0 (e^epsilon_0 - 1).

Both are upper bounds on what a receiver of every message can learn about the sender's whole
shard (or about anything else its predictions depend on). Over a run they are large: that is
the honest price of protecting every message against any change of the data, with no sampling
to amplify it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from omegaconf import DictConfig

from agents.agent import AgentSpec
from agents.output_privacy import NOISE, OutputPrivacyConfig
from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.core.validation import positive_number

OUTPUT_METHODS = ("mhd", "mean_teacher")
"""Methods whose agents publish predictions; isolated publishes nothing, the others share weights or data."""

L1_SENSITIVITY = 2.0  # largest L1 distance of two probability vectors
L2_SENSITIVITY = math.sqrt(2.0)  # largest L2 distance of two probability vectors


@dataclass(frozen=True)
class OutputSettings:
    """An output mechanism as configured, checked without data."""

    mechanism: str  # privacy.name: noisy_probs | randomized_response
    noise: str  # noisy_probs: gaussian | laplace; randomized_response: "none"
    epsilon: float  # per release (one head, one public sample)
    delta: float  # gaussian: the per-release delta it is calibrated to; every mechanism: the delta of the totals


def _probability(key: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise ConfigError(key, value, "a number in (0, 1)")
    return float(value)


Check = Callable[[dict[str, Any], DictConfig], OutputSettings]
OUTPUT_CHECKS: Registry[Check] = Registry("privacy")


@OUTPUT_CHECKS.register("noisy_probs")
def check_noisy_probs(params: dict[str, Any], method: DictConfig) -> OutputSettings:
    del method  # any codec carries a distribution (topk keeps its k largest entries)
    noise = str(params["noise"])
    if noise not in NOISE:
        raise ConfigError("privacy.noise", noise, f"one of {', '.join(NOISE.names())}")
    epsilon = positive_number("privacy.epsilon", params["epsilon"])
    return OutputSettings("noisy_probs", noise, epsilon, _probability("privacy.delta", params["delta"]))


@OUTPUT_CHECKS.register("randomized_response")
def check_randomized_response(params: dict[str, Any], method: DictConfig) -> OutputSettings:
    codec, topk = str(method.get("message_codec")), method.get("message_topk")
    if codec != "topk":
        raise ConfigError(
            "method.message_codec", codec, "topk (with method.message_topk=1) under privacy=randomized_response"
        )
    if topk != 1:
        raise ConfigError("method.message_topk", topk, "1 under privacy=randomized_response (the message is a label)")
    epsilon = positive_number("privacy.epsilon", params["epsilon"])
    return OutputSettings("randomized_response", "none", epsilon, _probability("privacy.delta", params["delta"]))


def check_output_privacy(name: str, params: dict[str, Any], method: DictConfig) -> OutputSettings:
    """An output mechanism's settings; ConfigError for a bad value or a method it does not fit."""
    method_name = str(method.name)
    if method_name not in OUTPUT_METHODS:
        raise ConfigError(
            "method",
            method_name,
            f"{' or '.join(OUTPUT_METHODS)} under privacy={name} (the other methods publish no predictions)",
        )
    nu_emb = method.get("nu_emb", 0.0)
    if nu_emb:
        raise ConfigError("method.nu_emb", nu_emb, f"0 under privacy={name} (embeddings would be sent without noise)")
    return OUTPUT_CHECKS.get(name)(params, method)


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The exact delta(epsilon) of a mu-GDP mechanism (Balle & Wang 2018, Theorem 8).

    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), the second term in log space: over a run,
    epsilon reaches thousands, where e^eps alone overflows.
    """
    from scipy.special import log_ndtr  # here, not at the top: scipy.special costs every run ~0.15 s at start

    first = float(log_ndtr(-epsilon / mu + mu / 2))
    second = epsilon + float(log_ndtr(-epsilon / mu - mu / 2))
    return math.exp(first) - math.exp(second) if second < first else 0.0


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with gaussian_delta(epsilon, mu) <= delta (bisection; delta falls with epsilon)."""
    low, high = 0.0, 1.0
    while gaussian_delta(high, mu) > delta:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if gaussian_delta(middle, mu) > delta else (low, middle)
    return high


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The largest mu whose mechanism is (epsilon, delta)-DP (delta grows with mu)."""
    low, high = 0.0, 1.0
    while gaussian_delta(epsilon, high) <= delta:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if gaussian_delta(epsilon, middle) <= delta else (low, middle)
    return low


def pure_composition(epsilon: float, releases: int, delta: float) -> float:
    """min(basic, advanced) composition of `releases` epsilon-DP releases, at delta (advanced only)."""
    basic = releases * epsilon
    advanced = epsilon * math.sqrt(2 * releases * math.log(1 / delta)) + releases * epsilon * math.expm1(epsilon)
    return min(basic, advanced)


@dataclass(frozen=True)
class OutputPrivacyPlan:
    """Every agent's output mechanism and the accounting of what its messages reveal."""

    settings: OutputSettings
    scale: float  # noise std (gaussian) or b (laplace); 0 for randomized response
    releases_per_message: int  # heads x public batch size
    planned_rounds: int
    rounds: int

    def config(self) -> OutputPrivacyConfig:
        settings = self.settings
        return OutputPrivacyConfig(settings.mechanism, settings.noise, self.scale, settings.epsilon)

    def epsilon(self, messages: int) -> float:
        """The sender's epsilon at `delta` after `messages` messages: the composition over all their releases."""
        releases = messages * self.releases_per_message
        if releases == 0:
            return 0.0
        settings = self.settings
        if settings.noise == "gaussian":
            return gaussian_epsilon(math.sqrt(releases) * L2_SENSITIVITY / self.scale, settings.delta)
        return pure_composition(settings.epsilon, releases, settings.delta)

    def record(self, metrics: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
        """Each agent's composed epsilon after the messages it released so far, and the scalars for charts."""
        messages = {agent: int(m.get("privacy/messages", 0)) for agent, m in sorted(metrics.items())}
        epsilons = {str(agent): self.epsilon(count) for agent, count in messages.items()}
        values = list(epsilons.values())
        return {
            "privacy/epsilon_max": max(values),
            "privacy/epsilon_mean": sum(values) / len(values),
            "privacy/epsilon_per_message": self.epsilon(1),
            "privacy/agents_stopped": 0,
            "privacy": {"delta": self.settings.delta, "epsilon": epsilons, "stopped_sharing": []},
        }

    def summary(self, last: Mapping[str, Any]) -> dict[str, Any]:
        settings = self.settings
        final = last.get("privacy", {})
        return {
            "privacy": {
                "mechanism": settings.mechanism,
                "guarantee": self.guarantee(),
                "noise": settings.noise,
                "scale": self.scale,
                "delta": settings.delta,
                "epsilon_per_release": settings.epsilon,
                "releases_per_message": self.releases_per_message,
                "epsilon_per_message": self.epsilon(1),
                "composition": self.composition(),
                "epsilon": final.get("epsilon"),
                "stopped_sharing": [],
                "planned_rounds": self.planned_rounds,
                "rounds": self.rounds,
            }
        }

    def composition(self) -> str:
        if self.settings.noise == "gaussian":
            return "exact Gaussian-DP composition over every release"
        return "min(basic, advanced) composition over every release"

    def guarantee(self) -> str:
        settings = self.settings
        unit = "predicted label" if settings.mechanism == "randomized_response" else "probability vector"
        return (
            f"each released {unit} (one head, one public sample) is ({settings.epsilon:g}"
            f"{', ' + format(settings.delta, 'g') if settings.noise == 'gaussian' else ', 0'})-local DP with respect "
            "to any two values of the sender's prediction, hence any two private shards; it protects the messages, "
            "not one training sample, and composes over heads, public samples and rounds (docs/privacy.md)"
        )

    def notices(self) -> list[str]:
        settings = self.settings
        return [
            f"privacy={settings.mechanism}: epsilon {settings.epsilon:g} per release "
            f"({self.releases_per_message} releases a message: epsilon {self.epsilon(1):.3g} a message, "
            f"{self.epsilon(max(self.rounds - 1, 0)):.3g} over the run's messages at delta={settings.delta:g}); "
            "local DP of the messages, not DP-SGD's per-sample guarantee"
        ]


def scale_for(settings: OutputSettings) -> float:
    """The noise scale that makes one release (epsilon, delta)-DP: b = 2 / epsilon, or the exact Gaussian std."""
    if settings.noise == "laplace":
        return L1_SENSITIVITY / settings.epsilon
    if settings.noise == "gaussian":
        return L2_SENSITIVITY / gaussian_mu(settings.epsilon, settings.delta)
    return 0.0


def plan_output_privacy(
    settings: OutputSettings, specs: list[AgentSpec], rounds: int, public_batch_size: int
) -> tuple[list[AgentSpec], OutputPrivacyPlan]:
    """The specs with their output mechanism, and the plan that accounts for it."""
    heads = 1 + specs[0].model.aux_heads
    plan = OutputPrivacyPlan(settings, scale_for(settings), heads * public_batch_size, rounds, rounds)
    return [replace(spec, output_privacy=plan.config()) for spec in specs], plan
