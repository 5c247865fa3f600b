"""Assemble a run from the composed config: data, partition, graph, method, agent specs.

`check_config` (sim/experiment/settings.py) checks what needs no data; `build_experiment` then
loads the data and builds the agents' specs. Everything happens in the driver before any worker
exists, so every bad value is reported (as a one-line ConfigError) before work starts. Config
dicts stop here: what goes on to the backends and agents is typed (AgentSpec, PublicData,
RuntimeConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx
import numpy as np
from omegaconf import DictConfig

from agents.agent import AgentSpec, PublicData
from sim.backends.ray.cluster import DataSource, PrivateData
from sim.backends.runtime import RuntimeConfig, check_population_fits
from sim.core.errors import ConfigError
from sim.core.seeding import derive_rng, derive_seed
from sim.data.core import stratified_rows
from sim.data.datasets import load_dataset, split_public_private
from sim.data.partition import class_count_matrix, partition
from sim.experiment.backbones import check_model_builds, model_configs
from sim.experiment.output_privacy import OutputPrivacyPlan
from sim.experiment.params import builder_params
from sim.experiment.privacy import PrivacyPlan, check_privacy, plan_privacy, privacy_group
from sim.experiment.settings import DATA_SPLIT_KEYS, Settings, check_config
from topologies import in_neighbours

PARAMETER_COPIES = 4
"""float32 copies of every parameter an agent keeps at least: weights, gradients and two optimizer
buffers (Adam's moments; SGD's momentum needs one), a floor for the memory check."""


@dataclass(frozen=True)
class Experiment:
    """A fully validated run, ready to be placed on a backend: the settings, and what the data made of them."""

    settings: Settings
    graph: nx.DiGraph  # the settings' graph, emptied for methods without messages
    class_counts: np.ndarray  # [K, C] private samples per agent and class
    specs: list[AgentSpec]  # one per model (a single one for the central method)
    public: PublicData
    dataset: str
    private: PrivateData  # each spec's rows of the dataset, for actors that read them on their node
    privacy: PrivacyPlan | OutputPrivacyPlan | None = None  # dp_sgd, or an output mechanism, and its accounting

    # What a backend needs (sim.backends.base.Workload) besides specs and private:
    @property
    def runtime(self) -> RuntimeConfig:
        return self.settings.runtime

    @property
    def num_agents(self) -> int:
        return self.settings.num_agents


def evaluation_rows(test_y: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """The test rows evaluated during training: a stratified, seeded subset of about `size` (all if None or larger).

    Every agent is evaluated on the same rows, so their accuracies stay comparable; the final
    evaluation always uses the whole test set (docs/performance.md#evaluation).
    """
    if size is None or size >= len(test_y):
        return np.arange(len(test_y), dtype=np.int64)
    return stratified_rows(test_y, size / len(test_y), derive_rng(seed, "eval_subset"))


def build_experiment(cfg: DictConfig) -> Experiment:
    """Validate `cfg` and build everything a backend needs; raises ConfigError on bad input.

    After `check_config`, the checks that need the data: dataset files, sizes against the
    data, a partition that leaves no agent empty, and a model that builds for these images.
    """
    settings = check_config(cfg)
    num_agents, seed, method = settings.num_agents, settings.seed, settings.method
    root = None if cfg.data.root is None else str(cfg.data.root)  # a folder may be named 2024
    splits = load_dataset(str(cfg.data.name), root, seed, **builder_params(cfg.data, drop=DATA_SPLIT_KEYS))
    if settings.public_size >= len(splits.train.y):
        raise ConfigError(
            "data.public_size", settings.public_size, f"smaller than the {len(splits.train.y)} training samples"
        )
    split = split_public_private(splits.train, settings.public_size, seed)
    parts = partition(
        str(cfg.partition.name), split.private.y, num_agents, splits.num_classes, seed, **builder_params(cfg.partition)
    )
    _check_every_agent_has_data(parts, str(cfg.partition.name))
    class_counts = class_count_matrix(split.private.y, parts, splits.num_classes)
    graph = settings.graph if method.exchanges else nx.create_empty_copy(settings.graph)  # no messages, no edges
    models = model_configs(cfg, splits, method, settings.backbones)
    shard_bytes = max(len(part) for part in parts) * split.private.x[:1].nbytes  # the largest shard, not copied
    for model in dict.fromkeys(models):  # each distinct architecture once
        parameters = check_model_builds(model)
        need = parameters * 4 * PARAMETER_COPIES + shard_bytes  # float32
        check_population_fits(num_agents, need, settings.runtime, "weights, gradients, optimizer state and its shard")
    neighbours = in_neighbours(graph)
    specs = [
        AgentSpec(
            agent_id=agent_id,
            seed=derive_seed(seed, "agent", agent_id),
            in_neighbours=tuple(neighbours[agent_id]),
            private_x=split.private.x[part],
            private_y=split.private.y[part],
            model=models[agent_id],
            train=settings.agent_train[agent_id],
            distill=method.distill,
            message_codec=method.message_codec,
        )
        for agent_id, part in enumerate(parts)
    ]
    specs, privacy = plan_privacy(
        check_privacy(privacy_group(cfg), cfg.method, cfg.runtime), specs, settings.rounds, settings.public_batch_size
    )
    if privacy is not None:  # on_budget_exhausted=stop_run: the last round within every agent's budget
        settings = replace(settings, rounds=privacy.rounds)
    if method.central:
        specs = [_central_spec(specs, seed)]
        parts = [np.concatenate(parts)]  # the central model's rows: every shard, in agent order
    public = PublicData(
        split.public_x,
        settings.public_batch_size,
        derive_seed(seed, "public_schedule"),
        splits.test.x,
        splits.test.y,
        eval_rows=evaluation_rows(splits.test.y, settings.eval_subset_size, seed),
    )
    private = PrivateData(
        DataSource(
            str(cfg.data.name), root, seed, builder_params(cfg.data, drop=DATA_SPLIT_KEYS), settings.public_size
        ),
        {spec.agent_id: rows for spec, rows in zip(specs, parts, strict=True)},
    )
    return Experiment(settings, graph, class_counts, specs, public, splits.name, private, privacy)


def _check_every_agent_has_data(parts: list[np.ndarray], partition_name: str) -> None:
    """Every agent needs at least one private sample.

    A shard smaller than train.batch_size is fine: the Agent then uses its whole shard per step.
    """
    sizes = [len(part) for part in parts]
    if min(sizes) == 0:
        raise ConfigError(
            "num_agents",
            len(parts),
            f"at most as many agents as partition {partition_name} gives a sample each (agent {sizes.index(0)} "
            f"got none of the {sum(sizes)} samples dealt); use fewer agents or change the partition",
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
