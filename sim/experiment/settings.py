"""What a config fixes without reading any data, checked in milliseconds: `Settings`.

Preflight runs `check_config` for every job of a sweep before the first one starts, so a bad
value in any job is reported (one-line ConfigError) before work starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch
from omegaconf import DictConfig

from agents.agent import TrainConfig
from agents.backbones.registry import BACKBONES, check_param_names
from sim.backends.faults import parse_faults
from sim.backends.ray.address import RayTarget, check_cluster_address
from sim.backends.ray.cluster import cluster_config
from sim.backends.runtime import MIN_AGENT_BYTES, RuntimeConfig, check_gpus_exist, check_population_fits
from sim.backends.storage import storage_root
from sim.core.errors import ConfigError
from sim.core.validation import (
    boolean,
    int_between,
    non_negative_int,
    non_negative_number,
    optional_positive_int,
    positive_int,
    positive_number,
)
from sim.data.datasets import DATASETS
from sim.data.options import check_options
from sim.data.partition import PARTITIONERS
from sim.experiment.backbones import (
    AgentBackbone,
    agent_train_configs,
    backbone_assignment,
    distinct_backbones,
)
from sim.experiment.convergence import ConvergenceRule, convergence_rule
from sim.experiment.methods import METHODS, MethodPlan
from sim.experiment.optimizer import train_config
from sim.experiment.params import builder_params
from sim.experiment.privacy import check_privacy, privacy_group
from sim.experiment.schedule import NetworkSchedule, network_schedule
from topologies import build_topology

# Keys of conf/data/*.yaml consumed here; the rest are options of the dataset loader.
DATA_SPLIT_KEYS = ("name", "root", "public_size", "public_batch_size")


MAX_AUX_HEADS = 16
"""Upper bound on model.aux_heads. Each head adds public_batch x classes logits to every message
and a distillation term to every step, so 16 heads already send 17 times the single-head
traffic; a larger value is far more likely a slip (a round count in the wrong key) than a study."""


@dataclass(frozen=True)
class Settings:
    """What a config fixes without reading any data; `check_config` builds it."""

    num_agents: int
    rounds: int
    eval_every: int
    eval_subset_size: int | None  # test samples evaluated during training; None: all of them
    convergence: ConvergenceRule  # when the run counts as still rising at its end
    seed: int
    method_name: str
    method: MethodPlan
    graph: nx.DiGraph  # edge u -> v: v distils from u's predictions
    runtime: RuntimeConfig
    train: TrainConfig  # the train group as configured
    backbones: tuple[AgentBackbone, ...]  # per agent, as configured (one object per distinct backbone)
    agent_train: tuple[TrainConfig, ...]  # per agent: train with its backbone's optimizer overrides
    public_size: int
    public_batch_size: int
    schedule: NetworkSchedule  # the network of every round: live edges, active agents, delays (docs/dynamic.md)


def check_config(cfg: DictConfig) -> Settings:
    """Every check that needs no data: scalars, registered names, builder options, optimizer, graph.

    It is cheap (milliseconds once torch has built its first optimizer), so preflight runs it
    for every job of a sweep before the first one starts; build_experiment runs it again before
    loading data. Raises ConfigError.
    """
    boolean("debug", cfg.debug)
    num_agents = positive_int("num_agents", cfg.num_agents)
    seed = non_negative_int("seed", cfg.seed)
    aux_heads = int_between("model.aux_heads", cfg.model.aux_heads, 0, MAX_AUX_HEADS)
    public_size = positive_int("data.public_size", cfg.data.public_size)
    public_batch_size = positive_int("data.public_batch_size", cfg.data.public_batch_size)
    if public_batch_size > public_size:
        raise ConfigError("data.public_batch_size", public_batch_size, f"at most data.public_size={public_size}")
    runtime = runtime_config(cfg.runtime)
    check_population_fits(num_agents, MIN_AGENT_BYTES, runtime, "the smallest possible agent")  # before the graph
    backbones = backbone_assignment(cfg.backbone, num_agents)
    _check_builder_options(cfg, backbones)
    train = train_config(cfg.train)
    check_privacy(privacy_group(cfg), cfg.method, cfg.runtime)
    rounds = positive_int("rounds", cfg.rounds)
    method = METHODS.get(str(cfg.method.name))(builder_params(cfg.method), aux_heads)
    graph = build_topology(str(cfg.topology.name), num_agents, seed, builder_params(cfg.topology))
    return Settings(
        num_agents=num_agents,
        rounds=rounds,
        eval_every=positive_int("eval_every", cfg.eval_every),
        eval_subset_size=optional_positive_int("eval_subset_size", cfg.eval_subset_size),
        convergence=convergence_rule(cfg.convergence),
        seed=seed,
        method_name=str(cfg.method.name),
        method=method,
        graph=graph,
        runtime=runtime,
        train=train,
        backbones=tuple(backbones),
        agent_train=agent_train_configs(backbones, train),
        public_size=public_size,
        public_batch_size=public_batch_size,
        schedule=network_schedule(cfg, num_agents, seed, rounds, method, graph),
    )


def runtime_config(runtime: DictConfig) -> RuntimeConfig:
    """The runtime group as a RuntimeConfig; GPUs and a cluster address are checked to exist."""
    config = RuntimeConfig(
        backend=str(runtime.backend),
        address=None if runtime.address is None else str(runtime.address),
        num_cpus=optional_positive_int("runtime.num_cpus", runtime.num_cpus),
        agents_per_actor=optional_positive_int("runtime.agents_per_actor", runtime.agents_per_actor),
        num_cpus_per_actor=positive_number("runtime.num_cpus_per_actor", runtime.num_cpus_per_actor),
        num_gpus_per_actor=non_negative_number("runtime.num_gpus_per_actor", runtime.num_gpus_per_actor),
        torch_threads=optional_positive_int("runtime.torch_threads", runtime.torch_threads),
        startup_timeout_s=positive_number("runtime.startup_timeout_s", runtime.startup_timeout_s),
        round_timeout_s=positive_number("runtime.round_timeout_s", runtime.round_timeout_s),
        max_actor_restarts=non_negative_int("runtime.max_actor_restarts", runtime.max_actor_restarts),
        channels_last=boolean("runtime.channels_last", runtime.channels_last),
        compile=boolean("runtime.compile", runtime.compile),
        vectorize=boolean("runtime.vectorize", runtime.vectorize),
        bf16=boolean("runtime.bf16", runtime.bf16),
        eval_channels_last=boolean("runtime.eval_channels_last", runtime.eval_channels_last),
        cluster=cluster_config(runtime),
        faults=parse_faults(runtime.faults),
        storage=storage_root(runtime.storage),
        keep_actors=boolean("runtime.keep_actors", runtime.keep_actors),
        kept_idle_s=positive_number("runtime.kept_idle_s", runtime.kept_idle_s),
    )
    if config.keep_actors and (config.backend != "ray" or config.address is None):
        raise ConfigError(
            "runtime.keep_actors",
            runtime.keep_actors,
            "false unless runtime.backend=ray and runtime.address is set (a Ray this run starts stops with it: "
            "start one with `ray start --head`, docs/performance.md#warm-mode)",
        )
    if config.faults and config.backend != "ray":
        raise ConfigError(
            "runtime.faults", runtime.faults, "[] unless runtime.backend=ray (a fault kills an agent worker process)"
        )
    check_gpus_exist(config, torch.cuda.is_available())
    if config.backend == "ray":
        check_cluster_address(RayTarget.of(config))
    return config


def _check_builder_options(cfg: DictConfig, backbones: Sequence[AgentBackbone]) -> None:
    """Names and option keys of the dataset, partitioner and backbone, against their signatures."""
    data, partitioner = str(cfg.data.name), str(cfg.partition.name)
    check_options("data", data, DATASETS.get(data), builder_params(cfg.data, drop=DATA_SPLIT_KEYS))
    check_options("partition", partitioner, PARTITIONERS.get(partitioner), builder_params(cfg.partition))
    for backbone in distinct_backbones(backbones):
        check_param_names(backbone.name, BACKBONES.get(backbone.name), backbone.params)
