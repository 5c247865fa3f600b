"""Config tree <-> registries: every registered name has a YAML, every YAML names an entry."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sim.experiment.methods import METHODS
from sim.experiment.settings import check_config
from sim.reporting.loggers import LOGGERS
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


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every `mhd-sim` command in a study file's header, one override list per --multirun combination."""
    commands = []
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        for line in path.read_text().splitlines():
            words = line.lstrip("# ").split("#")[0].split()
            if not words or words[0] != "mhd-sim":
                continue
            overrides = [word for word in words[1:] if word not in ("--multirun", "$D")]
            choices = [
                [f"{word.split('=', 1)[0]}={value}" for value in word.split("=", 1)[1].split(",")]
                if "," in word and "[" not in word
                else [word]
                for word in overrides
            ]
            commands += [(path.stem, list(combination)) for combination in itertools.product(*choices)]
    return commands


@pytest.mark.parametrize(("study", "overrides"), _documented_commands())
def test_every_documented_study_command_passes_the_config_checks(study: str, overrides: list[str]) -> None:
    """The commands a study file gives must run: e.g. partition=dirichlet must not inherit label_skew keys."""
    check_config(make_config(*overrides))


def test_the_default_run_is_the_one_the_issue_names() -> None:
    cfg = make_config()
    assert (cfg.data.name, cfg.num_agents, cfg.topology.name, cfg.partition.name) == ("digits", 8, "ring", "label_skew")
    assert (cfg.method.name, cfg.model.aux_heads, cfg.backbone.name, cfg.runtime.backend) == (
        "mhd",
        3,
        "small_cnn",
        "ray",
    )
