"""Random topologies, each fully determined by `seed`.

Most are undirected graphs turned into both directions (linked agents exchange predictions both
ways); `directed_erdos_renyi` and `k_out` are directed. `k_out` and `random_matching` are meant
to be re-drawn every round (`topology.resample_every`, docs/dynamic.md).
"""

from __future__ import annotations

import networkx as nx
import numpy as np

from sim.core.errors import ConfigError
from topologies.params import check_int, check_probability, config_key
from topologies.registry import TOPOLOGIES, both_directions


@TOPOLOGIES.register("erdos_renyi")
def erdos_renyi(num_agents: int, seed: int, *, p: float) -> nx.DiGraph[int]:
    """Each pair of agents is linked independently with probability `p`.

    The unstructured baseline: no agent is special and degrees vary around p * (K-1).
    """
    return both_directions(nx.gnp_random_graph(num_agents, check_probability("p", p), seed=seed))


@TOPOLOGIES.register("watts_strogatz")
def watts_strogatz(num_agents: int, seed: int, *, k: int, p: float) -> nx.DiGraph[int]:
    """A ring where each agent links to its k nearest agents, each link rewired with prob `p`.

    A few rewired shortcuts give a small world: local clusters like the ring, yet short
    paths between any two agents.
    """
    if check_int("k", k, 2, num_agents - 1) % 2:
        raise ConfigError(config_key("k"), k, "must be even: each agent links to k/2 agents per side")
    return both_directions(nx.watts_strogatz_graph(num_agents, k, check_probability("p", p), seed=seed))


@TOPOLOGIES.register("barabasi_albert")
def barabasi_albert(num_agents: int, seed: int, *, m: int) -> nx.DiGraph[int]:
    """Agents join one by one, linking to `m` existing agents chosen by degree.

    Preferential attachment yields a few hubs and many low-degree agents, as in social
    networks; the graph is always connected.
    """
    return both_directions(nx.barabasi_albert_graph(num_agents, check_int("m", m, 1, num_agents - 1), seed=seed))


@TOPOLOGIES.register("random_regular")
def random_regular(num_agents: int, seed: int, *, degree: int) -> nx.DiGraph[int]:
    """A uniformly random graph in which every agent has exactly `degree` neighbours.

    Random like Erdos-Renyi yet with equal load on every agent, which separates the effect
    of the graph's shape from that of unequal degrees.
    """
    if check_int("degree", degree, 1, num_agents - 1) * num_agents % 2:
        raise ConfigError(
            config_key("degree"), degree, f"degree x num_agents must be even, and {degree} x {num_agents} is odd"
        )
    return both_directions(nx.random_regular_graph(degree, num_agents, seed=seed))


@TOPOLOGIES.register("directed_erdos_renyi")
def directed_erdos_renyi(num_agents: int, seed: int, *, p: float) -> nx.DiGraph[int]:
    """Each ordered pair u -> v is an edge independently with probability `p`.

    Unlike erdos_renyi, hearing someone does not mean being heard back.
    """
    graph: nx.DiGraph[int] = nx.gnp_random_graph(num_agents, check_probability("p", p), seed=seed, directed=True)
    return graph


@TOPOLOGIES.register("k_out")
def k_out(num_agents: int, seed: int, *, k: int) -> nx.DiGraph[int]:
    """Every agent sends to `k` peers drawn uniformly without replacement (peer sampling).

    Re-drawn every round (`topology.resample_every=1`) this is the epidemic-learning graph: each
    agent's out-degree is exactly k, its in-degree k on average.
    """
    peers = check_int("k", k, 1, num_agents - 1)
    rng = np.random.default_rng(seed)
    graph: nx.DiGraph[int] = nx.empty_graph(num_agents, create_using=nx.DiGraph)
    for sender in range(num_agents):
        others = np.array([agent for agent in range(num_agents) if agent != sender])
        graph.add_edges_from(
            (sender, int(receiver)) for receiver in sorted(rng.choice(others, size=peers, replace=False))
        )
    return graph


@TOPOLOGIES.register("random_matching")
def random_matching(num_agents: int, seed: int) -> nx.DiGraph[int]:
    """Agents paired at random, each pair exchanging both ways; with odd K one agent sits out.

    Re-drawn every round (its YAML's default) each agent talks to one new peer per round: the
    sparsest graph through which knowledge still spreads over time.
    """
    order = np.random.default_rng(seed).permutation(num_agents)
    graph: nx.DiGraph[int] = nx.empty_graph(num_agents, create_using=nx.DiGraph)
    for first, second in zip(order[0::2], order[1::2], strict=False):
        graph.add_edges_from([(int(first), int(second)), (int(second), int(first))])
    return graph
