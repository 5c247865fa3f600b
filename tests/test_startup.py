"""Start-up: the driver imports only what the run uses, and scripts/bench_startup.py writes its JSON (no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

import sim.reporting.plots
import sim.reporting.report
from sim.backends.ray.address import RayTarget
from sim.run.main import run
from sim.run.preflight import compose_jobs
from tests.conftest import TINY, load_script, make_config

ROOT = Path(__file__).resolve().parents[1]


def fresh_process_json(code: str, *args: str, timeout: int) -> Any:
    """Runs `code` in a fresh Python (this one has torch, matplotlib and more imported) and returns the JSON
    its last line of output holds; a failed process fails the test with its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


# Checks the default config as preflight does, builds the experiment, and lists the heavy
# modules the driver holds by then: none of them is needed before the agents run.
DRIVER_IMPORTS = """
import json, sys
from tests.conftest import make_config
from sim.experiment.assembly import build_experiment
from sim.experiment.settings import check_config
import sim.run.cli
cfg = make_config()
check_config(cfg)
build_experiment(cfg)
print(json.dumps(sorted(name for name in ("torch._dynamo", "matplotlib", "wandb", "scipy") if name in sys.modules)))
"""


def test_checking_and_building_a_run_imports_no_dynamo_matplotlib_wandb_or_scipy() -> None:
    """The optimizer check builds the optimizer without importing torch._dynamo (~2 s); plots wait for the report;
    scipy (~0.15 s) only for an output-privacy accountant."""
    assert fresh_process_json(DRIVER_IMPORTS, timeout=120) == []


# The CLI's first half (flags, composition, the Ray it will start) runs before torch is loaded, so that
# a local Ray's processes come up while torch is imported (sim/run/cli.py). Prints the heavy modules
# loaded after composing, and those loaded when the CLI began to start Ray (EarlyRay.start, replaced).
CLI_ORDER = """
import json, sys
import sim.run.cli
from sim.run.preflight import compose_jobs
from sim.backends.ray.address import RayTarget
jobs = compose_jobs(["rounds=1"])
RayTarget.requested(jobs.configs[0].runtime)
seen = {"composed": sorted(name for name in ("torch", "ray", "agents.agent") if name in sys.modules)}
from sim.backends.ray.connection import EarlyRay
class Started(Exception):
    pass
def start(target):
    seen["ray_start"] = sorted(name for name in ("torch", "agents.agent") if name in sys.modules)
    seen["target"] = [target.address, target.num_cpus, target.ship_code]
    raise Started
EarlyRay.start = start
sys.argv = ["mhd-sim", "rounds=1", "hydra.run.dir=" + sys.argv[1]]
try:
    sim.run.cli.main()
except Started:
    pass
print(json.dumps(seen))
"""


def test_the_cli_starts_its_ray_before_it_imports_torch(tmp_path: Path) -> None:
    """A torch import (~1.2 s) at the top of the CLI's modules would be paid before Ray starts, not while it does."""
    seen = fresh_process_json(CLI_ORDER, str(tmp_path / "run"), timeout=120)
    assert seen == {"composed": [], "ray_start": [], "target": [None, None, True]}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], RayTarget(None, None, True)),
        (["runtime.num_cpus=2", "runtime.ship_code=false"], RayTarget(None, 2, False)),
        (["runtime.address=auto"], RayTarget("auto", None, True)),
        (["runtime.backend=serial"], None),  # no Ray at all
        (["runtime.num_cpus=0"], None),  # the checks name it; nothing starts early
        (["runtime.num_cpus=two"], None),
        (["runtime.address=auto", "runtime.num_cpus=2"], None),  # check_cluster_address rejects it
        (["runtime.address=nohost"], None),
    ],
)
def test_the_ray_a_composed_config_asks_for_is_read_leniently(overrides: list[str], expected: RayTarget | None) -> None:
    (cfg,) = compose_jobs(overrides).configs
    assert RayTarget.requested(cfg.runtime) == expected


@pytest.mark.slow
def test_a_bad_value_found_while_ray_starts_is_still_one_line_and_exit_2(tmp_path: Path) -> None:
    """num_agents=0 passes composition, so the local Ray is already starting when the check rejects it:
    Ray's start-up warnings stay off stderr and the command waits for its Ray and stops it."""
    mhd_sim = str(Path(sys.executable).with_name("mhd-sim"))
    done = subprocess.run(
        [mhd_sim, "num_agents=0", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["mhd-sim: error: num_agents=0 is invalid: an integer >= 1"]
    assert not (tmp_path / "run").exists()


# A whole (serial) run; prints whether matplotlib was being loaded (or was loaded) when the rounds began, and
# whether it was loaded at the end.
RUN_IMPORTS = """
import json, sys, tempfile, threading
from pathlib import Path
import sim.run.main
from tests.conftest import TINY, make_config
real_run_rounds = sim.run.main.run_rounds
seen = {}
def run_rounds(*args, **kwargs):
    loading = any(thread.name == "mhd-sim-report-preparation" for thread in threading.enumerate())
    seen["during_rounds"] = loading or "matplotlib" in sys.modules
    return real_run_rounds(*args, **kwargs)
sim.run.main.run_rounds = run_rounds
cfg = make_config(*TINY, "rounds=1", "eval_every=1", "runtime.backend=serial", "logger.report=" + sys.argv[1])
sim.run.main.run(cfg, Path(tempfile.mkdtemp()) / "run")
seen["at_end"] = "matplotlib" in sys.modules
print(json.dumps(seen))
"""


@pytest.mark.parametrize("report", [True, False])
def test_the_report_module_loads_during_the_rounds_and_only_for_a_run_that_writes_a_report(report: bool) -> None:
    """A short run would otherwise wait ~0.8 s at its end for matplotlib; a run without a report never loads it."""
    seen = fresh_process_json(RUN_IMPORTS, str(report).lower(), timeout=300)
    assert seen == {"during_rounds": report, "at_end": report}


def test_the_partition_figure_is_drawn_once_while_the_rounds_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sim.run.main.ReportPreparation draws it in its thread; the report writes those bytes instead of redrawing."""
    drawn_by: list[str] = []
    real = sim.reporting.plots.partition_heatmap

    def partition_heatmap(class_counts: np.ndarray) -> Figure:
        drawn_by.append(threading.current_thread().name)
        return real(class_counts)

    monkeypatch.setattr(sim.reporting.plots, "partition_heatmap", partition_heatmap)
    run_dir = tmp_path / "run"
    run(make_config(*TINY, "rounds=1", "eval_every=1", "runtime.backend=serial"), run_dir)
    assert drawn_by == ["mhd-sim-report-preparation"]
    assert (run_dir / "plots" / "partition.png").read_bytes().startswith(b"\x89PNG")


def test_a_report_that_fails_is_one_line_and_the_run_stays_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(run_dir: Path, rendered: object = None) -> Path:
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(sim.reporting.report, "write_run_report", broken)
    run_dir = tmp_path / "run"
    summary = run(make_config(*TINY, "rounds=1", "eval_every=1", "runtime.backend=serial"), run_dir)
    assert summary["status"] == "completed"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    expected = f"mhd-sim: report not written (RuntimeError: no fonts here); write it with: mhd-sim-report {run_dir}"
    assert expected in capsys.readouterr().err


@pytest.mark.slow
def test_bench_startup_measures_floor_cold_and_warm_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench_startup.json"
    tiny = ["num_agents=3", "train.local_steps=1", "logger.progress=false", "logger.report=false"]
    returned = load_script("bench_startup").main(["--repeats=1", f"--out={out}", *tiny])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert set(report) == {
        *("overrides", "repeats", "machine", "load_avg_1_5_15", "head_start_s", "warm_first_s", "targets", "results")
    }
    assert report["overrides"] == ["rounds=1", *tiny]
    assert {"cpu_count", "platform", "python", "torch", "ray"} <= set(report["machine"])
    assert list(report["results"]) == ["floor", "cold", "attached", "warm"]
    for kind, result in report["results"].items():
        assert {"median_s", "min_s", "max_s", "cpu_median_s", "samples"} <= set(result), kind
        assert len(result["samples"]) == 1
        assert {"wall_s", "cpu_s", "load_1min_before"} <= set(result["samples"][0]), kind
    for kind in ("cold", "attached", "warm"):
        assert report["results"][kind]["vs_floor"] is not None
        (run,) = report["results"][kind]["samples"]
        assert {"wall_s", "load_1min_before", "wall_time_s", "setup_time_s", "report_written"} <= set(run)
        assert run["report_written"] is False  # logger.report=false
    assert report["head_start_s"] is not None and report["warm_first_s"] is not None
    (warm,) = report["results"]["warm"]["samples"]
    assert warm["kept_actors"] == {"reused": 2, "created": 0}  # the first run's workers, kept
    (attached,) = report["results"]["attached"]["samples"]
    assert attached["kept_actors"] is None


EARLY_RAY = """
import time
import ray
from sim.backends.ray.address import RayTarget
from sim.backends.ray.connection import EarlyRay, connect_ray, shutdown_ray
from sim.experiment.settings import runtime_config
from tests.conftest import make_config

target = RayTarget.of(runtime_config(make_config("runtime.num_cpus=1").runtime))
EarlyRay.start(target)
assert connect_ray(target) is True  # taken over, not started a second time
keeper = EarlyRay.running
time.sleep(2)  # long after the start returned
assert ray.get(ray.remote(lambda: 42).remote(), timeout=60) == 42
assert ray.cluster_resources()["CPU"] == 1
assert keeper is not None and keeper.thread.is_alive()
shutdown_ray()
keeper.thread.join(timeout=10)
assert not keeper.thread.is_alive() and EarlyRay.pending is None and EarlyRay.running is None
print("ok")
"""


@pytest.mark.slow
def test_a_local_ray_started_early_in_a_thread_serves_the_run_and_outlives_that_moment() -> None:
    """EarlyRay: connect_ray takes the Ray a thread started; its processes live until shutdown_ray.

    Ray's processes die with the thread that started them (PR_SET_PDEATHSIG): a keeper thread
    that returned after starting would leave a dead Ray behind, and the task would fail (the
    raylet's death ends the process). In a fresh process: this one may hold the tests' own Ray.
    """
    done = subprocess.run(
        [sys.executable, "-c", EARLY_RAY], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
