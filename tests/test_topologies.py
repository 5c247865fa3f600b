"""Tests for the topologies package: each graph's defining property, errors, and the YAML configs."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from omegaconf import OmegaConf

from sim.core.errors import ConfigError
from topologies import (
    TOPOLOGIES,
    build_topology,
    edge_list,
    in_neighbours,
    validate_graph,
    write_edge_list,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "topology"
SEED = 0


def build(name: str, num_agents: int, seed: int = SEED, **params: Any) -> nx.DiGraph[int]:
    """Build with connectivity not required unless asked, so each test checks one property."""
    return build_topology(name, num_agents, seed, {"require_connected": False, **params})


def in_degrees(graph: nx.DiGraph[int]) -> list[int]:
    return [len(senders) for senders in in_neighbours(graph)]


def load_defaults(yaml_file: Path) -> dict[str, Any]:
    config = OmegaConf.to_container(OmegaConf.load(yaml_file))
    assert isinstance(config, dict)
    return {str(key): value for key, value in config.items()}


# --- defining properties ---------------------------------------------------------------


def test_complete_links_every_ordered_pair() -> None:
    graph = build("complete", 6)
    assert graph.number_of_edges() == 6 * 5
    assert in_neighbours(graph)[2] == [0, 1, 3, 4, 5]


def test_undirected_ring_hears_both_neighbours() -> None:
    graph = build("ring", 7, directed=False)
    assert in_degrees(graph) == [2] * 7
    assert in_neighbours(graph)[0] == [1, 6]
    assert nx.is_isomorphic(graph.to_undirected(), nx.cycle_graph(7))


def test_directed_ring_hears_only_its_predecessor() -> None:
    graph = build("ring", 7, directed=True)
    assert in_neighbours(graph) == [[(agent - 1) % 7] for agent in range(7)]
    assert nx.is_strongly_connected(graph)


@pytest.mark.parametrize(("num_agents", "num_islands"), [(8, 2), (10, 3), (7, 7), (5, 1)])
def test_islands_without_bridges_are_separate_near_equal_cliques(num_agents: int, num_islands: int) -> None:
    graph = build("islands", num_agents, num_islands=num_islands, bridges=False)
    components = list(nx.weakly_connected_components(graph))
    sizes = [len(component) for component in components]
    assert len(components) == num_islands
    assert max(sizes) - min(sizes) <= 1
    for component in components:
        assert graph.subgraph(component).number_of_edges() == len(component) * (len(component) - 1)


@pytest.mark.parametrize(("num_islands", "num_bridges"), [(1, 0), (2, 1), (3, 3), (4, 4)])
def test_islands_with_bridges_form_a_connected_ring_of_islands(num_islands: int, num_bridges: int) -> None:
    without = build("islands", 12, num_islands=num_islands, bridges=False)
    graph = build("islands", 12, num_islands=num_islands, bridges=True)
    assert nx.is_weakly_connected(graph)
    bridges = set(edge_list(graph)) - set(edge_list(without))
    assert len(bridges) == 2 * num_bridges
    assert all((receiver, sender) in bridges for sender, receiver in bridges)


def test_star_links_the_centre_to_everyone_else() -> None:
    graph = build("star", 6, center=2)
    assert in_neighbours(graph)[2] == [0, 1, 3, 4, 5]
    assert all(in_neighbours(graph)[agent] == [2] for agent in range(6) if agent != 2)


def test_grid_is_a_most_square_lattice_numbered_row_by_row() -> None:
    graph = build("grid", 12, periodic=False, rows=None)  # 3 x 4
    assert sorted(in_degrees(graph)) == [2] * 4 + [3] * 6 + [4] * 2
    assert in_neighbours(graph)[5] == [1, 4, 6, 9]


def test_grid_rows_choose_the_shape() -> None:
    graph = build("grid", 12, periodic=False, rows=2)  # 2 x 6
    assert sorted(in_degrees(graph)) == [2] * 4 + [3] * 8


def test_torus_gives_every_agent_four_neighbours() -> None:
    graph = build("grid", 12, periodic=True, rows=None)
    assert in_degrees(graph) == [4] * 12
    assert in_neighbours(graph)[0] == [1, 3, 4, 8]


def test_random_regular_gives_every_agent_the_same_degree() -> None:
    graph = build("random_regular", 10, degree=3)
    assert in_degrees(graph) == [3] * 10
    assert all(degree == 3 for _, degree in graph.out_degree())


def test_erdos_renyi_extremes_are_empty_and_complete() -> None:
    assert build("erdos_renyi", 6, p=0.0).number_of_edges() == 0
    assert build("erdos_renyi", 6, p=1.0).number_of_edges() == 6 * 5


def test_watts_strogatz_rewiring_keeps_the_number_of_links() -> None:
    graph = build("watts_strogatz", 12, k=4, p=0.5)
    assert graph.number_of_edges() == 12 * 4


def test_barabasi_albert_adds_m_links_per_new_agent() -> None:
    graph = build("barabasi_albert", 12, m=2)
    assert graph.number_of_edges() == 2 * 2 * (12 - 2)
    assert nx.is_weakly_connected(graph)


def test_empty_has_agents_but_no_edges() -> None:
    graph = build("empty", 5)
    assert list(graph) == [0, 1, 2, 3, 4]
    assert graph.number_of_edges() == 0


RANDOM_TOPOLOGIES = [
    ("erdos_renyi", {"p": 0.5}),
    ("watts_strogatz", {"k": 4, "p": 0.5}),
    ("barabasi_albert", {"m": 2}),
    ("random_regular", {"degree": 4}),
]


@pytest.mark.parametrize(("name", "params"), RANDOM_TOPOLOGIES)
def test_random_topologies_are_fixed_by_the_seed(name: str, params: dict[str, Any]) -> None:
    first = edge_list(build(name, 16, seed=1, **params))
    assert edge_list(build(name, 16, seed=1, **params)) == first
    assert edge_list(build(name, 16, seed=2, **params)) != first


# --- from_file and the edge-list format ------------------------------------------------


def test_edge_list_file_round_trips(tmp_path: Path) -> None:
    graph = build("ring", 6, directed=True)
    graph.remove_edges_from([(2, 3), (3, 4)])  # leaves agent 3 without edges
    path = tmp_path / "ring.txt"
    write_edge_list(graph, path)
    loaded = build("from_file", 6, path=str(path))
    assert edge_list(loaded) == edge_list(graph)
    assert list(loaded) == list(range(6))


def test_edge_list_labels_are_renumbered_in_numeric_order(tmp_path: Path) -> None:
    path = tmp_path / "graph.txt"
    path.write_text("# agents numbered from 1\n2 10\n\n10 1  # trailing comment\n3\n")
    graph = build("from_file", 4, path=str(path))
    assert edge_list(graph) == [(1, 3), (3, 0)]


def test_undirected_graphml_counts_edges_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "path.graphml"
    nx.write_graphml(nx.relabel_nodes(nx.path_graph(3), {0: "a", 1: "b", 2: "c"}), path)
    graph = build("from_file", 3, path=str(path))
    assert edge_list(graph) == [(0, 1), (1, 0), (1, 2), (2, 1)]


def test_directed_graphml_keeps_directions(tmp_path: Path) -> None:
    path = tmp_path / "path.graphml"
    nx.write_graphml(nx.path_graph(3, create_using=nx.DiGraph), path)
    assert edge_list(build("from_file", 3, path=str(path))) == [(0, 1), (1, 2)]


@pytest.mark.parametrize(
    ("text", "key"),
    [("0 1\n1 2\n", "num_agents"), ("0 1\n1 1\n", "topology"), ("0 1 2\n", "topology.path")],
)
def test_bad_edge_list_files_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        build("from_file", 2, path=str(path))
    assert error.value.key == key


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "num_agents", "params", "key"),
    [
        ("no_such_topology", 8, {}, "topology"),
        ("complete", 0, {}, "num_agents"),
        ("complete", 8, {"p": 0.5}, "topology.p"),
        ("ring", 8, {}, "topology.directed"),
        ("ring", 8, {"directed": "no"}, "topology.directed"),
        ("ring", 2, {"directed": False}, "num_agents"),
        ("ring", 8, {"directed": False, "require_connected": "yes"}, "topology.require_connected"),
        ("islands", 4, {"num_islands": 5, "bridges": False}, "topology.num_islands"),
        ("islands", 8, {"num_islands": 2, "bridges": False, "require_connected": True}, "topology.require_connected"),
        ("star", 4, {"center": 4}, "topology.center"),
        ("grid", 8, {"periodic": False, "rows": 3}, "topology.rows"),
        ("grid", 7, {"periodic": False, "rows": None}, "num_agents"),
        ("erdos_renyi", 8, {"p": 1.5}, "topology.p"),
        ("watts_strogatz", 8, {"k": 3, "p": 0.1}, "topology.k"),
        ("watts_strogatz", 8, {"k": 8, "p": 0.1}, "topology.k"),
        ("watts_strogatz", 8, {"k": 4, "p": -0.1}, "topology.p"),
        ("barabasi_albert", 4, {"m": 4}, "topology.m"),
        ("random_regular", 7, {"degree": 3}, "topology.degree"),
        ("random_regular", 6, {"degree": 6}, "topology.degree"),
        ("from_file", 4, {"path": None}, "topology.path"),
        ("from_file", 4, {"path": "/no/such/graph.txt"}, "topology.path"),
    ],
)
def test_bad_config_names_the_key(name: str, num_agents: int, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(name, num_agents, **params)
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}=")


def test_validate_graph_refuses_nodes_that_are_not_agents() -> None:
    graph: nx.DiGraph[int] = nx.DiGraph([(0, 1), (1, 5)])
    with pytest.raises(ConfigError, match=r"nodes 0\.\.2"):
        validate_graph(graph, 3, require_connected=False)


def test_validate_graph_refuses_self_loops() -> None:
    graph: nx.DiGraph[int] = nx.DiGraph([(0, 1), (1, 1)])
    with pytest.raises(ConfigError, match=r"self-loops on agents \[1\]"):
        validate_graph(graph, 2, require_connected=False)


def test_directed_graphs_need_only_be_weakly_connected() -> None:
    validate_graph(nx.DiGraph([(0, 1), (2, 1)]), 3, require_connected=True)


# --- configs ---------------------------------------------------------------------------


def test_every_registered_topology_has_a_yaml_named_after_it() -> None:
    names_in_yaml = {path.stem: load_defaults(path)["name"] for path in CONF_DIR.glob("*.yaml")}
    assert all(stem == name for stem, name in names_in_yaml.items())
    assert sorted(names_in_yaml) == TOPOLOGIES.names()


@pytest.mark.parametrize("name", TOPOLOGIES.names())
def test_builders_keep_no_defaults(name: str) -> None:
    params = inspect.signature(TOPOLOGIES.get(name)).parameters.values()
    assert all(param.default is inspect.Parameter.empty for param in params)


@pytest.mark.parametrize("yaml_file", sorted(CONF_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_topology_builds_from_its_yaml_defaults(yaml_file: Path, tmp_path: Path) -> None:
    params = load_defaults(yaml_file)
    name = params.pop("name")
    if name == "from_file":
        params["path"] = str(tmp_path / "complete.txt")
        write_edge_list(nx.complete_graph(8, create_using=nx.DiGraph), params["path"])
    graph = build_topology(name, 8, SEED, params)
    assert list(graph) == list(range(8))


def test_an_edge_list_mixing_integers_and_names_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "graph.txt"
    path.write_text("0 1\n1 2\n1 two\n")
    with pytest.raises(ConfigError, match=r"topology.path=.*graph.txt.* line 3 names agent 'two'"):
        build("from_file", 3, path=str(path))
