"""Config tree <-> registries: every registered name has a YAML, every YAML names an entry."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sim.loggers import LOGGERS
from sim.methods import METHODS
from tests.conftest import make_config

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(("group", "registry"), [("method", METHODS), ("logger", LOGGERS)])
def test_registered_names_and_config_files_match(group: str, registry: object) -> None:
    files = {path.stem: OmegaConf.load(path).name for path in (CONF / group).glob("*.yaml")}
    assert set(files) == set(registry.names())  # type: ignore[attr-defined]
    assert all(stem == name for stem, name in files.items())


@pytest.mark.parametrize("experiment", sorted(path.stem for path in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_says_how_to_run_it(experiment: str) -> None:
    cfg = make_config(f"+experiment={experiment}")
    assert cfg.num_agents >= 1
    assert f"+experiment={experiment}" in (CONF / "experiment" / f"{experiment}.yaml").read_text()


def test_the_default_run_is_the_one_the_issue_names() -> None:
    cfg = make_config()
    assert (cfg.data.name, cfg.num_agents, cfg.topology.name, cfg.partition.name) == ("digits", 8, "ring", "label_skew")
    assert (cfg.method.name, cfg.model.aux_heads, cfg.backbone.name, cfg.runtime.backend) == (
        "mhd",
        3,
        "small_cnn",
        "ray",
    )
