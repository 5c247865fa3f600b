"""One simulation from a composed config to a run directory.

Writes, next to Hydra's own files: config.yaml (resolved), partition.csv (class counts per
agent), graph.edgelist, metrics.jsonl (one line per evaluation) and summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from omegaconf import DictConfig, OmegaConf

from sim.backends import BACKENDS, create_backend
from sim.errors import ConfigError
from sim.experiment import Experiment, build_experiment
from sim.loggers import LOGGERS, JsonlSink, Sink
from sim.simulation import group_plans, run_rounds, write_json

WANDB_MODES = ("online", "offline", "disabled")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate, assemble, run; returns the summary. Bad input raises ConfigError before work."""
    _check_names(cfg)
    experiment = build_experiment(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    backend, groups = create_backend(experiment.runtime, experiment.num_agents)
    config = {str(key): value for key, value in OmegaConf.to_container(cfg, resolve=True).items()}  # type: ignore[union-attr]
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
    try:
        plans = group_plans(experiment, groups)
        write_run_files(run_dir, cfg, experiment)
        sinks += LOGGERS.get(str(cfg.logger.name))(_logger_params(cfg), run_dir)
        for sink in sinks:
            sink.start(config, experiment.rounds)
        return run_rounds(experiment, backend, plans, sinks, run_dir)
    except BaseException as error:
        write_json(run_dir / "summary.json", {"status": "failed", "error": describe_error(error)})
        raise
    finally:
        for sink in sinks:
            sink.close()
        backend.shutdown()


def describe_error(error: BaseException) -> str:
    """One line naming the original error (Ray wraps actor errors in a RayTaskError)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"


def _check_names(cfg: DictConfig) -> None:
    """Registry names and modes that can be checked before any data is loaded."""
    BACKENDS.get(str(cfg.runtime.backend))
    LOGGERS.get(str(cfg.logger.name))
    if cfg.logger.name == "wandb" and cfg.logger.mode not in WANDB_MODES:
        raise ConfigError("logger.mode", cfg.logger.mode, f"one of {', '.join(WANDB_MODES)}")


def _logger_params(cfg: DictConfig) -> dict[str, Any]:
    params = OmegaConf.to_container(cfg.logger, resolve=True)
    assert isinstance(params, dict)
    return {str(key): value for key, value in params.items()}


def write_run_files(run_dir: Path, cfg: DictConfig, experiment: Experiment) -> None:
    """The resolved config, the partition's class-count matrix and the graph's edge list."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    counts = experiment.class_counts
    header = "agent," + ",".join(f"class_{c}" for c in range(counts.shape[1]))
    rows = np.column_stack([np.arange(len(counts)), counts])
    np.savetxt(run_dir / "partition.csv", rows, fmt="%d", delimiter=",", header=header, comments="")
    nx.write_edgelist(experiment.graph, run_dir / "graph.edgelist", data=False)
