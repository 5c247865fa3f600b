"""Which backbone each agent gets, its optimizer overrides, and the model config it builds.

One backbone for everyone, or `backbone=mixed` (conf/backbone/mixed.yaml): agent i gets
`pattern[i % len(pattern)]`. Agents of one backbone share one ModelConfig and one TrainConfig,
so the vectorised step still groups them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from agents.agent import TrainConfig
from agents.model import ModelConfig, MultiHeadModel
from sim.core.config import to_plain
from sim.core.errors import ConfigError
from sim.core.validation import (
    positive_int,
)
from sim.data.datasets import DatasetSplits
from sim.experiment.methods import MethodPlan
from sim.experiment.optimizer import check_optimizer
from sim.experiment.params import builder_params

MIXED_BACKBONES = "mixed"  # conf/backbone/mixed.yaml: per-agent backbones from a pattern

# Keys of conf/backbone/*.yaml read here; the rest are the builder's options.
BACKBONE_OWN_KEYS = ("name", "optimizer")


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


def distinct_backbones(backbones: Sequence[AgentBackbone]) -> list[AgentBackbone]:
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
        params=builder_params(group, drop=BACKBONE_OWN_KEYS),
        optimizer={str(k): v for k, v in optimizer.items()},
        key=key,
    )


def model_configs(
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


def check_model_builds(model: ModelConfig) -> int:
    """Builds one throwaway model, so a bad backbone value fails here rather than in every worker; its parameters.

    The global torch RNG is left as it was: agents seed their own models.
    """
    with torch.random.fork_rng(devices=[]):
        return sum(parameter.numel() for parameter in MultiHeadModel(model).parameters())


def agent_train_configs(backbones: Sequence[AgentBackbone], train: TrainConfig) -> tuple[TrainConfig, ...]:
    """Each agent's TrainConfig: `train` with its backbone's `optimizer` overrides applied.

    A backbone's optimizer keys replace those of train.optimizer (e.g. `{lr: 0.02}` for a
    backbone that diverges at the population's rate); an override that names another
    `_target_` replaces the whole optimizer, since the base kwargs belong to another class.
    Agents of one backbone share one TrainConfig, so the vectorised step still groups them.
    """
    merged: dict[str, TrainConfig] = {}
    for backbone in distinct_backbones(backbones):
        overrides = backbone.optimizer
        if not overrides:
            merged[backbone.key] = train
            continue
        other_class = overrides.get("_target_", train.optimizer["_target_"]) != train.optimizer["_target_"]
        optimizer = dict(overrides) if other_class else {**train.optimizer, **overrides}
        check_optimizer(optimizer, f"{backbone.key}.optimizer")
        merged[backbone.key] = replace(train, optimizer=optimizer)
    return tuple(merged[backbone.key] for backbone in backbones)
