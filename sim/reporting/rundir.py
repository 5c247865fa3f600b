"""A finished run directory read back as one typed record, for reports, sweeps and wandb.

sim/run/main.py writes config.yaml, summary.json, metrics.jsonl (one line per evaluation),
rounds.jsonl (one line per round), partition.csv, graph.edgelist and, for a dynamic network,
network.jsonl (one line per round: active agents and messages, docs/dynamic.md). Everything downstream
(report pages, sweep tables, wandb images) reads those files, never the live simulation, so
the same code serves a run that just ended and a run from last month. Runs written before
rounds.jsonl existed fall back to the round fields each evaluation line carries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from omegaconf import OmegaConf

from sim.core.config import plain_dict
from sim.core.errors import ConfigError
from topologies.edges import read_edge_list

AgentHeads = dict[int, dict[str, dict[str, float]]]  # agent -> head -> shared_acc/private_acc


@dataclass(frozen=True)
class Run:
    """What one simulation left in its directory."""

    directory: Path
    config: dict[str, Any]  # the resolved config (config.yaml)
    summary: dict[str, Any]  # summary.json
    evaluations: list[dict[str, Any]]  # metrics.jsonl, oldest first; "round" = rounds completed
    rounds: list[dict[str, Any]]  # per round: losses, comm/bytes, time/round_s; "round" = rounds completed
    class_counts: np.ndarray  # [K, C] private samples per agent and class
    graph: nx.DiGraph  # edge u -> v: v distils from u's predictions; every agent is a node
    network: list[dict[str, Any]]  # network.jsonl: per round "active" agents, "links" [sender, receiver, delay]

    @property
    def completed(self) -> bool:
        return bool(self.summary.get("status") == "completed")

    @property
    def heads(self) -> list[str]:
        """Head names in model order (main, aux1, ...), from the last evaluation."""
        return list(self.evaluations[-1]["heads"]) if self.evaluations else []

    def final_per_agent(self) -> AgentHeads:
        """Every agent's every head at the last evaluation."""
        if not self.evaluations:
            return {}
        return {int(agent): heads for agent, heads in self.evaluations[-1]["per_agent"].items()}


def is_run_dir(directory: Path) -> bool:
    return (directory / "summary.json").is_file() and (directory / "config.yaml").is_file()


def load_run(directory: Path) -> Run:
    """Read a run directory; a directory that is not one raises a one-line ConfigError."""
    if not is_run_dir(directory):
        raise ConfigError("RUN_DIR", str(directory), "a run directory of mhd-sim (with summary.json and config.yaml)")
    evaluations = read_jsonl(directory / "metrics.jsonl")
    rounds_path = directory / "rounds.jsonl"
    rounds = read_jsonl(rounds_path) if rounds_path.is_file() else [_round_fields(e) for e in evaluations]
    class_counts = read_partition(directory / "partition.csv")
    return Run(
        directory=directory,
        config=plain_dict(OmegaConf.load(directory / "config.yaml"), resolve=False),
        summary=json.loads((directory / "summary.json").read_text()),
        evaluations=evaluations,
        rounds=rounds,
        class_counts=class_counts,
        graph=read_graph(directory / "graph.edgelist", len(class_counts)),
        network=read_jsonl(directory / "network.jsonl"),  # empty for a static network
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_partition(path: Path) -> np.ndarray:
    """[K, C] class counts from partition.csv (its first column is the agent id)."""
    if not path.is_file():
        return np.zeros((0, 0), dtype=np.int64)
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    return table[:, 1:]


def read_graph(path: Path, num_agents: int) -> nx.DiGraph:
    """The communication graph from graph.edgelist (`u v` lines, lone agents), every agent a node."""
    graph: nx.DiGraph = nx.DiGraph()
    graph.add_nodes_from(range(num_agents))
    if path.is_file():
        written = read_edge_list(path)
        graph.add_nodes_from(int(agent) for agent in written)
        graph.add_edges_from((int(u), int(v)) for u, v in written.edges())
    return graph


def _round_fields(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in evaluation.items() if key not in ("heads", "per_agent")}


def find_runs(directories: Iterable[Path]) -> list[Path]:
    """Every run directory at or under `directories`, in sweep order (job 2 before job 10)."""
    found: set[Path] = set()
    for directory in directories:
        if not directory.is_dir():
            raise ConfigError("RUN_DIR_OR_SWEEP_DIR", str(directory), "an existing directory")
        found.update(path.parent for path in directory.glob("**/summary.json") if is_run_dir(path.parent))
    return sorted(found, key=natural_key)


def natural_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders numbered parts by value: multirun/x/2 before multirun/x/10."""
    parts = re.split(r"(\d+)", str(path))
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts if part)
