"""Assemble a run from the composed config: data, partition, graph, method, agent specs.

Everything here happens in the driver before any worker exists, so every bad value is
reported (as a one-line ConfigError) before work starts. Config dicts stop here: what goes on
to the backends and agents is typed (AgentSpec, PublicData, RuntimeConfig).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import networkx as nx
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from agents.agent import AgentSpec, PublicData, TrainConfig
from agents.backbones.registry import BACKBONES, check_param_names
from agents.model import ModelConfig, MultiHeadModel
from sim.backends.faults import parse_faults
from sim.backends.ray.cluster import DataSource, PrivateData, cluster_config
from sim.backends.ray.placement import (
    MIN_AGENT_BYTES,
    RuntimeConfig,
    check_cluster_address,
    check_gpus_exist,
    check_population_fits,
)
from sim.core.config import plain_dict, to_plain
from sim.core.errors import ConfigError
from sim.core.seeding import derive_rng, derive_seed
from sim.core.validation import (
    boolean,
    int_between,
    non_negative_int,
    non_negative_number,
    optional_positive_int,
    positive_int,
    positive_number,
)
from sim.data.core import stratified_rows
from sim.data.datasets import DATASETS, DatasetSplits, load_dataset, split_public_private
from sim.data.options import check_options
from sim.data.partition import PARTITIONERS, class_count_matrix, partition
from sim.experiment.convergence import ConvergenceRule, convergence_rule
from sim.experiment.methods import METHODS, MethodPlan
from sim.experiment.schedule import NetworkSchedule, network_schedule
from topologies import build_topology, in_neighbours

MIXED_BACKBONES = "mixed"  # conf/backbone/mixed.yaml: per-agent backbones from a pattern

# Keys of conf/backbone/*.yaml read here; the rest are the builder's options.
BACKBONE_OWN_KEYS = ("name", "optimizer")

# Keys of conf/data/*.yaml consumed here; the rest are options of the dataset loader.
DATA_SPLIT_KEYS = ("name", "root", "public_size", "public_batch_size")

PARAMETER_COPIES = 4
"""float32 copies of every parameter an agent keeps at least: weights, gradients and two optimizer
buffers (Adam's moments; SGD's momentum needs one), a floor for the memory check."""

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


@dataclass(frozen=True)
class Experiment(Settings):
    """A fully validated run, ready to be placed on a backend: the settings plus the data."""

    class_counts: np.ndarray  # [K, C] private samples per agent and class
    specs: list[AgentSpec]  # one per model (a single one for the central method)
    public: PublicData
    dataset: str
    private: PrivateData  # each spec's rows of the dataset, for actors that read them on their node


def evaluation_rows(test_y: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """The test rows evaluated during training: a stratified, seeded subset of about `size` (all if None or larger).

    Every agent is evaluated on the same rows, so their accuracies stay comparable; the final
    evaluation always uses the whole test set (docs/performance.md#evaluation).
    """
    if size is None or size >= len(test_y):
        return np.arange(len(test_y), dtype=np.int64)
    return stratified_rows(test_y, size / len(test_y), derive_rng(seed, "eval_subset"))


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
    rounds = positive_int("rounds", cfg.rounds)
    method = METHODS.get(str(cfg.method.name))(_params(cfg.method), aux_heads)
    graph = build_topology(str(cfg.topology.name), num_agents, seed, _params(cfg.topology))
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


def build_experiment(cfg: DictConfig) -> Experiment:
    """Validate `cfg` and build everything a backend needs; raises ConfigError on bad input.

    After `check_config`, the checks that need the data: dataset files, sizes against the
    data, a partition that leaves no agent empty, and a model that builds for these images.
    """
    settings = check_config(cfg)
    num_agents, seed, method = settings.num_agents, settings.seed, settings.method
    root = None if cfg.data.root is None else str(cfg.data.root)  # a folder may be named 2024
    splits = load_dataset(str(cfg.data.name), root, seed, **_params(cfg.data, drop=DATA_SPLIT_KEYS))
    if settings.public_size >= len(splits.train.y):
        raise ConfigError(
            "data.public_size", settings.public_size, f"smaller than the {len(splits.train.y)} training samples"
        )
    split = split_public_private(splits.train, settings.public_size, seed)
    parts = partition(
        str(cfg.partition.name), split.private.y, num_agents, splits.num_classes, seed, **_params(cfg.partition)
    )
    _check_every_agent_has_data(parts, str(cfg.partition.name))
    class_counts = class_count_matrix(split.private.y, parts, splits.num_classes)
    graph = settings.graph if method.exchanges else nx.create_empty_copy(settings.graph)  # no messages, no edges
    models = _model_configs(cfg, splits, method, settings.backbones)
    shard_bytes = max(len(part) for part in parts) * split.private.x[:1].nbytes  # the largest shard, not copied
    for model in dict.fromkeys(models):  # each distinct architecture once
        parameters = _check_model_builds(model)
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
    fixed = {field.name: getattr(settings, field.name) for field in fields(Settings)}
    fixed["graph"] = graph  # emptied for methods without messages
    private = PrivateData(
        DataSource(str(cfg.data.name), root, seed, _params(cfg.data, drop=DATA_SPLIT_KEYS), settings.public_size),
        {spec.agent_id: rows for spec, rows in zip(specs, parts, strict=True)},
    )
    return Experiment(
        **fixed, class_counts=class_counts, specs=specs, public=public, dataset=splits.name, private=private
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
        cluster=cluster_config(runtime),
        faults=parse_faults(runtime.faults),
    )
    if config.faults and config.backend != "ray":
        raise ConfigError(
            "runtime.faults", runtime.faults, "[] unless runtime.backend=ray (a fault kills an agent worker process)"
        )
    check_gpus_exist(config, torch.cuda.is_available())
    check_cluster_address(config)
    return config


def train_config(train: DictConfig) -> TrainConfig:
    """The train group as a TrainConfig, with an optimizer that is known to build."""
    node = train.optimizer
    optimizer = to_plain(node)
    if not isinstance(optimizer, dict) or "_target_" not in optimizer:
        raise ConfigError("train.optimizer", optimizer, "a mapping with _target_ (e.g. torch.optim.SGD) and its kwargs")
    kwargs = {str(key): value for key, value in optimizer.items()}
    _check_optimizer(kwargs, "train.optimizer")
    return TrainConfig(
        local_steps=positive_int("train.local_steps", train.local_steps),
        batch_size=positive_int("train.batch_size", train.batch_size),
        distill_batch_size=positive_int("train.distill_batch_size", train.distill_batch_size),
        eval_batch_size=positive_int("train.eval_batch_size", train.eval_batch_size),
        optimizer=kwargs,
    )


def agent_train_configs(backbones: Sequence[AgentBackbone], train: TrainConfig) -> tuple[TrainConfig, ...]:
    """Each agent's TrainConfig: `train` with its backbone's `optimizer` overrides applied.

    A backbone's optimizer keys replace those of train.optimizer (e.g. `{lr: 0.02}` for a
    backbone that diverges at the population's rate); an override that names another
    `_target_` replaces the whole optimizer, since the base kwargs belong to another class.
    Agents of one backbone share one TrainConfig, so the vectorised step still groups them.
    """
    merged: dict[str, TrainConfig] = {}
    for backbone in _distinct(backbones):
        overrides = backbone.optimizer
        if not overrides:
            merged[backbone.key] = train
            continue
        other_class = overrides.get("_target_", train.optimizer["_target_"]) != train.optimizer["_target_"]
        optimizer = dict(overrides) if other_class else {**train.optimizer, **overrides}
        _check_optimizer(optimizer, f"{backbone.key}.optimizer")
        merged[backbone.key] = replace(train, optimizer=optimizer)
    return tuple(merged[backbone.key] for backbone in backbones)


def _check_optimizer(optimizer: dict[str, Any], key: str) -> None:
    """Builds the optimizer as every Agent will (Hydra's instantiate), on one throwaway parameter.

    A bad `_target_` or kwarg then fails here, once, naming its key, instead of inside every
    agent after the workers have started. The class's own constructor checks the values; only
    the build goes through `_build_without_dynamo`, so that the driver of a Ray run never
    imports torch._dynamo (~2 s of start-up), which only the agents' processes need.
    """
    target = str(optimizer["_target_"])
    optimizer_class = _import_class(target, f"{key}._target_")
    if not issubclass(optimizer_class, torch.optim.Optimizer):
        raise ConfigError(f"{key}._target_", target, "a subclass of torch.optim.Optimizer")
    _check_kwarg_names(optimizer_class, optimizer, key)
    builder = f"{__name__}.{_build_without_dynamo.__name__}"
    try:
        instantiate({**optimizer, "_target_": builder}, optimizer_class, params=[torch.nn.Parameter(torch.zeros(1))])
    except InstantiationException as error:
        kwargs = {key: value for key, value in optimizer.items() if key != "_target_"}
        reason = " ".join(str(error.__cause__ or error).split())
        raise ConfigError(key, kwargs, f"{target} rejects them: {reason}") from None


class _UndecoratedParamGroups(torch.optim.Optimizer):
    """Optimizer.add_param_group without its `torch._disable_dynamo` wrapper.

    The wrapper imports torch._dynamo on its first call; the function it wraps is the same
    code, so a class that has this mixin after itself in its MRO builds exactly as it would.
    """

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)


def _build_without_dynamo(optimizer_class: type, /, **kwargs: Any) -> Any:
    """`optimizer_class(**kwargs)`, with the base class's add_param_group undecorated.

    The throwaway subclass puts `_UndecoratedParamGroups` between the class (and its own
    overrides) and torch.optim.Optimizer; a class that does not admit it (Optimizer itself)
    is built as it is.
    """
    try:
        probe = type(optimizer_class.__name__, (optimizer_class, _UndecoratedParamGroups), {})
    except TypeError:
        probe = optimizer_class
    return probe(**kwargs)


def _check_kwarg_names(optimizer_class: type, optimizer: dict[str, Any], key: str) -> None:
    """A misspelt kwarg named as its key, with the accepted ones (Hydra's `_..._` keys are its own)."""
    parameters = inspect.signature(optimizer_class).parameters
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    accepted = [name for name in parameters if name != "params"]
    for name, value in optimizer.items():
        if not name.startswith("_") and name not in accepted:
            raise ConfigError(f"{key}.{name}", value, f"{optimizer['_target_']} takes {', '.join(accepted)}")


def _import_class(path: str, key: str) -> type:
    """The class at `path` (module.Class); Hydra's own locator would log each failure to stderr."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        found = None
    if not isinstance(found, type):
        raise ConfigError(key, path, "an importable optimizer class, e.g. torch.optim.SGD")
    return found


@dataclass(frozen=True)
class AgentBackbone:
    """One agent's backbone as configured: what the builder gets and what the driver reads."""

    name: str  # registry name
    params: dict[str, Any]  # the builder's options
    optimizer: dict[str, Any]  # overrides of train.optimizer for agents with this backbone
    key: str  # where it is configured, for error messages: backbone or backbone.members.NAME


def backbone_assignment(backbone: DictConfig, num_agents: int) -> list[AgentBackbone]:
    """Each agent's backbone.

    One backbone for everyone, or `backbone=mixed`: agent i gets `pattern[i % len(pattern)]`,
    configured by `members.NAME` (conf/backbone/mixed.yaml).
    """
    if backbone.name != MIXED_BACKBONES:
        return [_agent_backbone(str(backbone.name), backbone, "backbone")] * num_agents
    pattern = backbone.get("pattern")
    members = backbone.get("members") or {}
    if not isinstance(pattern, ListConfig) or len(pattern) == 0:
        raise ConfigError("backbone.pattern", pattern, "a non-empty list of backbone names, e.g. [resnet8,small_cnn]")
    for name in pattern:
        if name not in members:
            raise ConfigError("backbone.pattern", list(pattern), f"names from backbone.members ({', '.join(members)})")
    configured = {  # each member once
        str(name): _agent_backbone(str(members[name].name), members[name], f"backbone.members.{name}")
        for name in dict.fromkeys(pattern)
    }
    return [configured[str(pattern[i % len(pattern)])] for i in range(num_agents)]


def _distinct(backbones: Sequence[AgentBackbone]) -> list[AgentBackbone]:
    """Each configured backbone once, in order of first use."""
    return list({backbone.key: backbone for backbone in backbones}.values())


def _agent_backbone(name: str, group: DictConfig, key: str) -> AgentBackbone:
    """A backbone group split into the builder's options and the optimizer overrides."""
    node = group.get("optimizer")
    optimizer = to_plain(node)
    optimizer = {} if optimizer is None else optimizer
    if not isinstance(optimizer, dict):
        raise ConfigError(f"{key}.optimizer", optimizer, "a mapping of train.optimizer keys, e.g. {lr: 0.02}")
    return AgentBackbone(
        name=name,
        params=_params(group, drop=BACKBONE_OWN_KEYS),
        optimizer={str(k): v for k, v in optimizer.items()},
        key=key,
    )


def _model_configs(
    cfg: DictConfig, splits: DatasetSplits, method: MethodPlan, backbones: Sequence[AgentBackbone]
) -> list[ModelConfig]:
    """Each agent's ModelConfig; agents of one backbone share one (equal) config object."""
    projection = None
    if method.distill is not None and method.distill.nu_emb > 0:
        projection = positive_int("model.embedding_dim", cfg.model.embedding_dim)
    built: dict[str, ModelConfig] = {}
    models = []
    for backbone in backbones:
        if backbone.key not in built:
            built[backbone.key] = ModelConfig(
                backbone=backbone.name,
                backbone_params=_with_dataset_classes(backbone.name, backbone.params, splits.num_classes),
                input_shape=splits.input_shape,
                num_classes=splits.num_classes,
                aux_heads=method.aux_heads,
                embedding_projection=projection,
            )
        models.append(built[backbone.key])
    return models


def _with_dataset_classes(name: str, params: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """A backbone's `num_classes: null` (e.g. a HyperTransformer's label embedding) is the dataset's count."""
    if "num_classes" not in params:
        return params
    if params["num_classes"] is None:
        return {**params, "num_classes": num_classes}
    if params["num_classes"] != num_classes:
        raise ConfigError(
            "backbone.num_classes", params["num_classes"], f"null or the dataset's {num_classes} classes ({name})"
        )
    return params


def _check_model_builds(model: ModelConfig) -> int:
    """Builds one throwaway model, so a bad backbone value fails here rather than in every worker; its parameters.

    The global torch RNG is left as it was: agents seed their own models.
    """
    with torch.random.fork_rng(devices=[]):
        return sum(parameter.numel() for parameter in MultiHeadModel(model).parameters())


def _check_builder_options(cfg: DictConfig, backbones: Sequence[AgentBackbone]) -> None:
    """Names and option keys of the dataset, partitioner and backbone, against their signatures."""
    data, partitioner = str(cfg.data.name), str(cfg.partition.name)
    check_options("data", data, DATASETS.get(data), _params(cfg.data, drop=DATA_SPLIT_KEYS))
    check_options("partition", partitioner, PARTITIONERS.get(partitioner), _params(cfg.partition))
    for backbone in _distinct(backbones):
        check_param_names(backbone.name, BACKBONES.get(backbone.name), backbone.params)


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


def _params(group: DictConfig, drop: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    """A config group as plain kwargs for its registered builder (without `name`)."""
    return plain_dict(group, drop=drop)
