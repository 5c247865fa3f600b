"""`mhd-sim` end to end in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import TINY

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))


def _mhd_sim(
    *args: str, cwd: Path, executable: str = MHD_SIM, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env or dict(os.environ)
    )


def test_a_run_writes_every_artifact_and_prints_the_head_table(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = _mhd_sim(*TINY, "runtime.backend=ray", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"summary.json", "metrics.jsonl", "partition.csv", "graph.edgelist", "config.yaml"} <= {
        p.name for p in run_dir.iterdir()
    }
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert summary["comm_bytes_total"] > 0 and summary["wall_time_s"] > 0
    assert summary["comm_bytes_per_edge_per_round"] == 4 * 128 * 10 * 2  # heads x public batch x classes x fp16
    assert set(summary["final"]["heads"]) == {"main", "aux1", "aux2", "aux3"}
    for head in summary["final"]["heads"].values():
        assert 0.0 <= head["shared_acc"] <= 1.0 and 0.0 <= head["private_acc"] <= 1.0
    assert set(summary["final"]["per_agent"]) == {"0", "1", "2", "3"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # eval_every=3, rounds=3
    assert len((run_dir / "partition.csv").read_text().splitlines()) == 1 + 4
    assert "shared acc" in done.stdout and "aux3" in done.stdout


def test_isolated_sends_nothing_and_wandb_offline_writes_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = _mhd_sim(
        *TINY,
        "method=isolated",
        "runtime.backend=serial",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["comm_bytes_total"] == 0 and list(summary["final"]["heads"]) == ["main"]
    assert list((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_agents=0", "num_agents=0 is invalid"),
        ("topology.num_islands=9", "topology.num_islands"),
        ("runtime.backend=threads", "runtime.backend='threads' is invalid: known names are ray, serial"),
        ("method.temperature=-1", "method.temperature=-1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_summary(tmp_path: Path, override: str, message: str) -> None:
    run_dir = tmp_path / "run"
    extra = ["topology=islands"] if override.startswith("topology.") else []
    done = _mhd_sim(*TINY, *extra, "runtime.backend=serial", override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (run_dir / "summary.json").exists()


def _serial_sweep(sweep: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """A TINY `--multirun` sweep on the serial backend, its job directories under `sweep`."""
    return _mhd_sim(
        "--multirun", *TINY, "runtime.backend=serial", *overrides, f"hydra.sweep.dir={sweep}", cwd=sweep.parent
    )


def test_multirun_sweeps_write_one_run_dir_per_job(tmp_path: Path) -> None:
    done = _serial_sweep(tmp_path / "sweep", "method=mhd,isolated")
    assert done.returncode == 0, done.stderr
    methods = {json.loads(p.read_text())["method"] for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert methods == {"mhd", "isolated"}


def test_a_diverged_sweep_job_is_named_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """lr=1000 overflows the float16 messages in round 0; the lr=0.05 job after it still runs."""
    sweep = tmp_path / "sweep"
    done = _serial_sweep(sweep, "train.optimizer.lr=1000,0.05")
    assert done.returncode == 1
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json")}
    assert statuses == {"0": "failed", "1": "completed"}
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"mhd-sim: 1 sweep job(s) failed: {sweep / '0'}: TrainingDivergedError")


def test_the_installed_wheel_runs_from_any_directory(tmp_path: Path) -> None:
    """A non-editable install finds its packaged conf/ (no source tree on the path)."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    wheel = next(wheels.glob("mhd_sim-*.whl"))
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True, text=True
    )
    assert install.returncode == 0, install.stderr
    # Third-party deps come from this environment's site-packages; our own packages only from the wheel.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _mhd_sim(
        *TINY,
        "runtime.backend=serial",
        "hydra.run.dir=out",
        cwd=elsewhere,
        executable=str(env_dir / "bin" / "mhd-sim"),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((elsewhere / "out" / "summary.json").read_text())["status"] == "completed"
    origin = subprocess.run(
        [python, "-c", "import sim; print(sim.__file__)"], capture_output=True, text=True, env=env, cwd=elsewhere
    )
    assert str(env_dir) in origin.stdout
