"""Random topologies drawn by networkx generators, each fully determined by `seed`.

All of them are undirected graphs turned into both directions: linked agents exchange
predictions both ways.
"""

from __future__ import annotations

import networkx as nx

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
