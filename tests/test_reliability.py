"""Runs survive killed actors and interrupted drivers, and resume to identical numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from sim.backends import create_backend
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from sim.reporting.loggers import Sink
from sim.run.checkpoint import CheckpointStore
from sim.run.interrupt import RunInterrupted
from sim.run.loop import CheckpointPolicy, group_plans, run_rounds
from sim.run.main import run
from tests.conftest import TINY, make_config

pytestmark = pytest.mark.slow
MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))
RUN = [*TINY, "rounds=6", "eval_every=2", "checkpoint_every=2", "checkpoint_keep=3"]


class SignalAt(Sink):
    """Sends `signum` to this process after round `at` (as a user's kill would)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        if round_idx == self.at:
            os.kill(os.getpid(), self.signum)


def _uninterrupted(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    return run(make_config(*RUN, "runtime.backend=serial", *overrides), tmp_path / "reference")["final"]


def _interrupt(run_dir: Path, at: int, signum: int, overrides: tuple[str, ...] = ()) -> None:
    """Run in-process (serial backend) until the signal after round `at` stops it."""
    cfg = make_config(*RUN, "runtime.backend=serial", *overrides)
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    policy = CheckpointPolicy(cfg.checkpoint_every, CheckpointStore(run_dir, cfg.checkpoint_keep))
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    with pytest.raises(RunInterrupted) as stopped:
        run_rounds(experiment, backend, group_plans(experiment, groups), [SignalAt(at, signum)], run_dir, policy, None)
    assert stopped.value.exit_code == 128 + signum


def test_sigint_checkpoints_and_resume_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    _interrupt(run_dir, at=2, signum=signal.SIGINT)
    assert (run_dir / "checkpoints" / "round_000003").is_dir()  # written on the signal, off-schedule
    resumed = run(make_config(f"resume={run_dir}", "runtime.backend=serial"), Path("unused"))
    assert resumed["final"] == _uninterrupted(tmp_path)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    _interrupt(run_dir, at=2, signum=signal.SIGTERM)
    newest = run_dir / "checkpoints" / "round_000003" / "agent_00001.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-write
    resumed = run(make_config(f"resume={run_dir}", "runtime.backend=serial"), Path("unused"))
    assert resumed["final"] == _uninterrupted(tmp_path)
    assert newest.stat().st_size == 100  # fallback read it, did not delete or rewrite it


def test_resume_without_an_intact_checkpoint_fails_clearly(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    _interrupt(run_dir, at=0, signum=signal.SIGINT, overrides=("checkpoint_every=0",))
    for agent_file in (run_dir / "checkpoints").glob("*/agent_*.pt"):
        agent_file.write_bytes(b"")
    with pytest.raises(ConfigError, match="resume=.*intact checkpoint"):
        run(make_config(f"resume={run_dir}", "runtime.backend=serial"), Path("unused"))


class KillActorAt(Sink):
    """SIGKILLs one agent actor process after round `at`, like the OOM killer would."""

    def __init__(self, at: int, pids: list[int]) -> None:
        self.at, self.pids, self.killed = at, pids, False

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        if round_idx == self.at and not self.killed:
            os.kill(self.pids[-1], signal.SIGKILL)
            self.killed = True


# Shards of ~30 MB per actor: far above Ray's 100 KB inline limit, so they go through the
# object store, as real datasets do (the digits of RUN are small enough to travel inline).
OBJECT_STORE_SIZED = [
    "data=synthetic",
    "data.num_train=20000",
    "data.num_test=1000",
    "data.image_shape=[1,28,28]",
    "data.noise=0.5",
]
BIG_RUN = [*RUN, *OBJECT_STORE_SIZED, "runtime.agents_per_actor=2"]


@pytest.fixture(scope="module")
def big_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The undisturbed serial run of BIG_RUN: what every recovered Ray run must equal bit for bit."""
    run_dir = tmp_path_factory.mktemp("big-reference") / "run"
    return run(make_config(*BIG_RUN, "runtime.backend=serial"), run_dir)["final"]


def test_a_killed_actor_is_restarted_and_the_run_loses_no_round(ray_session: None, tmp_path: Path) -> None:
    _run_and_kill_an_actor_after_round_3(tmp_path, RUN, _uninterrupted(tmp_path))


def test_a_killed_actor_holding_object_store_sized_shards_is_restored(
    ray_session: None, tmp_path: Path, big_reference: dict[str, Any]
) -> None:
    """Before actors took only small constructor arguments, Ray's restart of this actor failed."""
    _run_and_kill_an_actor_after_round_3(tmp_path, BIG_RUN, big_reference)


def _run_and_kill_an_actor_after_round_3(tmp_path: Path, overrides: list[str], reference: dict[str, Any]) -> None:
    cfg = make_config(*overrides, "runtime.backend=ray", "runtime.agents_per_actor=2")
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    policy = CheckpointPolicy(cfg.checkpoint_every, CheckpointStore(tmp_path / "run", cfg.checkpoint_keep))
    (tmp_path / "run").mkdir()
    killer = KillActorAt(3, [])
    plans = group_plans(experiment, groups)
    original_start = backend.start

    def start_and_note_pids(*args: Any) -> None:
        original_start(*args)
        killer.pids.extend(backend.describe()["pids"])  # type: ignore[arg-type]

    backend.start = start_and_note_pids  # type: ignore[method-assign]
    try:
        summary = run_rounds(experiment, backend, plans, [killer], tmp_path / "run", policy, None)
    finally:
        backend.shutdown()
    assert killer.killed
    assert summary["recovery"] == {"actor_failures": 1, "rounds_replayed": 2}  # rounds 2 and 3 again
    assert summary["final"] == reference


@pytest.mark.parametrize(
    ("faults", "replayed"),
    [
        ("[{point:train,round:3,actor:1}]", 1),  # back to round_000002: round 2 again
        ("[{point:evaluate,round:3,actor:0}]", 1),  # the evaluation after round 3 (eval_every=2)
        ("[{point:save,round:3,actor:1}]", 2),  # round_000004 half written: rounds 2 and 3 again
    ],
    ids=["train", "evaluate", "save"],
)
def test_an_actor_killed_at_a_fault_point_is_restored_to_the_same_numbers(
    ray_session: None, tmp_path: Path, big_reference: dict[str, Any], faults: str, replayed: int
) -> None:
    summary = run(make_config(*BIG_RUN, f"runtime.faults={faults}"), tmp_path / "run")
    assert summary["recovery"] == {"actor_failures": 1, "rounds_replayed": replayed}
    assert summary["runtime"]["restarts"] == [0, 1] if "actor:1" in faults else [1, 0]
    assert summary["final"] == big_reference
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))  # the half-written one was redone


def test_a_second_kill_during_the_restore_is_survived(
    ray_session: None, tmp_path: Path, big_reference: dict[str, Any]
) -> None:
    faults = "[{point:train,round:3,actor:0},{point:restore,round:3,actor:1}]"
    summary = run(make_config(*BIG_RUN, f"runtime.faults={faults}"), tmp_path / "run")
    assert summary["recovery"] == {"actor_failures": 2, "rounds_replayed": 1}
    assert summary["runtime"]["restarts"] == [1, 1]
    assert summary["final"] == big_reference


def test_a_fault_for_an_actor_that_does_not_exist_is_refused_before_any_actor_starts(
    ray_session: None, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"runtime.faults\[0\].actor=2 is invalid: an actor index below 2"):
        run(make_config(*RUN, "runtime.agents_per_actor=2", "runtime.faults=[{point:train,actor:2}]"), tmp_path)


def test_a_lost_actor_that_cannot_be_restored_stops_in_one_line_and_resume_continues(
    tmp_path: Path, big_reference: dict[str, Any]
) -> None:
    """With no restarts left the run stops cleanly; its checkpoints let `resume=` finish it identically."""
    run_dir = tmp_path / "run"
    overrides = [*BIG_RUN, "runtime.max_actor_restarts=0", "runtime.faults=[{point:train,round:3,actor:1}]"]
    stopped = subprocess.run(
        [MHD_SIM, *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert stopped.returncode == 1, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert "constructor arguments in the object store" not in stopped.stderr  # ray-project/ray#53727's warning
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("mhd-sim: RecoveryFailedError: agents 2, 3 (actor 1 on 127.0.0.1) could not be restored")
    assert last.endswith(f"continue with: mhd-sim resume={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["resume_command"] == f"mhd-sim resume={run_dir}"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["round_000000", "round_000002"]

    final = _resume_from_the_shell(run_dir, tmp_path)
    assert final["status"] == "completed" and final["final"] == big_reference


def _resume_from_the_shell(run_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """`mhd-sim resume=RUN_DIR` as a user types it; the run's summary.json afterwards."""
    resumed = subprocess.run(
        [MHD_SIM, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume-call'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


@pytest.mark.parametrize(("signum", "backend"), [(signal.SIGTERM, "serial"), (signal.SIGINT, "ray")])
def test_the_cli_stops_on_a_signal_and_resumes_to_the_same_numbers(
    tmp_path: Path, signum: signal.Signals, backend: str
) -> None:
    run_dir = tmp_path / "run"
    overrides = [*TINY, "rounds=40", "eval_every=1", "checkpoint_every=0", f"runtime.backend={backend}"]
    process = subprocess.Popen(
        [MHD_SIM, *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["resume_command"] == f"mhd-sim resume={run_dir}"
    final = _resume_from_the_shell(run_dir, tmp_path)
    reference = run(make_config(*overrides, "runtime.backend=serial"), tmp_path / "reference")
    assert final["status"] == "completed" and final["final"] == reference["final"]
    rounds_logged = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds_logged == list(range(1, 41))  # no evaluation lost or duplicated
