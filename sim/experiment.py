"""Assemble a run from the composed config: data, partition, graph, method, agent specs.

Everything here happens in the driver before any worker exists, so every bad value is
reported (as a one-line ConfigError) before work starts. Config dicts stop here: what goes on
to the backends and agents is typed (AgentSpec, PublicData, RuntimeConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import networkx as nx
import numpy as np
from omegaconf import DictConfig, OmegaConf

from agents.agent import AgentSpec, PublicData, TrainConfig
from agents.model import ModelConfig
from sim.datasets import DatasetSplits, load_dataset, split_public_private
from sim.errors import ConfigError
from sim.methods import METHODS, MethodPlan
from sim.partition import class_count_matrix, partition
from sim.placement import RuntimeConfig
from sim.seeding import derive_seed
from sim.validation import (
    non_negative_int,
    optional_positive_int,
    positive_int,
    positive_number,
)
from topologies import build_topology, in_neighbours

# Keys of conf/data/*.yaml consumed here; the rest are options of the dataset loader.
DATA_SPLIT_KEYS = ("name", "root", "public_size", "public_batch_size")


@dataclass(frozen=True)
class Experiment:
    """A fully validated run, ready to be placed on a backend."""

    num_agents: int
    rounds: int
    eval_every: int
    seed: int
    method_name: str
    method: MethodPlan
    graph: nx.DiGraph  # edge u -> v: v distils from u's predictions
    class_counts: np.ndarray  # [K, C] private samples per agent and class
    specs: list[AgentSpec]  # one per model (a single one for the central method)
    public: PublicData
    runtime: RuntimeConfig
    dataset: str


def build_experiment(cfg: DictConfig) -> Experiment:
    """Validate `cfg` and build everything a backend needs; raises ConfigError on bad input."""
    num_agents = positive_int("num_agents", cfg.num_agents)
    rounds = positive_int("rounds", cfg.rounds)
    eval_every = positive_int("eval_every", cfg.eval_every)
    seed = non_negative_int("seed", cfg.seed)
    method_params = _params(cfg.method)
    method = METHODS.get(str(cfg.method.name))(method_params, non_negative_int("model.aux_heads", cfg.model.aux_heads))
    runtime = runtime_config(cfg.runtime)
    train = train_config(cfg.train)

    splits = load_dataset(str(cfg.data.name), cfg.data.root, seed, **_params(cfg.data, drop=DATA_SPLIT_KEYS))
    public_size = positive_int("data.public_size", cfg.data.public_size)
    public_batch_size = positive_int("data.public_batch_size", cfg.data.public_batch_size)
    if public_size >= len(splits.train.y):
        raise ConfigError("data.public_size", public_size, f"smaller than the {len(splits.train.y)} training samples")
    if public_batch_size > public_size:
        raise ConfigError("data.public_batch_size", public_batch_size, f"at most data.public_size={public_size}")
    split = split_public_private(splits.train, public_size, seed)
    parts = partition(
        str(cfg.partition.name), split.private.y, num_agents, splits.num_classes, seed, **_params(cfg.partition)
    )
    class_counts = class_count_matrix(split.private.y, parts, splits.num_classes)
    graph = build_topology(str(cfg.topology.name), num_agents, seed, _params(cfg.topology))
    if not method.exchanges:
        graph = nx.create_empty_copy(graph)  # no messages: no edges carry anything

    model = _model_config(cfg, splits, method)
    neighbours = in_neighbours(graph)
    specs = [
        AgentSpec(
            agent_id=agent_id,
            seed=derive_seed(seed, "agent", agent_id),
            in_neighbours=tuple(neighbours[agent_id]),
            private_x=split.private.x[part],
            private_y=split.private.y[part],
            model=model,
            train=train,
            distill=method.distill,
            message_dtype=method.message_dtype,
        )
        for agent_id, part in enumerate(parts)
    ]
    if method.central:
        specs = [_central_spec(specs, seed)]
    public = PublicData(
        split.public_x, public_batch_size, derive_seed(seed, "public_schedule"), splits.test.x, splits.test.y
    )
    return Experiment(
        num_agents,
        rounds,
        eval_every,
        seed,
        str(cfg.method.name),
        method,
        graph,
        class_counts,
        specs,
        public,
        runtime,
        splits.name,
    )


def runtime_config(runtime: DictConfig) -> RuntimeConfig:
    return RuntimeConfig(
        backend=str(runtime.backend),
        address=None if runtime.address is None else str(runtime.address),
        num_cpus=optional_positive_int("runtime.num_cpus", runtime.num_cpus),
        agents_per_actor=optional_positive_int("runtime.agents_per_actor", runtime.agents_per_actor),
        num_cpus_per_actor=positive_number("runtime.num_cpus_per_actor", runtime.num_cpus_per_actor),
        num_gpus_per_actor=float(runtime.num_gpus_per_actor),
        torch_threads=optional_positive_int("runtime.torch_threads", runtime.torch_threads),
        startup_timeout_s=positive_number("runtime.startup_timeout_s", runtime.startup_timeout_s),
        round_timeout_s=positive_number("runtime.round_timeout_s", runtime.round_timeout_s),
        max_actor_restarts=non_negative_int("runtime.max_actor_restarts", runtime.max_actor_restarts),
    )


def train_config(train: DictConfig) -> TrainConfig:
    optimizer = OmegaConf.to_container(train.optimizer, resolve=True)
    if not isinstance(optimizer, dict) or "_target_" not in optimizer:
        raise ConfigError("train.optimizer", optimizer, "a mapping with _target_ (e.g. torch.optim.SGD) and its kwargs")
    return TrainConfig(
        local_steps=positive_int("train.local_steps", train.local_steps),
        batch_size=positive_int("train.batch_size", train.batch_size),
        distill_batch_size=positive_int("train.distill_batch_size", train.distill_batch_size),
        eval_batch_size=positive_int("train.eval_batch_size", train.eval_batch_size),
        optimizer={str(key): value for key, value in optimizer.items()},
    )


def _model_config(cfg: DictConfig, splits: DatasetSplits, method: MethodPlan) -> ModelConfig:
    projection = None
    if method.distill is not None and method.distill.nu_emb > 0:
        projection = positive_int("model.embedding_dim", cfg.model.embedding_dim)
    return ModelConfig(
        backbone=str(cfg.backbone.name),
        backbone_params=_params(cfg.backbone),
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        aux_heads=method.aux_heads,
        embedding_projection=projection,
    )


def _central_spec(specs: list[AgentSpec], seed: int) -> AgentSpec:
    """One model on the union of all shards, with as many optimizer steps as the population."""
    first = specs[0]
    train = replace(first.train, local_steps=first.train.local_steps * len(specs))
    return replace(
        first,
        seed=derive_seed(seed, "central"),
        in_neighbours=(),
        private_x=np.concatenate([spec.private_x for spec in specs]),
        private_y=np.concatenate([spec.private_y for spec in specs]),
        train=train,
    )


def _params(group: DictConfig, drop: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    """A config group as plain kwargs for its registered builder (without `name`)."""
    params = OmegaConf.to_container(group, resolve=True)
    assert isinstance(params, dict)
    return {str(key): value for key, value in params.items() if key not in drop}
