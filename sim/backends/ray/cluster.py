"""Running on a Ray cluster: the runtime keys for it, the code that travels with a job, and
private shards read on the node of the agent that owns them.

Attaching to a cluster (`runtime.address`) ships this project's packages with the job through
Ray's runtime_env, so the nodes need the dependencies but not a copy of the code. With
`runtime.shard_source=node` every actor reads its agents' private shards from `data.root` on
its own node (a shared filesystem or a copy per node): the driver sends each actor only row
indices and a digest, so private samples never cross the network, and a node whose files
differ from the driver's stops the run by name instead of training on other data.

Nothing here imports Ray: the driver uses it to validate a config before any cluster is
contacted, and an actor uses it to read its shards (sim/backends/ray/backend.py).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from agents.agent import AgentSpec
from agents.backbones.registry import BACKBONES
from sim.core.config import to_plain
from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.core.validation import boolean, positive_number
from sim.data.datasets import load_dataset, split_public_private

PLACEMENT_STRATEGIES = ("PACK", "SPREAD")
"""Ray placement-group strategies offered: both fall back to any node with room, where the
STRICT_ ones would leave a run waiting whenever the cluster is busy."""

BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
"""Ray resources set by num_cpus / num_gpus or by Ray itself; `resources` is for custom ones."""

BACKBONE_RESOURCE_KEYS = ("num_cpus", "num_gpus", "resources")

SHIPPED_PACKAGES = ("sim", "agents", "topologies", "conf")
"""Top-level packages of mhd-sim: what an actor on another node imports (conf is the config tree)."""

SHIPPING_EXCLUDES = ["__pycache__", "*.pyc"]


@dataclass(frozen=True)
class ClusterConfig:
    """The runtime keys that place actors on a cluster and choose what travels with them."""

    placement_strategy: str  # one of PLACEMENT_STRATEGIES
    resources: dict[str, float] = field(hash=False)  # custom Ray resources every actor asks for (node affinity)
    backbone_resources: dict[str, dict[str, float]] = field(hash=False)  # backbone -> Ray resource -> amount
    shard_source: str  # registered in SHARD_SOURCES: who reads the private shards
    ship_code: bool  # with an address: upload SHIPPED_PACKAGES through Ray's runtime_env


def cluster_config(runtime: DictConfig) -> ClusterConfig:
    """The cluster keys of the runtime group, validated (a ConfigError names the bad key)."""
    strategy = runtime.placement_strategy
    if strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError("runtime.placement_strategy", strategy, f"one of {', '.join(PLACEMENT_STRATEGIES)}")
    shard_source = str(runtime.shard_source)
    SHARD_SOURCES.get(shard_source)
    return ClusterConfig(
        placement_strategy=str(strategy),
        resources=custom_resources("runtime.resources", runtime.resources),
        backbone_resources=_backbone_resources(runtime.backbone_resources),
        shard_source=shard_source,
        ship_code=boolean("runtime.ship_code", runtime.ship_code),
    )


def custom_resources(key: str, node: Any) -> dict[str, float]:
    """A mapping of custom Ray resource names to amounts > 0 (nodes get them with `ray start --resources`)."""
    amounts = _mapping(key, node, "a mapping of custom resource names to amounts, e.g. {ssd: 1}")
    for name, amount in amounts.items():
        if name in BUILTIN_RESOURCES or name.startswith("node:"):
            raise ConfigError(f"{key}.{name}", amount, "a custom resource name; CPUs and GPUs have their own keys")
        positive_number(f"{key}.{name}", amount)
    return {name: float(amount) for name, amount in amounts.items()}


def _backbone_resources(node: Any) -> dict[str, dict[str, float]]:
    """backbone name -> the Ray resources one actor of its agents asks for (only the keys given)."""
    key = "runtime.backbone_resources"
    by_backbone = _mapping(key, node, "a mapping of backbone names to {num_cpus, num_gpus, resources}")
    requests = {}
    for backbone, entry in by_backbone.items():
        if backbone not in BACKBONES:
            raise ConfigError(key, backbone, f"registered backbones: {', '.join(BACKBONES.names())}")
        prefix = f"{key}.{backbone}"
        fields = _mapping(prefix, entry, f"a mapping with keys among {', '.join(BACKBONE_RESOURCE_KEYS)}")
        unknown = sorted(set(fields) - set(BACKBONE_RESOURCE_KEYS))
        if unknown:
            allowed = f"one of {', '.join(BACKBONE_RESOURCE_KEYS)}"
            raise ConfigError(f"{prefix}.{unknown[0]}", fields[unknown[0]], allowed)
        amounts = custom_resources(f"{prefix}.resources", fields.get("resources"))
        if "num_cpus" in fields:
            amounts["CPU"] = positive_number(f"{prefix}.num_cpus", fields["num_cpus"])
        if "num_gpus" in fields:
            amounts["GPU"] = _non_negative(f"{prefix}.num_gpus", fields["num_gpus"])
        requests[backbone] = amounts
    return requests


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(key, value, "a number >= 0")
    return float(value)


def _mapping(key: str, node: Any, allowed: str) -> dict[str, Any]:
    """`node` as a plain dict; null is the empty mapping (so that `key={...}` can set it from the command line)."""
    if node is None:
        return {}
    node = to_plain(node)
    if not isinstance(node, Mapping):
        raise ConfigError(key, node, allowed)
    return {str(name): value for name, value in node.items()}


def shipped_code() -> dict[str, Any]:
    """Ray runtime_env that uploads mhd-sim's packages with the job (py_modules).

    Uploading the package folders rather than the working directory sends exactly the code,
    wherever mhd-sim is installed from (a checkout, an editable install or a wheel), and never
    the run outputs or virtual environments that a working directory tends to hold.
    """
    folders = [str(Path(str(importlib.import_module(name).__file__)).parent) for name in SHIPPED_PACKAGES]
    return {"py_modules": folders, "excludes": SHIPPING_EXCLUDES}


# ---- private shards ------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """How the driver read the dataset, so that another node can read it the same way."""

    name: str  # registered dataset
    root: str | None  # data.root: the same path on every node (shared filesystem or copies)
    seed: int  # root seed: test split of datasets without one, public/private split
    options: dict[str, Any] = field(hash=False)  # the dataset's own options (conf/data/NAME.yaml)
    public_size: int  # samples set aside as the public set before partitioning


@dataclass(frozen=True)
class PrivateData:
    """Where each agent's private shard lives in the dataset: what a node needs to read it itself."""

    source: DataSource
    rows: dict[int, np.ndarray] = field(hash=False)  # agent id (of a spec) -> indices into the private split


@dataclass(frozen=True)
class ShardRef:
    """One agent's shard by reference: rows of the private split and the digest of what they hold."""

    agent_id: int
    rows: np.ndarray  # [n] int64 indices into the private split
    digest: str  # shard_digest of the samples as the driver read them


@dataclass(frozen=True)
class NodeShards:
    """What an actor receives instead of samples: the dataset to read and its agents' rows."""

    source: DataSource
    refs: tuple[ShardRef, ...]


class NodeDataError(RuntimeError):
    """A node could not read the private shards the driver planned; holds a ConfigError's fields.

    A ConfigError does not survive Ray's pickling (its constructor takes three arguments, its
    args hold one message), so the node raises this and the driver turns it back.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(key, value, allowed)

    def config_error(self) -> ConfigError:
        key, value, allowed = self.args
        return ConfigError(key, value, allowed)


def shard_digest(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of a shard's images and labels: equal only for bit-identical samples."""
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


ShardShipping = Callable[[Sequence[AgentSpec], PrivateData], tuple[list[AgentSpec], NodeShards | None]]
"""`(specs, private data) -> (specs to send, what the actor must read itself or None)`."""

SHARD_SOURCES: Registry[ShardShipping] = Registry("runtime.shard_source")


@SHARD_SOURCES.register("driver")
def shards_from_driver(specs: Sequence[AgentSpec], private: PrivateData) -> tuple[list[AgentSpec], NodeShards | None]:
    """Specs keep their samples: Ray carries them from the driver to the actor's node."""
    return list(specs), None


@SHARD_SOURCES.register("node")
def shards_read_on_node(specs: Sequence[AgentSpec], private: PrivateData) -> tuple[list[AgentSpec], NodeShards | None]:
    """Specs travel without samples; the actor reads them from data.root on its own node."""
    refs = tuple(
        ShardRef(spec.agent_id, private.rows[spec.agent_id], shard_digest(spec.private_x, spec.private_y))
        for spec in specs
    )
    empty = [replace(spec, private_x=spec.private_x[:0], private_y=spec.private_y[:0]) for spec in specs]
    return empty, NodeShards(private.source, refs)


def read_shards(specs: Sequence[AgentSpec], shards: NodeShards, node: str) -> list[AgentSpec]:
    """On the actor's node: `specs` with their samples read from data.root here, checked against the driver's.

    Raises:
        NodeDataError: naming `node` and the path, when a file is missing or corrupt here, or
            when the samples read here differ from those the driver read.
    """
    source = shards.source
    try:
        splits = load_dataset(source.name, source.root, source.seed, **source.options)
    except ConfigError as error:
        raise NodeDataError(error.key, error.value, f"on node {node}: {error.allowed}") from None
    except OSError as error:
        raise NodeDataError("data.root", source.root, f"readable on node {node}: {error}") from None
    private = split_public_private(splits.train, source.public_size, source.seed).private
    refs = {ref.agent_id: ref for ref in shards.refs}
    read = []
    for spec in specs:
        ref = refs[spec.agent_id]
        x, y = private.x[ref.rows], private.y[ref.rows]
        if shard_digest(x, y) != ref.digest:
            raise NodeDataError(
                "data.root",
                source.root,
                f"the same dataset on every node: node {node} read other samples for agent {spec.agent_id} "
                "than the driver did (other files, or another numpy build); or set runtime.shard_source=driver",
            )
        read.append(replace(spec, private_x=x, private_y=y))
    return read
