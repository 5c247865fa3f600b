"""A cluster without a shared filesystem: checkpoints in `runtime.storage`, the probe, resume and recovery.

The worker node (127.0.0.3) runs in its own mount namespace (`unshare -m`) with a private tmpfs
over the folder that holds the driver's run directories, so it cannot see them, as a cloud node
cannot see the driver's disk. The folder given as `runtime.storage` is outside that tmpfs and
stands for a filesystem every node mounts (NFS). The head (127.0.0.2) shares the driver's view.
The cluster's helpers (ports, token authentication, start and stop of `ray start --block`) are
tests/test_cluster.py's; only the worker's start differs.
"""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sim.run.main import run
from tests.conftest import TINY, make_config
from tests.test_cluster import (
    HEAD_IP,
    MHD_SIM,
    RAY,
    RUN_TIMEOUT_S,
    WORKER_IP,
    _check_loopback_binds,
    two_nodes,
)

pytestmark = pytest.mark.slow
RUN = [*TINY, "rounds=12", "eval_every=1", "checkpoint_every=2", "checkpoint_keep=2"]
BOTH_ACTORS_DIE = "runtime.faults=[{point:train,round:3,actor:0},{point:train,round:3,actor:1}]"


@dataclass
class SplitCluster:
    address: str
    env: dict[str, str]
    runs: Path  # the driver's run directories: hidden from the worker node by its private tmpfs
    shared: Path  # seen alike by every node: the stand-in for NFS


def _check_unshare() -> None:
    """Skips where this process may not create a mount namespace (it needs root or CAP_SYS_ADMIN)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here (unshare -m: {probe.stderr.strip()})")


def _start_private_node(args: list[str], env: dict[str, str], log: Path, hidden: Path) -> subprocess.Popen[bytes]:
    """`ray start --block` in its own mount namespace, with an empty tmpfs mounted over `hidden` first."""
    mount = f'mount -t tmpfs -o size=64m mhd-private "{hidden}" && exec "$@"'
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh", RAY, "start", *args]
    with log.open("wb") as output:
        return subprocess.Popen(
            [*command, "--block", "--disable-usage-stats"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def split_cluster() -> Iterator[SplitCluster]:
    """Head on 127.0.0.2, worker on 127.0.0.3 that cannot see `runs`; token auth; always torn down."""
    _check_loopback_binds()
    _check_unshare()
    temp_dir = Path(tempfile.mkdtemp(prefix="mhd-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    runs, shared = temp_dir / "runs", temp_dir / "shared"
    runs.mkdir()
    shared.mkdir()
    private = functools.partial(_start_private_node, hidden=runs)
    try:
        with two_nodes(temp_dir, start_worker=private) as (address, env):
            yield SplitCluster(address, env, runs, shared)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _mhd_sim(cluster: SplitCluster, *overrides: str) -> subprocess.Popen[str]:
    command = [MHD_SIM, "runtime=cluster", f"runtime.address={cluster.address}", *overrides]
    return subprocess.Popen(
        command, cwd=cluster.runs, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    return process.returncode, stderr


def test_without_storage_a_worker_that_cannot_see_the_run_directory_is_refused_in_one_line(
    split_cluster: SplitCluster,
) -> None:
    """Before: the worker wrote its agents' checkpoint files onto its own disk, and recovery failed."""
    run_dir = split_cluster.runs / "no-storage"
    code, stderr = _finish(_mhd_sim(split_cluster, *RUN, f"hydra.run.dir={run_dir}"))
    assert code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("mhd-sim: error: runtime.storage=None is invalid: a place every worker shares")
    assert f"node {WORKER_IP} (actor " in last and f"{run_dir}/.probe-" in last and "set runtime.storage" in last
    assert not (run_dir / "checkpoints").exists()
    assert not list(run_dir.glob(".probe-*"))  # the driver removed what it could see


def test_with_storage_a_run_survives_actor_deaths_and_a_killed_driver_with_identical_numbers(
    split_cluster: SplitCluster, tmp_path: Path
) -> None:
    run_dir = split_cluster.runs / "stored"
    process = _mhd_sim(
        split_cluster, *RUN, BOTH_ACTORS_DIE, f"runtime.storage={split_cluster.shared}", f"hydra.run.dir={run_dir}"
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 7):  # round_000006 is committed
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the driver dies: no summary, no clean-up
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert not (run_dir / "checkpoints").exists()  # on the driver's disk only config, metrics, the record
    record = json.loads((run_dir / "storage.json").read_text())
    checkpoints = split_cluster.shared / record["path"] / "checkpoints"
    assert record["root"] == str(split_cluster.shared)
    assert {path.name for path in checkpoints.glob("round_*/agent_*.pt")} == {f"agent_0000{i}.pt" for i in range(4)}

    code, stderr = _finish(_mhd_sim(split_cluster, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'resume-call'}"))
    assert code == 0, stderr
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["runtime"]["node_ips"]) == [HEAD_IP, WORKER_IP]
    assert summary["recovery"]["actor_failures"] == 2  # both actors, one of them on the private node, restored
    reference = run(make_config(*RUN, "runtime.backend=serial"), tmp_path / "reference")
    assert summary["final"] == json.loads(json.dumps(reference["final"]))
    rounds_logged = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds_logged == list(range(1, 13))  # replayed rounds replaced, none lost or doubled
