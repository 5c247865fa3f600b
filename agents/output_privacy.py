"""Output-side privacy: randomise every prediction an agent publishes, before its codec encodes it.

Two local mechanisms (docs/privacy.md#output-side-mechanisms). Each one takes the sender's
prediction on ONE public sample for ONE head as its whole input, so its guarantee is local DP of
that released value with respect to ANY two inputs (any two models, hence any two private
shards): it protects the message, not a training sample, and it composes over heads, public
samples and rounds (sim/experiment/output_privacy.py does the accounting).

- `noisy_probs`: the probability vector p = softmax(logits) plus i.i.d. Gaussian (std `scale`) or
  Laplace (scale `scale`) noise per class, then projected onto the probability simplex (the
  closest distribution in L2; post-processing). Any two distributions differ by at most 2 in L1
  and sqrt(2) in L2: these are the sensitivities the driver calibrates `scale` to.
- `randomized_response`: k-ary randomized response over the predicted label argmax p. The true
  label is kept with probability e^eps / (e^eps + C - 1), otherwise a uniformly drawn other
  label is sent, each with probability 1 / (e^eps + C - 1). The receiver gets a (floored)
  one-hot message; the topk codec with k = 1 carries it as a label.

The released distributions are returned as log-probabilities (floored at PROBABILITY_FLOOR), which
every codec encodes like logits, because softmax(log p) = p. The noise comes from the agent's own
generator for this purpose, saved in its checkpoint, so a resumed run releases the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from agents.codecs import PROBABILITY_FLOOR
from sim.core.registry import Registry


@dataclass(frozen=True)
class OutputPrivacyConfig:
    """One agent's output mechanism, as the driver calibrated it."""

    mechanism: str  # name in OUTPUT_MECHANISMS
    noise: str  # noisy_probs: name in NOISE; randomized_response: unused ("none")
    scale: float  # noisy_probs: the noise's std (gaussian) or b (laplace); randomized_response: unused
    epsilon: float  # randomized_response: epsilon per label; noisy_probs: the per-vector epsilon it was calibrated to


Noise = Callable[[torch.Size, float, torch.Generator], Tensor]
NOISE: Registry[Noise] = Registry("privacy.noise")


@NOISE.register("gaussian")
def gaussian_noise(shape: torch.Size, scale: float, generator: torch.Generator) -> Tensor:
    return torch.normal(0.0, scale, shape, generator=generator)


@NOISE.register("laplace")
def laplace_noise(shape: torch.Size, scale: float, generator: torch.Generator) -> Tensor:
    """Laplace(0, b) by inversion: b * sign(u) * -log(1 - 2|u|) for u uniform on (-1/2, 1/2)."""
    u = torch.rand(shape, generator=generator) - 0.5
    return -scale * u.sign() * torch.log1p(-2 * u.abs())


Mechanism = Callable[[Tensor, OutputPrivacyConfig, torch.Generator], Tensor]
OUTPUT_MECHANISMS: Registry[Mechanism] = Registry("privacy")


@OUTPUT_MECHANISMS.register("noisy_probs")
def noisy_probabilities(logits: Tensor, config: OutputPrivacyConfig, generator: torch.Generator) -> Tensor:
    """Noisy, simplex-projected probabilities of logits [heads, P, C], as log-probabilities."""
    probs = logits.float().softmax(dim=-1).cpu()
    noisy = probs + NOISE.get(config.noise)(probs.shape, config.scale, generator)
    return project_to_simplex(noisy).clamp_min(PROBABILITY_FLOOR).log().to(logits.device)


@OUTPUT_MECHANISMS.register("randomized_response")
def randomized_response(logits: Tensor, config: OutputPrivacyConfig, generator: torch.Generator) -> Tensor:
    """k-ary randomized response over each head's predicted label: a floored one-hot [heads, P, C], as logs."""
    classes = logits.shape[-1]
    label = logits.float().argmax(dim=-1).cpu()  # [heads, P]
    keep = torch.rand(label.shape, generator=generator) < keep_probability(config.epsilon, classes)
    shift = torch.randint(1, classes, label.shape, generator=generator)  # a uniform OTHER label: label + 1..C-1
    sent = torch.where(keep, label, (label + shift) % classes)
    one_hot = torch.nn.functional.one_hot(sent, classes).float()
    return one_hot.clamp_min(PROBABILITY_FLOOR).log().to(logits.device)


def keep_probability(epsilon: float, classes: int) -> float:
    """P(report = true label) of k-ary randomized response: e^eps / (e^eps + C - 1)."""
    return 1.0 / (1.0 + (classes - 1) * math.exp(-epsilon))


def debias_label_frequencies(frequencies: Tensor, epsilon: float) -> Tensor:
    """Unbiased estimate of the true labels' frequencies [..., C] from randomized-response reports' frequencies.

    E[reported share of c] = q + (p - q) * (true share of c), with p = keep_probability and
    q = (1 - p) / (C - 1); inverting that gives (f - q) / (p - q). The estimate can leave [0, 1] on
    few reports (clip and renormalise it if a distribution is needed); a single report's
    posterior under a uniform prior is p on the reported label and q on each other.
    """
    classes = frequencies.shape[-1]
    p = keep_probability(epsilon, classes)
    q = (1 - p) / (classes - 1)
    return (frequencies - q) / (p - q)


def project_to_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of each row [..., C] onto the probability simplex (Duchi et al. 2008)."""
    classes = v.shape[-1]
    ordered = v.sort(dim=-1, descending=True).values
    cumulative = ordered.cumsum(dim=-1) - 1
    ranks = torch.arange(1, classes + 1, dtype=v.dtype)
    positive = ordered - cumulative / ranks > 0  # true for a prefix of the sorted entries
    count = positive.sum(dim=-1, keepdim=True)  # >= 1
    threshold = cumulative.gather(-1, count - 1) / count
    return (v - threshold).clamp_min(0)


class OutputPrivacy:
    """An agent's output mechanism, its noise stream and how many messages it has released."""

    def __init__(self, config: OutputPrivacyConfig, generator_seed: int) -> None:
        OUTPUT_MECHANISMS.get(config.mechanism)
        self.config = config
        self.generator = torch.Generator().manual_seed(generator_seed)
        self.messages = 0

    def release(self, logits: Tensor) -> Tensor:
        """The randomised version of logits [heads, P, C] that is published (log-probabilities)."""
        self.messages += 1
        return OUTPUT_MECHANISMS.get(self.config.mechanism)(logits, self.config, self.generator)

    def state_dict(self) -> dict[str, object]:
        return {"messages": self.messages, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.messages = int(state["messages"])  # type: ignore[call-overload]
        generator_state = state["generator"]
        assert isinstance(generator_state, Tensor)
        self.generator.set_state(generator_state)
