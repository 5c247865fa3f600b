"""`runtime.storage`: checked values, checkpoints committed atomically on a filesystem and in object storage,
resume from there, and the probe that every worker shares the driver's view of it.

Object storage is moto's S3 server on 127.0.0.1: a stand-in for a real bucket, reached through
pyarrow's S3 client exactly as a bucket on AWS would be (only the endpoint differs).
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sim.backends import create_backend
from sim.backends.base import ProbeWrite
from sim.backends.serial import SerialBackend
from sim.backends.storage import StorageDir, storage_root
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from sim.experiment.settings import runtime_config
from sim.run.checkpoint import MANIFEST, PARTIAL, CheckpointStore, LoopState
from sim.run.loop import group_plans
from sim.run.main import run
from sim.run.preflight import preflight
from sim.run.storage import probe_storage, recorded_storage, storage_probe
from tests.conftest import PLAIN_CPU, TINY, make_config

RUN = [*TINY, "rounds=6", "eval_every=2", "checkpoint_every=2", "checkpoint_keep=3", "runtime.backend=serial"]


# ---- values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("ftp://host/runs", "null (the run directory), a path (a relative one is resolved on the driver), or a URI"),
        ("s3://", "a URI that names a bucket"),
        ("file://runs", "file:///ABSOLUTE/PATH"),
        ("''", "null (the run directory)"),
        ("3", "null (the run directory)"),
        ("s3://AKIAEXAMPLE:hunter2@bucket/runs", "a URI without credentials"),
    ],
)
def test_a_bad_storage_value_is_one_line_before_any_work(value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as error:
        preflight([*TINY, f"runtime.storage={value}"])
    message = str(error.value)
    assert message.startswith("runtime.storage=") and allowed in message and "\n" not in message
    assert "hunter2" not in message  # a secret is never echoed


def test_paths_become_absolute_and_uris_keep_their_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_root(None) is None
    assert storage_root("shared") == StorageDir(str(tmp_path / "shared"))
    assert storage_root("file:///mnt/nfs") == StorageDir("file:///mnt/nfs")
    pytest.importorskip("pyarrow.fs", reason="object storage needs the storage extra (pyarrow)")
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    location = storage_root(uri)
    assert location is not None and str(location.child("r1")) == "s3://bucket/runs/r1"


# ---- storage kinds: a shared path and an S3 bucket ------------------------------------------


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one bucket; the storage URI of a prefix in it."""
    server_module = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")
    pyarrow_fs = pytest.importorskip("pyarrow.fs", reason="object storage needs the storage extra (pyarrow)")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups off the loopback
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"endpoint_override=127.0.0.1:{port}&scheme=http"
        filesystem, _ = pyarrow_fs.FileSystem.from_uri(f"s3://mhd-runs?{endpoint}&allow_bucket_creation=true")
        filesystem.create_dir("mhd-runs")
        yield f"s3://mhd-runs/team?{endpoint}"
    finally:
        server.stop()


@pytest.fixture(params=["shared-path", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The value of runtime.storage for each kind of storage."""
    if request.param == "s3":
        return str(request.getfixturevalue("s3_bucket"))
    return str(tmp_path / "shared")


def _uncommit(checkpoint: StorageDir) -> None:
    """Leave `checkpoint` as a crash between its agent files and its commit would have left it."""
    if checkpoint.renames_atomically:
        checkpoint.rename(StorageDir(checkpoint.root, checkpoint.path + PARTIAL))
    else:
        checkpoint.delete(MANIFEST)


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_checkpoints_live_in_storage_and_resume_skips_uncommitted_and_damaged_ones(
    storage: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    finished = run(make_config(*RUN, f"runtime.storage='{storage}'"), run_dir)
    assert not (run_dir / "checkpoints").exists()
    location = CheckpointStore(recorded_storage(run_dir, None), 1).root
    assert location.names() == ["round_000002", "round_000004", "round_000006"]

    _uncommit(location.child("round_000006"))  # the driver died before the commit
    damaged = location.child("round_000004")
    damaged.write_bytes("agent_00001.pt", damaged.read_bytes("agent_00001.pt")[:100])  # a torn file
    before = _tree_digest(run_dir)
    with pytest.raises(ConfigError, match=r"runtime.storage='/elsewhere' is invalid: null or the run's own storage"):
        run(make_config(f"resume={run_dir}", "runtime.backend=serial", "runtime.storage=/elsewhere"), Path("unused"))
    assert _tree_digest(run_dir) == before  # a refused resume writes nothing

    resumed = run(make_config(f"resume={run_dir}", "runtime.backend=serial"), Path("unused"))
    assert resumed["final"] == finished["final"]  # from round_000002: bit-identical
    assert f"skipping damaged checkpoint {location}/round_000004" in capfd.readouterr().err


class DiesMidSave(SerialBackend):
    """Writes one agent file of a checkpoint, then dies, as a worker killed mid-checkpoint would."""

    def save(self, directory: StorageDir) -> None:
        self.groups[0].save(directory, agent_ids=[0])
        raise RuntimeError("worker died mid-checkpoint")


def test_a_checkpoint_cut_short_never_looks_complete(storage: str) -> None:
    experiment = build_experiment(make_config(*RUN, f"runtime.storage='{storage}'"))
    backend, groups = create_backend(experiment)
    backend.start(group_plans(experiment, groups), experiment.public)
    assert experiment.runtime.storage is not None and isinstance(backend, SerialBackend)
    store = CheckpointStore(experiment.runtime.storage.child("cut-short"), keep=2)
    store.save(backend, LoopState(next_round=2))
    dying = DiesMidSave(backend.execution)
    dying.groups = backend.groups
    with pytest.raises(RuntimeError, match="mid-checkpoint"):
        store.save(dying, LoopState(next_round=4))
    latest = store.latest()
    assert latest is not None and latest.state.next_round == 2


# ---- the probe ------------------------------------------------------------------------------


class OtherDisk(SerialBackend):
    """A worker that writes the probe where the driver does not look: its own disk at the same path."""

    def __init__(self, disk: Path) -> None:
        super().__init__(PLAIN_CPU)
        self.disk = disk

    def probe_storage(self, directory: StorageDir, token: bytes) -> list[ProbeWrite]:
        StorageDir.local(self.disk).write_bytes("probe-actor-1", token)
        return [ProbeWrite("node 10.0.0.3 (actor 1)", "probe-actor-1", None)]


class NoCredentials(SerialBackend):
    """A worker that the storage refuses."""

    def probe_storage(self, directory: StorageDir, token: bytes) -> list[ProbeWrite]:
        return [ProbeWrite("node 10.0.0.4 (actor 2)", "probe-actor-2", "OSError: AWS Error ACCESS_DENIED")]


def test_the_probe_names_the_node_whose_writes_the_driver_cannot_see(tmp_path: Path) -> None:
    location = StorageDir.local(tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        probe_storage(OtherDisk(tmp_path / "elsewhere"), location, None)
    message = str(error.value)
    assert message.startswith("runtime.storage=None is invalid: a place every worker shares with the driver: ")
    assert f"node 10.0.0.3 (actor 1) wrote {location}/.probe-" in message and "set runtime.storage to" in message
    assert "\n" not in message

    refused = r"runtime.storage='s3://b/p' is invalid: a place every worker can write: node 10.0.0.4 \(actor 2\) "
    with pytest.raises(ConfigError, match=refused + r"could not write .*/b/\.probe-\w+/probe-actor-2 \(OSError: AWS"):
        probe_storage(NoCredentials(PLAIN_CPU), StorageDir(str(tmp_path / "b")), "s3://b/p")


def test_the_probe_passes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    location = StorageDir.local(tmp_path / "run")
    probe_storage(SerialBackend(PLAIN_CPU), location, None)
    assert not list((tmp_path / "run").iterdir())


def test_the_probe_runs_where_workers_may_not_share_the_drivers_view(tmp_path: Path) -> None:
    local = runtime_config(make_config(*TINY).runtime)
    cluster = replace(local, address="10.0.0.1:6379")  # composed, never contacted
    in_run_dir, elsewhere = StorageDir.local(tmp_path), StorageDir(str(tmp_path / "shared"), "run-1")
    assert storage_probe(local, in_run_dir, tmp_path) is None  # one machine, the run directory: nothing to learn
    assert storage_probe(cluster, in_run_dir, tmp_path) is not None
    assert storage_probe(local, elsewhere, tmp_path) is not None
