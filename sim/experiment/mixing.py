"""Mixing weights of gossip averaging (`method=gossip`, `method.mixing`): who averages with whom.

Agent i's row lists itself and its in-neighbours (the agents whose weights it receives over
the graph's edges, as it would receive their predictions under MHD), in sender order, with
weights that sum to 1. After local training, agent i's new weights are sum_j W_ij x_j.

- `metropolis_hastings` (the default): W_ij = 1 / (1 + max(d_i, d_j)) for each in-neighbour
  j, where d is the in-degree, and W_ii = 1 - sum_j W_ij. On an undirected graph (every edge
  both ways) this is the classic Metropolis-Hastings matrix (Xiao & Boyd 2004, the usual choice
  for D-PSGD): symmetric and doubly stochastic, so gossip keeps the population's mean weights
  and, on a connected graph, converges to it, using only the neighbours' degrees. On a directed
  graph the rows still sum to 1 but the columns need not: agents agree on a weighted mean.
- `uniform`: W_ij = 1 / (1 + d_i) for itself and each in-neighbour. Doubly stochastic only on
  regular graphs (ring, complete); on the complete graph every agent gets the plain mean,
  which is FedAvg's average when the shards are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import networkx as nx

from agents.weight_sharing import Mixing
from sim.core.registry import Registry

MixingRule = Callable[[nx.DiGraph], Mixing]
MIXING_RULES: Registry[MixingRule] = Registry("method.mixing")


def _in_neighbours(graph: nx.DiGraph, agent: int) -> list[int]:
    return sorted(sender for sender in graph.predecessors(agent) if sender != agent)


@MIXING_RULES.register("metropolis_hastings")
def metropolis_hastings(graph: nx.DiGraph) -> Mixing:
    """W_ij = 1 / (1 + max(d_i, d_j)) over in-neighbours, the rest on the agent itself."""
    degree = {agent: len(_in_neighbours(graph, agent)) for agent in graph.nodes}
    mixing = {}
    for agent in sorted(graph.nodes):
        weights = {sender: 1.0 / (1 + max(degree[agent], degree[sender])) for sender in _in_neighbours(graph, agent)}
        weights[agent] = 1.0 - sum(weights.values())
        mixing[agent] = tuple(sorted(weights.items()))
    return mixing


@MIXING_RULES.register("uniform")
def uniform(graph: nx.DiGraph) -> Mixing:
    """W_ij = 1 / (1 + d_i) over the agent itself and its in-neighbours."""
    mixing = {}
    for agent in sorted(graph.nodes):
        senders = sorted([agent, *_in_neighbours(graph, agent)])
        mixing[agent] = tuple((sender, 1.0 / len(senders)) for sender in senders)
    return mixing


def shard_weighted_mean(shard_sizes: Mapping[int, int]) -> Mixing:
    """FedAvg's average as mixing rows: every agent gets sum_j (n_j / n) x_j, the same row for all.

    The graph plays no part (McMahan et al. 2017 average through a server); the backend
    computes the shared row once per worker.
    """
    total = sum(shard_sizes.values())
    row = tuple((agent, size / total) for agent, size in sorted(shard_sizes.items()))
    return dict.fromkeys(sorted(shard_sizes), row)
