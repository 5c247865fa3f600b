"""Model heterogeneity: `backbone=mixed` gives agents different backbones from one pattern."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agents.agent import Agent
from agents.model import ModelConfig, MultiHeadModel
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from sim.run.main import run
from tests.conftest import PLAIN_CPU, TINY, make_config

MIXED = ["backbone=mixed", "backbone.pattern=[small_cnn,resnet8]"]


def test_the_pattern_repeats_over_the_agents() -> None:
    experiment = build_experiment(make_config(*TINY, *MIXED, "num_agents=5"))
    assert [spec.model.backbone for spec in experiment.specs] == [
        "small_cnn",
        "resnet8",
        "small_cnn",
        "resnet8",
        "small_cnn",
    ]
    assert experiment.specs[1].model.backbone_params["widths"] == [16, 32, 64]


def test_member_overrides_reach_only_their_backbone() -> None:
    experiment = build_experiment(make_config(*TINY, *MIXED, "backbone.members.resnet8.norm=group"))
    params = {spec.model.backbone: spec.model.backbone_params for spec in experiment.specs}
    assert params["resnet8"]["norm"] == "group"
    assert "norm" not in params["small_cnn"]


def test_a_backbone_optimizer_override_reaches_only_its_agents() -> None:
    """A member's `optimizer` keys replace those of train.optimizer for its agents alone."""
    experiment = build_experiment(
        make_config(*TINY, *MIXED, "train.optimizer.lr=0.05", "+backbone.members.resnet8.optimizer.lr=0.02")
    )
    small_cnn, resnet8 = experiment.specs[0], experiment.specs[1]
    assert resnet8.train.optimizer == {**small_cnn.train.optimizer, "lr": 0.02}
    assert small_cnn.train.optimizer["lr"] == 0.05
    agent = Agent(resnet8, experiment.public, PLAIN_CPU)
    assert [group["lr"] for group in agent.optimizer.param_groups] == [0.02]
    assert agent.optimizer.param_groups[0]["momentum"] == small_cnn.train.optimizer["momentum"]


def test_another_optimizer_class_replaces_the_base_kwargs() -> None:
    """SGD's momentum would be an unknown kwarg of Adam: naming a new _target_ starts from empty."""
    experiment = build_experiment(make_config(*TINY, "+backbone.optimizer={_target_:torch.optim.Adam,lr:0.001}"))
    assert experiment.specs[0].train.optimizer == {"_target_": "torch.optim.Adam", "lr": 0.001}


def test_the_hypertransformer_gets_its_own_learning_rate_by_default() -> None:
    """conf/backbone/hypertransformer.yaml lowers lr to 0.02 (0.05 collapsed agents under MHD)."""
    config = make_config(*TINY, "backbone=mixed", "backbone.pattern=[small_cnn,hypertransformer]")
    trains = build_experiment(config).settings.agent_train
    assert [train.optimizer["lr"] for train in trains] == [config.train.optimizer.lr, 0.02] * 2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("backbone.pattern=[small_cnn,resnet99]", "backbone.pattern"),
        ("backbone.pattern=[]", "backbone.pattern"),
        ("backbone.members.resnet8.norm=foo", "backbone.norm"),
    ],
)
def test_a_bad_pattern_or_member_is_one_named_error(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_experiment(make_config(*TINY, *MIXED, override))


def test_a_mixed_population_runs_and_reports_each_backbone(tmp_path: Path) -> None:
    """Each backbone's summary is the mean, min and max over its own agents only, also on disk."""
    summary = run(make_config(*TINY, *MIXED, "runtime.backend=serial"), tmp_path / "run")
    assert summary["backbones"] == ["small_cnn", "resnet8", "small_cnn", "resnet8"]
    assert set(summary["by_backbone"]) == {"small_cnn", "resnet8"}
    per_agent = summary["final"]["per_agent"]
    for backbone, agents in (("small_cnn", ["0", "2"]), ("resnet8", ["1", "3"])):
        for head, row in summary["by_backbone"][backbone].items():
            for metric in ("shared_acc", "private_acc"):
                values = [per_agent[agent][head][metric] for agent in agents]
                assert row[metric] == pytest.approx(sum(values) / len(values)), (backbone, head, metric)
                assert (row[f"{metric}_min"], row[f"{metric}_max"]) == (min(values), max(values))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["by_backbone"] == summary["by_backbone"]


def test_per_head_embeddings_feed_each_head_its_own() -> None:
    """A per-head backbone's embedding k reaches only head k (the fused weight viewed per head)."""
    config = ModelConfig(
        "small_cnn", {"channels": [4], "embedding_dim": 8, "init": "fan_out"}, (1, 8, 8), 10, aux_heads=2
    )
    model = MultiHeadModel(config)
    embeddings = torch.randn(3, 5, 8)  # [heads, B, D]
    per_head = model._per_head_logits(embeddings)
    for head in range(3):
        alone = model.heads(embeddings[head]).view(5, 3, 10)[:, head]  # head `head` on its own embedding
        torch.testing.assert_close(per_head[head], alone)


def test_mixed_offers_every_registered_backbone() -> None:
    """Every backbone can join a mixed population without editing mixed.yaml."""
    from agents.backbones import BACKBONES

    assert set(make_config("backbone=mixed").backbone.members) == set(BACKBONES.names())


def test_more_backbones_than_cores_run_on_the_ray_backend(ray_session: None, tmp_path: Path) -> None:
    """Three backbones on the 2-CPU test cluster with default resources: they share the two workers."""
    pattern = "backbone.pattern=[small_cnn,resnet8,modular_resnet]"
    summary = run(make_config(*TINY, "backbone=mixed", pattern, "runtime.backend=ray"), tmp_path / "run")
    assert summary["runtime"]["actors"] == 2
    assert set(summary["by_backbone"]) == {"small_cnn", "resnet8", "modular_resnet"}
