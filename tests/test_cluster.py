"""Cluster deployment: runtime keys, code shipping, shards read on the agents' nodes, the files in
scripts/cluster/, and a real two-node Ray cluster on loopback addresses.

The two-node test starts a head (127.0.0.2) and a worker (127.0.0.3) with `ray start`, token
authentication on, in their own temp dir and on free ports, runs `mhd-sim runtime=cluster` in a
subprocess against them, and stops every process it started on the way out, pass or fail. It
never runs `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import ray
import yaml

from sim.backends.ray.cluster import (
    SHIPPED_PACKAGES,
    DataSource,
    NodeDataError,
    NodeShards,
    cluster_config,
    read_shards,
    shards_read_on_node,
    shipped_code,
)
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from sim.experiment.settings import runtime_config
from sim.run.main import run
from tests.conftest import TINY, make_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = REPO / "scripts" / "cluster"
MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))
RAY = str(Path(sys.executable).with_name("ray"))


# ---- runtime keys ----------------------------------------------------------------------------


def test_the_cluster_runtime_composes_and_validates() -> None:
    cfg = make_config("runtime=cluster", "runtime.address=127.0.0.1:1")  # no TCP check: composed only
    cluster = cluster_config(cfg.runtime)
    assert (cluster.placement_strategy, cluster.shard_source, cluster.ship_code) == ("SPREAD", "node", True)
    assert cfg.runtime.address == "127.0.0.1:1" and cfg.runtime.num_cpus is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("runtime.placement_strategy=STRICT_PACK", "runtime.placement_strategy"),
        ("runtime.shard_source=nfs", "runtime.shard_source"),
        ("runtime.ship_code=yes", "runtime.ship_code"),
        ("runtime.resources={CPU:1}", "runtime.resources.CPU"),
        ("runtime.resources={ssd:-1}", "runtime.resources.ssd"),
        ("runtime.backbone_resources={resnet99:{num_gpus:1}}", "runtime.backbone_resources"),
        ("runtime.backbone_resources={resnet20:{gpus:1}}", "runtime.backbone_resources.resnet20.gpus"),
        ("runtime.backbone_resources={resnet20:{num_cpus:0}}", "runtime.backbone_resources.resnet20.num_cpus"),
        ("runtime.backbone_resources={resnet20:{resources:{GPU:1}}}", "runtime.backbone_resources.resnet20.resources"),
    ],
)
def test_bad_cluster_keys_are_one_line_config_errors(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        cluster_config(make_config(override).runtime)
    assert "\n" not in str(error.value)


def test_backbone_resources_become_ray_resource_amounts() -> None:
    cfg = make_config("runtime.backbone_resources={resnet20:{num_cpus:2,num_gpus:0.25,resources:{gpu_node:1}}}")
    assert cluster_config(cfg.runtime).backbone_resources == {"resnet20": {"gpu_node": 1.0, "CPU": 2.0, "GPU": 0.25}}


def test_a_missing_address_inside_a_ray_cluster_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(ConfigError, match=r"runtime.address=None .*second Ray on this node"):
        runtime_config(make_config().runtime)
    runtime_config(make_config("runtime.backend=serial").runtime)  # no Ray at all: fine


def test_an_address_with_a_local_cpu_count_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"runtime.num_cpus=2 .*null when runtime.address is set"):
        runtime_config(make_config("runtime=cluster", "runtime.num_cpus=2").runtime)


def test_the_code_shipped_with_a_job_is_the_project_packages() -> None:
    env = shipped_code()
    folders = [Path(folder) for folder in env["py_modules"]]
    assert [folder.name for folder in folders] == list(SHIPPED_PACKAGES)
    assert all((folder / "__init__.py").is_file() for folder in folders)
    assert "__pycache__" in env["excludes"]


# ---- private shards read on the agent's node -------------------------------------------------


def test_experiment_rows_point_at_each_agents_shard() -> None:
    for method in ("mhd", "central"):
        experiment = build_experiment(make_config(*TINY, f"method={method}"))
        specs, private = experiment.specs, experiment.private
        shipped, node_shards = shards_read_on_node(specs, private)
        assert node_shards is not None and all(len(spec.private_x) == 0 for spec in shipped)
        read = read_shards(shipped, node_shards, node="10.0.0.9")
        for original, again in zip(specs, read, strict=True):
            np.testing.assert_array_equal(original.private_x, again.private_x)
            np.testing.assert_array_equal(original.private_y, again.private_y)


def test_a_node_that_reads_other_samples_is_named() -> None:
    experiment = build_experiment(make_config(*TINY))
    shipped, node_shards = shards_read_on_node(experiment.specs, experiment.private)
    assert node_shards is not None
    shifted = replace(node_shards, refs=tuple(replace(ref, rows=ref.rows + 1) for ref in node_shards.refs))
    with pytest.raises(NodeDataError, match=r"node 10.0.0.9 read other samples for agent 0") as error:
        read_shards(shipped, shifted, node="10.0.0.9")
    assert error.value.config_error().key == "data.root"


def test_a_missing_dataset_file_on_a_node_names_the_node_and_the_path(tmp_path: Path) -> None:
    root = tmp_path / "mnist"
    source = DataSource("mnist", str(root), 0, {"download": False}, 100)
    with pytest.raises(NodeDataError) as error:
        read_shards([], NodeShards(source, ()), node="10.0.0.9")
    message = str(error.value.config_error())
    assert message.startswith(f"data.root='{root}' is invalid: on node 10.0.0.9: {root}/")
    assert "is missing" in message and "\n" not in message


def test_node_data_errors_survive_pickling() -> None:
    error = pickle.loads(pickle.dumps(NodeDataError("data.root", "/d", "on node 10.0.0.9: /d/x is missing")))
    assert str(error.config_error()) == "data.root='/d' is invalid: on node 10.0.0.9: /d/x is missing"


@pytest.mark.slow
def test_a_node_data_error_stops_the_run_before_any_round(ray_session: None) -> None:
    """Through real actors: the node's error reaches the driver as the one-line ConfigError."""
    from sim.backends import create_backend
    from sim.run.loop import group_plans

    experiment = build_experiment(make_config(*TINY, "runtime.shard_source=node", "runtime.agents_per_actor=4"))
    rows = {agent: agent_rows[::-1] for agent, agent_rows in experiment.private.rows.items()}  # other samples
    experiment = replace(experiment, private=replace(experiment.private, rows=rows))
    backend, groups = create_backend(experiment)
    try:
        with pytest.raises(ConfigError, match=r"data.root=None is invalid: the same dataset on every node: node "):
            backend.start(group_plans(experiment, groups), experiment.public)
    finally:
        backend.shutdown()


# ---- files in scripts/cluster/ ---------------------------------------------------------------


def _yaml(name: str) -> Any:
    return yaml.safe_load((CLUSTER_FILES / name).read_text())


def test_the_cluster_launcher_yaml_matches_the_schema_inside_ray() -> None:
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    config = _yaml("ray-cluster.yaml")
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(kind["resources"].get("GPU", 0) > 0 for kind in types.values())
    assert any(kind["resources"].get("CPU", 0) > 0 and "GPU" not in kind["resources"] for kind in types.values())
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in command for command in starts if "ray start" in command)
    assert "0.0.0.0" not in (CLUSTER_FILES / "ray-cluster.yaml").read_text()  # no port open to everyone


def test_the_rayjob_manifest_has_what_kuberay_needs() -> None:
    job = _yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert "mhd-sim" in spec["entrypoint"] and "runtime=cluster" in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and runtime_env["env_vars"]["RAY_AUTH_MODE"] == "token"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    pods = [head["template"]["spec"]] + [group["template"]["spec"] for group in groups]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"].startswith("rayproject/ray:")
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    assert all(group["groupName"] and group["replicas"] >= 0 and "rayStartParams" in group for group in groups)
    limits = [pod["containers"][0]["resources"]["limits"] for pod in pods[1:]]
    assert any("nvidia.com/gpu" in limit for limit in limits) and any("nvidia.com/gpu" not in x for x in limits)


def test_the_slurm_script_is_valid_bash_that_starts_a_head_workers_and_mhd_sim() -> None:
    script = CLUSTER_FILES / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes=" in text and "RAY_AUTH_MODE=token" in text
    assert "ray start --head" in text and "ray start --address" in text
    assert 'mhd-sim runtime=cluster runtime.address="$HEAD_IP:$PORT" "$@"' in text


# ---- a real two-node cluster on loopback -----------------------------------------------------

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
NODE_START_TIMEOUT_S = 120.0
NODE_STOP_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 300.0


@dataclass
class LoopbackCluster:
    address: str  # the head's GCS address
    env: dict[str, str]  # what every Ray process and driver of this cluster runs with
    temp_dir: Path


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _distinct_free_ports(count: int) -> list[int]:
    """Ports free on every address, all different.

    Every probe stays bound until all are chosen: probing one port at a time can hand the same
    port to two of a node's servers, and the node then fails to start.
    """
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind(("", 0))
            ports.append(int(probe.getsockname()[1]))
    return ports


def _ports(*flags: str) -> dict[str, int]:
    """A distinct free port for each `ray start` port flag.

    Ray's fixed defaults (6379, 10001, 52365, ...) could be taken by another Ray on this machine,
    and some of its servers also listen on 127.0.0.1, whatever the node's own address.
    """
    return dict(zip(flags, _distinct_free_ports(len(flags)), strict=True))


def _port_args(ports: dict[str, int]) -> list[str]:
    return [f"--{flag}={port}" for flag, port in ports.items()]


NODE_PORT_FLAGS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`ray start ... --block` in a new session: its process group holds every process of the node."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [RAY, "start", *args, "--block", "--disable-usage-stats"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_started(node: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while b"Ray runtime started" not in log.read_bytes():
        if node.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_node(node: subprocess.Popen[bytes]) -> None:
    """SIGTERM makes `ray start --block` stop its node; whatever is left of its group is killed."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=NODE_STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):  # nothing left in the group
        os.killpg(node.pid, signal.SIGKILL)  # the group id is the pid: start_new_session
    node.wait()


def _check_loopback_binds() -> None:
    """Skips off Linux (elsewhere only 127.0.0.1 is loopback); on Linux, an address that does not bind fails."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"needs Linux, where all of 127.0.0.0/8 is loopback (this is {sys.platform})")
    for host in (HEAD_IP, WORKER_IP):
        try:
            _free_port(host)
        except OSError as error:
            pytest.fail(f"cannot bind a port on the loopback address {host} on Linux: {error}")


NodeStarter = Callable[[list[str], dict[str, str], Path], subprocess.Popen[bytes]]


@contextlib.contextmanager
def two_nodes(temp_dir: Path, start_worker: NodeStarter | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """A head on 127.0.0.2 and a worker on 127.0.0.3, 1 CPU each, token auth: (GCS address, env); always torn down.

    `start_worker` starts the worker node (default `_start_node`); tests/test_cluster_storage.py
    starts it in a mount namespace of its own. `temp_dir` is the nodes' Ray temp dir.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    head_ports = _ports("port", "ray-client-server-port", "dashboard-port", *NODE_PORT_FLAGS)
    port = head_ports["port"]  # the GCS port the worker and the driver join
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head_args = ["--head", f"--node-ip-address={HEAD_IP}", f"--temp-dir={temp_dir}"]
        head_args += ["--num-cpus=1", "--include-dashboard=false", *_port_args(head_ports)]
        nodes.append(_start_node(head_args, env, temp_dir / "head.log"))
        _wait_started(nodes[-1], temp_dir / "head.log")
        worker_args = [f"--address={HEAD_IP}:{port}", f"--node-ip-address={WORKER_IP}", f"--temp-dir={temp_dir}"]
        worker_args += ["--num-cpus=1", *_port_args(_ports(*NODE_PORT_FLAGS))]
        nodes.append((start_worker or _start_node)(worker_args, env, temp_dir / "worker.log"))
        _wait_started(nodes[-1], temp_dir / "worker.log")
        yield f"{HEAD_IP}:{port}", env
    finally:
        for node in reversed(nodes):
            _stop_node(node)


@pytest.fixture(scope="module")
def loopback_cluster() -> Iterator[LoopbackCluster]:
    """A head on 127.0.0.2 and a worker on 127.0.0.3, 1 CPU each, token auth; always torn down."""
    _check_loopback_binds()
    temp_dir = Path(tempfile.mkdtemp(prefix="mhd-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    try:
        with two_nodes(temp_dir) as (address, env):
            yield LoopbackCluster(address, env, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_a_two_node_cluster_runs_agents_on_both_nodes_with_single_node_results(
    loopback_cluster: LoopbackCluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "cluster-run"
    command = [MHD_SIM, *TINY, "runtime=cluster", f"runtime.address={loopback_cluster.address}"]
    command += [f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=tmp_path, env=loopback_cluster.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"two-node run: {time.perf_counter() - started:.1f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    where = summary["runtime"]
    assert sorted(where["node_ips"]) == [HEAD_IP, WORKER_IP]  # one actor on each node
    assert (where["placement_strategy"], where["shard_source"]) == ("SPREAD", "node")
    shipped = list(
        loopback_cluster.temp_dir.glob("session_*/runtime_resources/py_modules_files/*/sim/backends/ray/cluster.py")
    )
    assert shipped, "the job's code was not shipped through runtime_env"

    single = run(make_config(*TINY, "runtime.backend=serial"), tmp_path / "single")
    assert summary["final"] == json.loads(json.dumps(single["final"]))
