"""Communication graphs for decentralised distillation.

A topology is a `networkx.DiGraph` on agents 0..K-1 where an edge u -> v means that agent v
receives agent u's predictions on public data. Topologies are registered by name in
`TOPOLOGIES`, configured by `conf/topology/NAME.yaml` and built with `build_topology`.
"""

from __future__ import annotations

# Importing the builder modules registers their topologies.
from topologies import from_file, random_graphs, structured  # noqa: F401
from topologies.build import build_topology
from topologies.edges import edge_list, in_neighbours, write_edge_list
from topologies.registry import TOPOLOGIES, TopologyBuilder
from topologies.validate import validate_graph

__all__ = [
    "TOPOLOGIES",
    "TopologyBuilder",
    "build_topology",
    "edge_list",
    "in_neighbours",
    "validate_graph",
    "write_edge_list",
]
