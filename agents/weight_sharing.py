"""Weight sharing for the FedAvg and gossip BASELINES: it crosses the privacy boundary on purpose.

MHD agents send each other only `Prediction`s on public data (agents/messages.py). The
weight-sharing baselines, `method=fedavg` and `method=gossip`, exist so that MHD can be
compared with them, and they send what MHD never does: a model's weights. `WeightShare` is
the only type that carries weights out of an agent, this module the only code that builds one,
and only those two methods' exchange steps (sim/run/exchange.py) ask for it;
tests/test_privacy.py checks that no other method ever builds one.

What a share holds: every floating-point tensor of the model's state dict, i.e. the parameters
and the batch-norm running means and variances, in float32 (4 bytes a value). Running
statistics are averaged like parameters (FedAvg's usual practice): an averaged model with its
owners' own statistics would normalise with numbers that no longer match its weights. Integer
buffers (batch norm's `num_batches_tracked` counter, used only by momentum=None batch norm)
stay local, and so does the optimizer state: each agent keeps its own SGD momentum across
rounds, as a client of a simulation that keeps its optimizer would.

Averaging is deterministic: shares are accumulated in float64 in sender order and cast back to
float32 once, so every process computes the same bits, whichever agents it hosts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from agents.agent import Agent

INITIAL_ROUND = -1
"""Round index of weights shared before any training (the common starting point)."""

Mixing = Mapping[int, tuple[tuple[int, float], ...]]
"""Who averages whose weights: agent id -> ((sender id, weight), ...) in sender order; each row
sums to 1. Gossip's rows list the agent and its in-neighbours (sim/experiment/mixing.py builds
them from the graph); FedAvg's row is every agent weighted by shard size, the same for all."""


@dataclass(frozen=True)
class WeightShare:
    """One model's weights, sent to a server or to out-neighbours. NOT privacy-preserving.

    Attributes:
        sender: agent id.
        round_idx: the round whose local training produced the weights (INITIAL_ROUND: none yet).
        num_samples: the sender's private shard size (FedAvg weighs shares by it).
        tensors: state-dict name -> float32 numpy array (parameters and float buffers).
    """

    sender: int
    round_idx: int
    num_samples: int
    tensors: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        if not all(type(value) is int for value in (self.sender, self.round_idx, self.num_samples)):
            raise TypeError("WeightShare.sender, .round_idx and .num_samples must be ints")
        if not isinstance(self.tensors, dict) or not self.tensors:
            raise TypeError("WeightShare.tensors must be a non-empty dict of name -> array")
        for name, array in self.tensors.items():
            if not isinstance(name, str) or type(array) is not np.ndarray or array.dtype != np.float32:
                raise TypeError(f"WeightShare.tensors[{name!r}] must be a float32 numpy array")

    @property
    def nbytes(self) -> int:
        """Bytes this share puts on one link: its arrays, nothing else."""
        return sum(int(array.nbytes) for array in self.tensors.values())


WeightBundle = Mapping[int, WeightShare]  # sender id -> its share, as one worker exports them


def share_weights(agent: Agent, round_idx: int) -> WeightShare:
    """A copy of `agent`'s floating-point model state as a WeightShare (see the module docstring)."""
    tensors = {
        name: tensor.detach().to("cpu", torch.float32, memory_format=torch.contiguous_format, copy=True).numpy()
        for name, tensor in agent.model.state_dict().items()
        if tensor.is_floating_point()
    }
    return WeightShare(agent.agent_id, round_idx, len(agent.spec.private_y), tensors)


def weighted_average(weighted: Sequence[tuple[WeightShare, float]]) -> dict[str, np.ndarray]:
    """sum(weight * share) per tensor: float64 accumulation in the given order, then float32.

    Raises:
        ValueError: the shares disagree on tensor names or shapes (different architectures), or
            come from different rounds.
    """
    first = weighted[0][0]
    if len({share.round_idx for share, _ in weighted}) != 1:
        raise ValueError("WeightShares from different rounds cannot be averaged")
    sums = {name: np.zeros(array.shape, dtype=np.float64) for name, array in first.tensors.items()}
    for share, weight in weighted:
        if share.tensors.keys() != sums.keys():
            raise ValueError(f"agent {share.sender}'s weights do not match agent {first.sender}'s architecture")
        for name, array in share.tensors.items():
            if array.shape != sums[name].shape:
                raise ValueError(f"{name}: shape {array.shape} of agent {share.sender} != {sums[name].shape}")
            sums[name] += weight * array.astype(np.float64)
    return {name: total.astype(np.float32) for name, total in sums.items()}


def mix(mixing: Mixing, agent_ids: Iterable[int], incoming: Iterable[WeightBundle]) -> dict[int, dict[str, np.ndarray]]:
    """Each of `agent_ids`' rows of `mixing` applied to the shares found in `incoming`.

    Equal rows are computed once: under FedAvg every row is the same shard-size-weighted mean
    of everyone (a server's average, computed by each worker instead of a server).
    """
    by_sender: dict[int, WeightShare] = {}
    for bundle in incoming:
        by_sender.update(bundle)
    means: dict[tuple[tuple[int, float], ...], dict[str, np.ndarray]] = {}
    for agent_id in agent_ids:
        row = tuple(mixing[agent_id])
        if row not in means:
            means[row] = weighted_average([(by_sender[sender], weight) for sender, weight in row])
    return {agent_id: means[tuple(mixing[agent_id])] for agent_id in agent_ids}


def load_weights(agent: Agent, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy averaged tensors into `agent`'s model in place (a compiled forward shares them)."""
    state = agent.model.state_dict()
    expected = {name for name, tensor in state.items() if tensor.is_floating_point()}
    if set(tensors) != expected:
        raise ValueError(f"agent {agent.agent_id} cannot load weights of another architecture")
    with torch.no_grad():
        for name, array in tensors.items():
            state[name].copy_(torch.tensor(array))  # a copy: arrays from Ray's object store are read-only
