"""Sweep jobs side by side: `hydra/launcher=parallel` (hydra-joblib-launcher), sized to what fits.

Each job of a parallel sweep is its own process on the driver's machine and its own Ray driver;
its actors go wherever the job's `runtime` sends them (a cluster with `runtime.address`). Every
job reserves all of its actors at once (a placement group), so a job never starts half placed.
How many jobs run at once (`hydra.launcher.n_jobs`; 0, the default, asks for this) is decided here, before
the first job: the largest number of the sweep's heaviest jobs whose actors fit the nodes
together, so jobs never queue on each other's resources into `runtime.startup_timeout_s`.

Why not hydra-ray-launcher (1.2.2, the latest): it requires cloudpickle<3, and joblib 1.6
(scikit-learn's) requires cloudpickle>=3, so pip cannot install it beside mhd-sim's
dependencies; and it runs each job inside a Ray task on some node, where the job's run
directory lands on that node's disk. docs/cluster.md#parallel-sweeps has the details.

A job that fails (diverged, agents lost for good) writes summary.json with "status": "failed"
and ends only itself. Jobs of a parallel sweep run in other processes, so SweepFailures reads
those summaries once the sweep ends, in the driver, for `mhd-sim` to name them and exit 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sim.backends.ray.placement import ActorRequest, Node, RuntimeConfig, plan_placement, requests_fit
from sim.experiment.assembly import check_config

PARALLEL_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
AUTO_JOBS = 0  # conf/hydra/launcher/parallel.yaml's n_jobs: mhd-sim sizes the sweep to the nodes


def parallel_jobs_override(configs: Sequence[DictConfig]) -> list[str]:
    """`["hydra.launcher.n_jobs=K"]` for a parallel sweep that leaves n_jobs to mhd-sim (0); else [].

    0 is no count of joblib's (it refuses it), so it cannot hide a choice of the user's.
    """
    if not configs or OmegaConf.select(configs[0], "hydra.launcher._target_") != PARALLEL_LAUNCHER:
        return []
    if OmegaConf.select(configs[0], "hydra.launcher.n_jobs") != AUTO_JOBS:
        return []  # the user's own limit
    jobs = [_actor_requests(cfg) for cfg in configs]
    return [f"hydra.launcher.n_jobs={jobs_at_once(jobs, _nodes(check_config(configs[0]).runtime))}"]


def jobs_at_once(jobs: Sequence[list[ActorRequest]], nodes: Sequence[Node]) -> int:
    """The most jobs whose actors fit `nodes` together, counting the heaviest jobs first (at least 1)."""
    heaviest = sorted(jobs, key=lambda requests: sum(sum(r.amounts.values()) for r in requests), reverse=True)
    count = 1
    while count < len(heaviest) and requests_fit([r for job in heaviest[: count + 1] for r in job], nodes):
        count += 1
    return count


def _actor_requests(cfg: DictConfig) -> list[ActorRequest]:
    """One job's actors as its backend will plan them (the central method trains one model)."""
    settings = check_config(cfg)
    backbones = [backbone.name for backbone in settings.backbones][: 1 if settings.method.central else None]
    return plan_placement(backbones, settings.runtime, _nodes(settings.runtime)).requests


def _nodes(runtime: RuntimeConfig) -> list[Node]:
    """The nodes a job's actors go to: the attached cluster's, or this machine's cores (each job starts its own Ray)."""
    if runtime.backend == "serial" or runtime.address is None:
        return [Node("this machine", {"CPU": float(runtime.num_cpus or os.cpu_count() or 1)})]
    return _cluster_nodes(runtime)


def _cluster_nodes(runtime: RuntimeConfig) -> list[Node]:
    """Asks the cluster once per address for all the sweep's jobs."""
    if runtime.address not in _CLUSTERS:
        from sim.backends.ray.backend import nodes_of  # Ray is imported there, and only for a parallel sweep

        _CLUSTERS[str(runtime.address)] = nodes_of(runtime)
    return _CLUSTERS[str(runtime.address)]


_CLUSTERS: dict[str, list[Node]] = {}


class SweepFailures(Callback):
    """After a sweep, in the driver: every job whose summary.json says failed, for `mhd-sim` to name."""

    failed: list[str] = []  # "RUN_DIR: reason", read by sim.run.cli after the sweep

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        for summary in sorted(Path(str(config.hydra.sweep.dir)).glob("*/summary.json"), key=_job_number):
            record = json.loads(summary.read_text())
            if record.get("status") != "failed":
                continue
            reason = str(record.get("error", "failed"))
            if "resume_command" in record:  # its agents could not be restored: the checkpoints stay
                reason += (
                    f"; every checkpoint is kept: once the cause is fixed, continue with: {record['resume_command']}"
                )
            SweepFailures.failed.append(f"{summary.parent}: {reason}")


def _job_number(summary: Path) -> tuple[int, str]:
    name = summary.parent.name
    return (int(name), name) if name.isdigit() else (-1, name)
