"""Views of a topology as plain lists, and its edge-list file format.

The round loop routes predictions with `in_neighbours`; logs and reports record the graph
with `edge_list` / `write_edge_list`. The file format is the one `from_file` reads, so a
topology saved from one run can be reloaded unchanged in another.
"""

from __future__ import annotations

import os
from pathlib import Path

import networkx as nx

from sim.core.errors import ConfigError
from topologies.params import config_key

_HEADER = "# u v: agent v receives agent u's predictions; a lone u is an agent without edges\n"


def in_neighbours(graph: nx.DiGraph[int]) -> list[list[int]]:
    """For each agent 0..K-1, the sorted agents whose predictions it receives."""
    return [sorted(graph.predecessors(agent)) for agent in range(graph.number_of_nodes())]


def edge_list(graph: nx.DiGraph[int]) -> list[tuple[int, int]]:
    """Every edge (sender, receiver), sorted, so equal graphs give equal lists."""
    return sorted(graph.edges())


def write_edge_list(graph: nx.DiGraph[int], path: str | os.PathLike[str]) -> None:
    """Write one "u v" line per edge, then one line per agent without any edge."""
    lines = [f"{sender} {receiver}" for sender, receiver in edge_list(graph)]
    lines += [str(agent) for agent in sorted(nx.isolates(graph))]
    Path(path).write_text(_HEADER + "".join(f"{line}\n" for line in lines))


def read_edge_list(path: Path) -> nx.DiGraph[str]:
    """Parse the `write_edge_list` format; labels stay strings for the caller to relabel.

    "u v" is an edge u -> v, a lone "u" an agent without edges; blank lines and text after
    "#" are ignored. Labels are all integers or all names: a file that mixes them (`1 two`)
    is a typo, refused naming the line.
    """
    graph: nx.DiGraph[str] = nx.DiGraph()
    first_line: dict[str, int] = {}  # label -> the line it first appears on
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if len(fields) > 2:
            raise ConfigError(
                config_key("path"), str(path), f"line {line_number} should be 'u v' or a lone 'u': {line!r}"
            )
        for label in fields:
            first_line.setdefault(label, line_number)
        graph.add_nodes_from(fields)
        if len(fields) == 2:
            graph.add_edge(fields[0], fields[1])
    names = [label for label in first_line if not is_integer(label)]
    if names and len(names) < len(first_line):
        line_number = first_line[names[0]]
        raise ConfigError(
            config_key("path"),
            str(path),
            f"line {line_number} names agent {names[0]!r} among integer agents: use integers or names throughout",
        )
    return graph


def is_integer(label: str) -> bool:
    try:
        int(label)
    except ValueError:
        return False
    return True
