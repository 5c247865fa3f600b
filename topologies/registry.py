"""The registry of topology builders.

Each builder turns the number of agents, a seed and its config params into the communication
graph. An edge u -> v means that agent v receives agent u's predictions on public data, so
the in-neighbours of v are the agents it distils from.

Builders take their tunable params as keyword-only arguments without defaults: the defaults
live only in `conf/topology/NAME.yaml`, so the YAML is the single place a reader looks.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from sim.core.registry import Registry

TopologyBuilder = Callable[..., "nx.DiGraph[int]"]
"""`build(num_agents: int, seed: int, **params) -> nx.DiGraph` on nodes 0..num_agents-1."""

TOPOLOGIES: Registry[TopologyBuilder] = Registry("topology")


def both_directions(graph: nx.Graph[int]) -> nx.DiGraph[int]:
    """Each undirected link as a pair of edges, so linked agents hear each other."""
    return graph.to_directed()
