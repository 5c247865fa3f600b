"""Topologies fixed by their params alone: complete, ring, islands, star, grid and empty.

None of them draws random numbers; they accept `seed` only to share the builder signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise, permutations
from math import isqrt

import networkx as nx

from sim.core.errors import ConfigError
from topologies.params import check_bool, check_int, config_key
from topologies.registry import TOPOLOGIES, both_directions


@TOPOLOGIES.register("complete")
def complete(num_agents: int, seed: int) -> nx.DiGraph[int]:
    """Every agent hears every other: the best-mixing reference for sparser graphs."""
    return both_directions(nx.complete_graph(num_agents))


@TOPOLOGIES.register("ring")
def ring(num_agents: int, seed: int, *, directed: bool) -> nx.DiGraph[int]:
    """Each agent hears its predecessor, and also its successor unless `directed`.

    The sparsest connected graph in which all agents are alike, so knowledge needs many
    hops to travel: about K/2 when undirected, K-1 when directed.
    """
    if num_agents < 3:
        raise ConfigError("num_agents", num_agents, "a ring needs at least 3 agents")
    if check_bool("directed", directed):
        successor_of_each: nx.DiGraph[int] = nx.cycle_graph(num_agents, create_using=nx.DiGraph)
        return successor_of_each
    return both_directions(nx.cycle_graph(num_agents))


@TOPOLOGIES.register("islands")
def islands(num_agents: int, seed: int, *, num_islands: int, bridges: bool) -> nx.DiGraph[int]:
    """Cliques of near-equal size, optionally joined into a ring of islands by bridges.

    Without bridges the islands learn in isolation; with them, all knowledge passing between
    neighbouring islands crosses one pair of edges, which tests how far distilled knowledge
    travels through a bottleneck. A bridge joins the last agent of island j to the first
    agent of island j+1, in both directions.
    """
    island_members = _split_evenly(num_agents, check_int("num_islands", num_islands, 1, num_agents))
    graph: nx.DiGraph[int] = nx.empty_graph(num_agents, create_using=nx.DiGraph)
    for members in island_members:
        graph.add_edges_from(permutations(members, 2))
    if check_bool("bridges", bridges):
        for left, right in _neighbouring_islands(island_members):
            graph.add_edges_from([(left[-1], right[0]), (right[0], left[-1])])
    return graph


def _split_evenly(num_agents: int, parts: int) -> list[range]:
    """Consecutive agent ranges whose sizes differ by at most one (larger ones first)."""
    size, extra = divmod(num_agents, parts)
    starts = [part * size + min(part, extra) for part in range(parts + 1)]
    return [range(start, stop) for start, stop in pairwise(starts)]


def _neighbouring_islands(island_members: Sequence[range]) -> list[tuple[range, range]]:
    """Pairs of islands to bridge: consecutive ones, closed into a ring from three islands on.

    With two islands the closing bridge would only duplicate the link they already have.
    """
    pairs = list(pairwise(island_members))
    if len(island_members) >= 3:
        pairs.append((island_members[-1], island_members[0]))
    return pairs


@TOPOLOGIES.register("star")
def star(num_agents: int, seed: int, *, center: int) -> nx.DiGraph[int]:
    """One hub exchanges with every other agent, and the others only with the hub.

    The closest a decentralised graph gets to a server: every path runs through `center`.
    """
    hub = check_int("center", center, 0, num_agents - 1)
    leaves = [agent for agent in range(num_agents) if agent != hub]
    return both_directions(nx.star_graph([hub, *leaves]))


@TOPOLOGIES.register("grid")
def grid(num_agents: int, seed: int, *, periodic: bool, rows: int | None) -> nx.DiGraph[int]:
    """Agents on a rows x cols lattice, each hearing its up to four nearest neighbours.

    With `periodic` the lattice wraps into a torus, so every agent has four neighbours
    (networkx wraps only sides of three or more, where wrapping adds a new neighbour).
    Agents are numbered row by row (sorted (row, col) order), so agent r * cols + c sits
    at row r, column c. Without `rows`, the most square factorisation of num_agents is used.
    """
    num_rows = _grid_rows(num_agents, rows)
    num_cols = num_agents // num_rows
    lattice = nx.grid_2d_graph(num_rows, num_cols, periodic=check_bool("periodic", periodic))
    return both_directions(nx.convert_node_labels_to_integers(lattice, ordering="sorted"))


def _grid_rows(num_agents: int, rows: int | None) -> int:
    """The requested row count, checked to divide num_agents, or the most square choice.

    A prime num_agents has no two-row factorisation; rather than silently building a line,
    that asks the user to choose one with `rows: 1`.
    """
    if rows is not None:
        check_int("rows", rows, 1, num_agents)
        if num_agents % rows:
            raise ConfigError(config_key("rows"), rows, f"must divide num_agents={num_agents}")
        return rows
    most_square = max(d for d in range(1, isqrt(num_agents) + 1) if num_agents % d == 0)
    if most_square == 1 and num_agents > 1:
        raise ConfigError(
            "num_agents",
            num_agents,
            f"a grid needs rows x cols agents with at least 2 rows; set {config_key('rows')}=1"
            " for a line, or choose another num_agents",
        )
    return most_square


@TOPOLOGIES.register("empty")
def empty(num_agents: int, seed: int) -> nx.DiGraph[int]:
    """No edges: every agent learns alone, the baseline that distillation must beat."""
    return both_directions(nx.empty_graph(num_agents))
