"""Parallel sweeps (`hydra/launcher=parallel`): sized to what fits, failures named, jobs side by side on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sim.backends.ray.placement import ActorRequest, Node
from sim.run.preflight import preflight
from sim.run.sweeps import jobs_at_once, parallel_jobs_override
from tests.conftest import TINY
from tests.test_cluster import MHD_SIM, RUN_TIMEOUT_S, LoopbackCluster, loopback_cluster  # noqa: F401  # the fixture

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="parallel sweeps need hydra-joblib-launcher")


def _cpus(amount: float) -> ActorRequest:
    return ActorRequest({"CPU": amount}, {"CPU": "runtime.num_cpus_per_actor"})


def test_as_many_jobs_run_at_once_as_fit_the_nodes_together() -> None:
    nodes = [Node("10.0.0.1", {"CPU": 2.0}), Node("10.0.0.2", {"CPU": 1.0})]
    assert jobs_at_once([[_cpus(1)]] * 6, nodes) == 3
    assert jobs_at_once([[_cpus(1), _cpus(1)]] * 6, nodes) == 1  # a second job's pair would need a fourth CPU
    assert jobs_at_once([[_cpus(1)], [_cpus(2)], [_cpus(1)]], nodes) == 2  # the heaviest two fit, all three not
    assert jobs_at_once([[_cpus(8)]] * 2, nodes) == 1  # never 0: a job too big fails alone, by name


def test_only_a_parallel_sweep_left_to_mhd_sim_is_sized() -> None:
    common = ["--multirun", *TINY, "runtime.num_cpus=4", "runtime.agents_per_actor=2", "seed=0,1,2"]
    assert parallel_jobs_override(preflight(common)) == []  # Hydra's basic launcher: one job after another
    assert parallel_jobs_override(preflight([*common, "hydra/launcher=parallel"])) == ["hydra.launcher.n_jobs=2"]
    assert parallel_jobs_override(preflight([*common, "hydra/launcher=parallel", "hydra.launcher.n_jobs=3"])) == []


@pytest.mark.slow
def test_a_diverged_job_of_a_parallel_sweep_ends_only_itself_and_is_named(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        *TINY,
        "runtime.backend=serial",
        "logger.report=false",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
    ]
    done = subprocess.run(
        [MHD_SIM, "--multirun", *args, "train.optimizer.lr=1000,0.05", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 1, done.stderr
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json")}
    assert statuses == {"0": "failed", "1": "completed"}
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"mhd-sim: 1 sweep job(s) failed: {sweep / '0'}: TrainingDivergedError")


@pytest.mark.slow
def test_a_2x3_sweep_runs_its_jobs_side_by_side_on_a_two_node_cluster(
    loopback_cluster: LoopbackCluster,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
) -> None:
    """Each job takes one of the two 1-CPU nodes (one actor of 4 agents), so two run at once."""
    sweep = tmp_path / "sweep"
    args = [*TINY, "logger.report=false", "runtime=cluster", f"runtime.address={loopback_cluster.address}"]
    args += ["runtime.agents_per_actor=4", "hydra/launcher=parallel", "method=mhd,isolated", "seed=0,1,2"]
    started = time.perf_counter()
    done = subprocess.run(
        [MHD_SIM, "--multirun", *args, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=loopback_cluster.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"2x3 parallel sweep: {time.perf_counter() - started:.1f} s")
    assert "mhd-sim: 6 sweep jobs, 2 at a time" in done.stderr
    jobs = [sweep / str(job) for job in range(6)]
    summaries = [json.loads((job / "summary.json").read_text()) for job in jobs]
    assert all(summary["status"] == "completed" for summary in summaries)
    assert sorted((s["method"], s["seed"]) for s in summaries) == sorted(
        (method, seed) for method in ("mhd", "isolated") for seed in (0, 1, 2)
    )
    spans = [(os.stat(job / ".hydra" / "config.yaml").st_mtime, os.stat(job / "summary.json").st_mtime) for job in jobs]
    overlapping = [
        (a, b) for a in range(6) for b in range(a + 1, 6) if spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    ]
    assert overlapping, f"no two jobs ran at the same time: {spans}"
