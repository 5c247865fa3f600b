"""Kept workers (runtime.keep_actors, the warm mode): reused across runs on one Ray, never shared.

The Ray tests start one head on 127.0.0.2 (2 CPUs, token auth) and run `mhd-sim` as separate
driver processes attached to it, as a user's shell does.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agents.actor import Lease, Owner
from agents.agent import ExecutionConfig
from sim.backends.ray import kept
from sim.backends.ray.placement import ActorRequest
from sim.core.errors import ConfigError
from sim.experiment.settings import runtime_config
from tests.conftest import PLAIN_CPU, TINY, make_config
from tests.test_cluster import (
    HEAD_IP,
    NODE_PORT_FLAGS,
    _check_loopback_binds,
    _port_args,
    _ports,
    _start_node,
    _stop_node,
    _wait_started,
)

MHD_SIM = shutil.which("mhd-sim", path=str(Path(sys.executable).parent)) or "mhd-sim"
RUN_TIMEOUT_S = 300
KEEP = "runtime.keep_actors=true"


def test_keep_actors_needs_a_ray_that_outlives_the_run() -> None:
    cfg = make_config(KEEP)
    with pytest.raises(ConfigError, match=r"runtime.keep_actors=True is invalid: .*runtime.address is set"):
        runtime_config(cfg.runtime)
    cfg = make_config(KEEP, "runtime.backend=serial", "runtime.address=auto")
    with pytest.raises(ConfigError, match=r"runtime.keep_actors"):
        runtime_config(cfg.runtime)
    with pytest.raises(ConfigError, match=r"runtime.kept_idle_s=0 is invalid"):
        runtime_config(make_config("runtime.kept_idle_s=0").runtime)


def _execution(torch_threads: int) -> ExecutionConfig:
    return replace(PLAIN_CPU, torch_threads=torch_threads)


def test_a_worker_kind_changes_with_what_its_process_fixed_at_start() -> None:
    request = ActorRequest({"CPU": 1.0}, {})
    execution = _execution(torch_threads=1)
    base = kept.kind_key(request, execution, "driver", "digest")
    assert base == kept.kind_key(ActorRequest({"CPU": 1.0}, {}), _execution(torch_threads=1), "driver", "digest")
    assert base != kept.kind_key(ActorRequest({"CPU": 0.5}, {}), execution, "driver", "digest")
    assert base != kept.kind_key(request, _execution(torch_threads=2), "driver", "digest")
    assert base != kept.kind_key(request, execution, "node", "digest")
    assert base != kept.kind_key(request, execution, "driver", "edited")


def test_a_new_kept_worker_is_not_evicted_before_its_creator_claims_it() -> None:
    """Another driver's eviction must not kill a worker in the moment between its creation and its creator's claim."""
    lease = Lease()
    evictor: Owner = ("evictor", [])
    assert not lease.acquire(evictor, evicting=True)  # new and unclaimed
    assert lease.acquire(("creator", []))
    lease.release()
    assert lease.acquire(evictor, evicting=True)  # claimed once, now idle: evictable


def test_the_code_digest_changes_when_a_shipped_file_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "kept_probe_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(kept, "SHIPPED_PACKAGES", ("kept_probe_package",))
    before = kept.code_digest()
    assert kept.code_digest() == before
    (package / "module.py").write_text("VALUE = 2\n")
    assert kept.code_digest() != before


# ---- on a running Ray -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head() -> Iterator[dict[str, str]]:
    """A 2-CPU head on 127.0.0.2 with token auth; yields the drivers' environment (RAY_ADDRESS set)."""
    _check_loopback_binds()
    temp_dir = Path(tempfile.mkdtemp(prefix="mhd-kept-", dir="/tmp"))  # short: Ray's socket paths
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    ports = _ports("port", "ray-client-server-port", "dashboard-port", *NODE_PORT_FLAGS)
    args = ["--head", f"--node-ip-address={HEAD_IP}", f"--temp-dir={temp_dir}", "--num-cpus=2"]
    node = _start_node([*args, "--include-dashboard=false", *_port_args(ports)], env, temp_dir / "head.log")
    try:
        _wait_started(node, temp_dir / "head.log")
        yield env | {"RAY_ADDRESS": f"{HEAD_IP}:{ports['port']}"}
    finally:
        _stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _command(run_dir: Path, *overrides: str) -> list[str]:
    return [
        MHD_SIM,
        *TINY,
        "runtime.torch_threads=null",
        "runtime.address=auto",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def _run(env: dict[str, str], run_dir: Path, *overrides: str) -> dict[str, Any]:
    """One `mhd-sim` driver process; its summary.json."""
    done = subprocess.run(_command(run_dir, *overrides), env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return summary


def _kept_names(env: dict[str, str]) -> list[str]:
    """The kept workers' names on the head, asked by a driver of its own."""
    code = (
        "import json, ray; ray.init(address='auto', logging_level='ERROR');"
        f"print(json.dumps([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
        f"if a['namespace'] == {kept.KEPT_NAMESPACE!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return sorted(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_kept_workers_serve_the_next_run_with_the_same_results(head: dict[str, str], tmp_path: Path) -> None:
    first = _run(head, tmp_path / "first", KEEP)
    second = _run(head, tmp_path / "second", KEEP)
    assert first["runtime"]["kept_actors"] == {"reused": 0, "created": 2}
    assert second["runtime"]["kept_actors"] == {"reused": 2, "created": 0}
    assert sorted(second["runtime"]["pids"]) == sorted(first["runtime"]["pids"])  # the same processes
    assert len(_kept_names(head)) == 2  # idle, waiting for the next run
    fresh = _run(head, tmp_path / "fresh")  # new workers; the idle kept ones are retired to free their CPUs
    assert "kept_actors" not in fresh["runtime"]
    assert not set(fresh["runtime"]["pids"]) & set(first["runtime"]["pids"])
    assert _kept_names(head) == []
    assert first["final"] == second["final"] == fresh["final"]  # a reused worker builds its agents from scratch


@pytest.mark.slow
def test_a_kept_worker_is_never_shared_and_outlives_a_killed_driver(head: dict[str, str], tmp_path: Path) -> None:
    half_cpu = "runtime.num_cpus_per_actor=0.5"  # two runs' workers (two each) fit the head at once
    pairs = "runtime.agents_per_actor=2"
    long_run = tmp_path / "killed"
    driver = subprocess.Popen(_command(long_run, KEEP, half_cpu, pairs, "rounds=10000", "eval_every=10000"), env=head)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        rounds = long_run / "rounds.jsonl"
        while not (rounds.is_file() and rounds.read_text().strip()):  # a round trained: it holds its two workers
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        # Two whole CPUs while the busy run holds one: a named error in time, and no worker left waiting.
        too_big = ["runtime.num_cpus_per_actor=1", pairs, "runtime.startup_timeout_s=5"]
        refused = subprocess.run(
            _command(tmp_path / "too-big", KEEP, *too_big), env=head, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode != 0 and "runtime.startup_timeout_s=5.0s" in refused.stderr, refused.stderr[-2000:]
        assert len(_kept_names(head)) == 2  # the busy run's, neither retired nor taken
        beside = _run(head, tmp_path / "beside", KEEP, half_cpu, pairs)  # at the same time, same kind
        assert beside["runtime"]["kept_actors"] == {"reused": 0, "created": 2}  # not the busy run's
        assert driver.poll() is None
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # Four workers of one agent each: the two idle ones and the two whose driver was killed.
    after = _run(head, tmp_path / "after", KEEP, half_cpu, "runtime.agents_per_actor=1")
    assert after["runtime"]["kept_actors"] == {"reused": 4, "created": 0}
    assert after["final"] == beside["final"]  # results do not depend on how agents are grouped


@pytest.mark.slow
def test_kept_workers_exit_after_kept_idle_s(head: dict[str, str], tmp_path: Path) -> None:
    _run(head, tmp_path / "run", KEEP, "runtime.kept_idle_s=2")
    deadline = time.monotonic() + 60
    while _kept_names(head):
        assert time.monotonic() < deadline, "kept workers still there 60 s after a 2 s idle limit"
        time.sleep(1)
