"""Checks that a built graph can serve as the communication graph of num_agents agents.

Builders construct correct graphs by design, but `from_file` takes whatever a user wrote,
and a random draw may come out disconnected; both must fail before any training starts.
"""

from __future__ import annotations

import networkx as nx

from sim.core.errors import ConfigError
from topologies.params import config_key


def validate_graph(graph: nx.DiGraph[int], num_agents: int, require_connected: bool) -> None:
    """Raise ConfigError unless `graph` is a usable communication graph for num_agents agents.

    It must have exactly the nodes 0..num_agents-1, no self-loops and, when
    `require_connected`, a single weakly connected component. Connectivity ignores edge
    directions: it catches groups of agents that never exchange anything, while which way
    knowledge flows is the business of the chosen topology.
    """
    if graph.number_of_nodes() != num_agents:
        raise ConfigError(
            "num_agents", num_agents, f"the topology has {graph.number_of_nodes()} nodes, one per agent is needed"
        )
    strangers = sorted((node for node in graph if node not in range(num_agents)), key=str)
    if strangers:
        raise ConfigError("topology", f"nodes {strangers}", f"agents must be the nodes 0..{num_agents - 1}")
    looped = sorted(node for node, _ in nx.selfloop_edges(graph))
    if looped:
        raise ConfigError("topology", f"self-loops on agents {looped}", "an agent cannot distil from itself")
    if require_connected and num_agents > 0 and not nx.is_weakly_connected(graph):
        components = nx.number_weakly_connected_components(graph)
        raise ConfigError(
            config_key("require_connected"),
            True,
            f"the graph has {components} separate groups of agents; change its params or seed, or set it to false",
        )
