"""Build a topology by name from its config, checking params and the resulting graph."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import networkx as nx

from sim.core.errors import ConfigError
from sim.core.seeding import derive_seed
from topologies.params import check_bool, config_key
from topologies.registry import TOPOLOGIES, TopologyBuilder
from topologies.validate import validate_graph

SCHEDULE_KEYS = ("resample_every", "p_fail")
"""Keys every topology config has for a network that changes between rounds; the round schedule
(sim/experiment/schedule.py) reads them, and the builders never see them."""


def build_topology(name: str, num_agents: int, seed: int, params: Mapping[str, Any], draw: int = 0) -> nx.DiGraph[int]:
    """The communication graph of `num_agents` agents, with edge u -> v when v hears u.

    Args:
        name: a registered topology, as in `conf/topology/NAME.yaml`.
        num_agents: K; the graph has nodes 0..K-1.
        seed: the experiment's root seed. Random topologies draw from their own stream
            derived from it, so changing other streams never changes the graph.
        params: the topology's config without `name`: the builder's params plus
            `require_connected` and the SCHEDULE_KEYS, which every topology accepts.
        draw: which draw of a re-drawn topology (`topology.resample_every`): each has its own
            stream, and draw 0 is the graph of a static run. Only draw 0 must be connected when
            `require_connected`: a re-drawn graph need not be, as long as the draws together are.

    Raises:
        ConfigError: for an unknown name, a missing, unknown or bad param, or a graph
            that fails `validate_graph`.
    """
    builder = TOPOLOGIES.get(name)
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ConfigError("num_agents", num_agents, "must be a positive integer")
    builder_params = {key: value for key, value in params.items() if key not in SCHEDULE_KEYS}
    require_connected = check_bool("require_connected", builder_params.pop("require_connected", None))
    _check_param_names(name, builder, builder_params)
    graph = builder(num_agents, derive_seed(seed, "topology", draw), **builder_params)
    validate_graph(graph, num_agents, require_connected and draw == 0)
    return graph


def _check_param_names(name: str, builder: TopologyBuilder, params: Mapping[str, Any]) -> None:
    """Refuse unknown and missing params with the key to fix, instead of a TypeError.

    Builders have no defaults, so a missing param means the YAML that holds them was not used.
    """
    expected = {
        param.name
        for param in inspect.signature(builder).parameters.values()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    accepted = ", ".join(sorted(expected | {"require_connected", *SCHEDULE_KEYS}))
    unknown = sorted(params.keys() - expected)
    if unknown:
        raise ConfigError(config_key(unknown[0]), params[unknown[0]], f"topology {name!r} takes only {accepted}")
    missing = sorted(expected - params.keys())
    if missing:
        raise ConfigError(config_key(missing[0]), None, f"topology {name!r} needs it (see conf/topology/{name}.yaml)")
