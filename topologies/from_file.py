"""The `from_file` topology: a graph drawn by hand or exported from another tool."""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import ParseError

import networkx as nx

from sim.core.errors import ConfigError
from topologies.edges import is_integer, read_edge_list
from topologies.params import config_key
from topologies.registry import TOPOLOGIES


@TOPOLOGIES.register("from_file")
def from_file(num_agents: int, seed: int, *, path: str | None) -> nx.DiGraph[int]:
    """Load an edge list ("u v" per line, see `write_edge_list`) or a `.graphml` file.

    Edge-list lines are directed (v receives u's predictions), so a saved topology reloads
    unchanged; a GraphML file says itself whether it is directed, and its undirected edges
    count both ways. Nodes are renumbered 0..K-1 in sorted order (numeric when every label
    is an integer), so a file may number agents from 1 or give them names.
    """
    file = _existing_file(path)
    graph = _read_graphml(file) if file.suffix.lower() == ".graphml" else read_edge_list(file)
    return _relabel_in_sorted_order(graph)


def _existing_file(path: str | None) -> Path:
    if path is None:
        raise ConfigError(config_key("path"), path, "set it to an edge-list or .graphml file")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(config_key("path"), path, "no such file")
    return file


def _read_graphml(file: Path) -> nx.DiGraph[str]:
    try:
        graph = nx.read_graphml(file, node_type=str)
    except (ParseError, nx.NetworkXError) as error:
        raise ConfigError(config_key("path"), str(file), f"not a readable GraphML file ({error})") from None
    return nx.DiGraph(graph)


def _relabel_in_sorted_order(graph: nx.DiGraph[str]) -> nx.DiGraph[int]:
    """A copy on nodes 0..K-1, numbered in the sorted order of the original labels."""
    labels = sorted(graph, key=int) if all(is_integer(label) for label in graph) else sorted(graph)
    agent_of = {label: agent for agent, label in enumerate(labels)}
    relabelled: nx.DiGraph[int] = nx.empty_graph(len(labels), create_using=nx.DiGraph)
    relabelled.add_edges_from((agent_of[sender], agent_of[receiver]) for sender, receiver in graph.edges())
    return relabelled
