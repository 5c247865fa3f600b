"""DP-SGD on the private-data part of an agent's step (docs/privacy.md).

Why only part of the step: an MHD step minimises CE on private samples plus distillation terms
on public samples against teachers that are other agents' published predictions. Only the CE
term reads private data. Its gradient is privatised the DP-SGD way (per-sample gradients
clipped to `clip_norm`, summed, Gaussian noise of std `noise_multiplier * clip_norm` added,
divided by the expected batch size); the distillation gradient is computed by ordinary autograd
on public inputs and added afterwards. Opacus cannot clip and noise only part of a loss, so the
per-sample gradients come from `torch.func` (vmap over `grad` of a one-sample CE), the same
functorch route Opacus itself takes for layers without a hand-written rule; the accounting is
Opacus's (sim/experiment/privacy.py), in the driver.

Sampling decides what the accountant may assume. `poisson` includes every private sample in a
step independently with probability q = batch_size / n (the subsampled Gaussian mechanism that
Opacus's RDP and PRV accountants analyse). `shuffle` uses the agent's ordinary reshuffled
batches: a run with it reports no epsilon, because no accountant here covers it.

Noise goes only on the coordinates the private loss can reach (`private_reach`): the main
head's rows of the fused head layer and the backbone parameters in its graph. The auxiliary
heads' rows and the embedding projection get a per-sample CE gradient that is zero for every
sample whatever the data, so the released sum is exactly 0 there under any two neighbouring
shards: releasing it without noise costs no privacy, and the Gaussian mechanism on the other
coordinates has the same L2 sensitivity C as on all of them (the zeros add nothing to a
sample's norm). The accounting is therefore unchanged, while the heads that only distillation
trains are no longer perturbed by noise that protects nothing (docs/privacy.md).

The sampling masks and the noise come from a generator of their own (seeded from the agent's
seed), so the public-sample picks draw from the agent's stream exactly as without privacy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from agents.losses import mhd_terms, weighted_total
from agents.model import MultiHeadModel
from sim.core.registry import Registry
from sim.core.seeding import derive_seed

if TYPE_CHECKING:
    from agents.agent import Agent

CLIP_EPSILON = 1e-6
"""Added to a per-sample norm before dividing by it: a zero gradient stays zero instead of NaN."""


@dataclass(frozen=True)
class PrivacyConfig:
    """One agent's DP-SGD settings, fixed by the driver (sim/experiment/privacy.py)."""

    noise_multiplier: float  # sigma: the noise std is sigma * clip_norm
    clip_norm: float | None  # C: bound on each sample's gradient norm; None: no clipping (only with sigma 0)
    sampling: str  # name in SAMPLERS
    max_steps: int | None  # private steps this agent may take within its budget; None: no budget


@dataclass(frozen=True)
class PrivateBatch:
    """The private part of one step: samples, labels, and what their gradient sum is divided by."""

    x: Tensor  # [B, C, H, W]; B may be 0 under Poisson sampling
    y: Tensor  # [B]
    normaliser: float  # expected batch size q * n (Poisson) or the batch's size (shuffle)
    public_pick: Tensor | None  # indices into the round's public batch; None when not distilling


Sampler = Callable[["Agent", "DPSGD", "Tensor | None"], PrivateBatch]
SAMPLERS: Registry[Sampler] = Registry("privacy.sampling")


@SAMPLERS.register("poisson")
def poisson_batch(agent: Agent, dp: DPSGD, public_batch: Tensor | None) -> PrivateBatch:
    """Every private sample independently with probability q: what the accountant analyses."""
    n = len(agent.private_y)
    chosen = torch.rand(n, generator=dp.generator) < dp.sample_rate
    index = chosen.nonzero().squeeze(1).to(agent.device)
    pick = None if public_batch is None else agent.pick_public(public_batch)
    return PrivateBatch(agent.private_x[index], agent.private_y[index], dp.sample_rate * n, pick)


@SAMPLERS.register("shuffle")
def shuffled_batch(agent: Agent, dp: DPSGD, public_batch: Tensor | None) -> PrivateBatch:
    """The agent's ordinary batches (reshuffled epochs): not covered by the accountant."""
    del dp
    joint, y, pick = agent.step_batch(public_batch)
    return PrivateBatch(joint[: len(y)], y, float(len(y)), pick)


class DPSGD:
    """An agent's private-gradient mechanism and its step count (the accountant's state)."""

    def __init__(self, config: PrivacyConfig, agent_seed: int, shard_size: int, batch_size: int) -> None:
        SAMPLERS.get(config.sampling)
        if config.clip_norm is None and config.noise_multiplier > 0:
            raise ValueError("noise without clipping has no sensitivity to calibrate to")
        self.config = config
        self.sample_rate = min(1.0, batch_size / shard_size)  # q
        self.generator = torch.Generator().manual_seed(derive_seed(agent_seed, "dp_sgd"))
        self.steps = 0  # private steps taken; with (sigma, q) all the accountant needs
        self.reach: dict[str, Tensor] | None = None  # private_reach of the model, found at the first step

    def allows_round(self, local_steps: int) -> bool:
        """Whether `local_steps` more private steps stay within the budget (always without one)."""
        return self.config.max_steps is None or self.steps + local_steps <= self.config.max_steps

    def private_gradient(
        self, model: MultiHeadModel, x: Tensor, y: Tensor, normaliser: float
    ) -> tuple[dict[str, Tensor], Tensor]:
        """(sum_j clip(grad CE_j) + N(0, (sigma C)^2 I) on reached coordinates) / normaliser, and sum_j CE_j.

        Every trainable parameter has an entry; coordinates outside `private_reach` are exactly 0.
        """
        params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if self.reach is None:
            self.reach = private_reach(model, tuple(x.shape[1:]))
        if len(y):
            grads, losses = per_sample_gradients(model, params, x, y)
            factors = clip_factors(grads, self.config.clip_norm)  # [B]
            summed = {name: torch.einsum("b,b...->...", factors, g) for name, g in grads.items()}
            loss_sum = losses.sum()
        else:  # an empty Poisson batch: the noise alone, which the accountant counts as a step
            summed = {name: torch.zeros_like(p) for name, p in params.items()}
            loss_sum = torch.zeros((), device=x.device)
        std = self.config.noise_multiplier * (self.config.clip_norm or 0.0)
        if std > 0:
            for name, mask in self.reach.items():  # unreached coordinates: an exact, data-independent 0
                noise = torch.normal(0.0, std, mask.shape, generator=self.generator).to(mask.device)
                summed[name] = summed[name] + noise * mask
        self.steps += 1
        return {name: total / normaliser for name, total in summed.items()}, loss_sum

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])


def private_reach(model: MultiHeadModel, sample_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Boolean masks of the coordinates the private loss can reach, for the trainable parameters it reaches.

    Derived from the model's structure, not from gradient values (a value can be 0 by chance, e.g. a
    dead ReLU, and must still be noised):
    - a parameter outside the autograd graph of the main head's logits (the embedding projection;
      per-head branches of other heads) has no entry: its CE gradient is zero for every input.
      The graph is the same for every input because no accepted backbone branches on its data
      (the support-set backbone is rejected under DP-SGD);
    - of the fused head layer, only the main head's rows (`MultiHeadModel.head_rows(0)`) are set.
    Everything else in a reached parameter is set, so a parameter the model does not describe
    is noised in full: a gap here can only add noise, never remove it from a reached coordinate.
    """
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    probe = torch.zeros((1, *sample_shape), device=next(iter(trainable.values())).device)
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # no draw from the global stream
        logits, _ = model(probe)
        found = torch.autograd.grad(logits[0].sum(), list(trainable.values()), allow_unused=True)
    reach = {
        name: torch.ones_like(p, dtype=torch.bool)
        for (name, p), g in zip(trainable.items(), found, strict=True)
        if g is not None
    }
    for name, rows in model.head_rows(0).items():
        if name in reach:
            mask = torch.zeros_like(reach[name])
            mask[rows] = True
            reach[name] = mask
    return reach


def per_sample_gradients(
    model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Each sample's CE gradient of the main head ([B, *shape] per parameter) and its loss [B].

    Every sample runs as a batch of one, so nothing couples samples: this is why batch norm
    (statistics over the batch) is rejected under DP-SGD. Parameters the CE does not reach
    (auxiliary heads' rows, the projection) get zero gradients (`private_reach`).
    """
    rest = {name: p.detach() for name, p in model.named_parameters() if name not in params}
    rest.update(dict(model.named_buffers()))

    def sample_loss(trainable: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits, _ = functional_call(model, {**trainable, **rest}, (xi.unsqueeze(0),))
        return F.cross_entropy(logits[0], yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return grads, losses


def clip_factors(grads: dict[str, Tensor], clip_norm: float | None) -> Tensor:
    """min(1, C / ||g_j||) per sample j, the norm taken over all parameters together (ones without clipping)."""
    batch = next(iter(grads.values())).shape[0]
    norms = torch.stack([g.reshape(batch, -1).norm(dim=1) for g in grads.values()]).norm(dim=0)  # [B]
    if clip_norm is None:
        return torch.ones_like(norms)
    return (clip_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)


def dp_train_step(
    agent: Agent, dp: DPSGD, public_batch: Tensor | None, targets: dict[str, Tensor]
) -> dict[str, Tensor]:
    """One step: privatised CE gradient plus the ordinary distillation gradient, then the optimizer.

    The terms returned are those of docs/design.md#loss, except that `loss/ce` is the CE sum over
    the private batch divided by the same normaliser as its gradient (the batch mean under
    `shuffle`; an empty Poisson batch reports 0).
    """
    batch = SAMPLERS.get(dp.config.sampling)(agent, dp, public_batch)
    model = agent.model
    private, loss_sum = dp.private_gradient(model, batch.x, batch.y, batch.normaliser)
    terms: dict[str, Tensor] = {"loss/ce": loss_sum.detach() / batch.normaliser}
    public_grads: dict[str, Tensor] = {}
    if batch.public_pick is not None and public_batch is not None:
        logits, embedding = agent.forward(public_batch[batch.public_pick].contiguous(memory_format=agent.memory_format))
        picked = {name: target[batch.public_pick] for name, target in targets.items()}
        distill = mhd_terms(
            logits, embedding, batch.y[:0], picked, agent.head_of_term, agent.temperature, model.project
        )
        del distill["loss/ce"]  # over no samples: the private term is the privatised one above
        names = [name for name, _ in model.named_parameters() if name in private]
        trainable = [p for name, p in model.named_parameters() if name in private]
        found = torch.autograd.grad(weighted_total(distill, agent.term_weights()), trainable, allow_unused=True)
        public_grads = {name: g for name, g in zip(names, found, strict=True) if g is not None}
        terms.update({name: value.detach() for name, value in distill.items()})
    for name, p in model.named_parameters():
        if name in private:
            p.grad = private[name] + public_grads[name] if name in public_grads else private[name]
    agent.optimizer.step()
    terms["loss/total"] = weighted_total(terms, agent.term_weights())
    return terms
