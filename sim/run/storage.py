"""Where a run keeps its checkpoints, and the probe that every worker reaches that place.

- `runtime.storage` null: the run directory itself (RUN_DIR/checkpoints/), as it always was.
- set: STORAGE/RUN_ID/checkpoints/. Many runs share one bucket or NFS folder, so each gets
  its own RUN_ID (the run directory's name, the time and a random suffix), and RUN_DIR/storage.json
  records the place. `resume=RUN_DIR`, and every recovery, read the checkpoints from there,
  whatever the resuming command line says; the run directory on the driver keeps
  config.yaml, metrics, summary.json and the report.

The probe runs once the workers exist and before any training or restore: each worker writes
a small file into the run's storage from its own node, and the driver reads every one back.
Agents' checkpoint files are written on the workers' nodes and listed, sized and committed
by the driver, so a node whose writes the driver cannot see (its own disk at the same path,
no credentials, another mount) would otherwise make a run that looks healthy until its
first resume. The probe turns that into one line naming the node and the place, exit 2.
It runs where the workers might not share the driver's view: with `runtime.storage` set, or
attached to a cluster. On one machine with the run directory it would only cost time.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from sim.backends.base import Backend
from sim.backends.ray.placement import RuntimeConfig
from sim.backends.storage import KEY, StorageDir, storage_root
from sim.core.errors import ConfigError

RECORD = "storage.json"  # in the run directory, when the checkpoints live elsewhere
SHARE_ADVICE = (
    "set runtime.storage to a path every node mounts (NFS) or to s3://BUCKET/PREFIX, gs://BUCKET/PREFIX "
    "(docs/cluster.md#storage)"
)


def new_run_storage(run_dir: Path, storage: StorageDir | None) -> StorageDir:
    """Where a new run keeps its checkpoints; recorded in RUN_DIR/storage.json unless it is the run directory."""
    if storage is None:
        return StorageDir.local(run_dir)
    location = storage.child(f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
    (run_dir / RECORD).write_text(json.dumps({"root": location.root, "path": location.path}) + "\n")
    return location


def recorded_storage(run_dir: Path, requested: object) -> StorageDir:
    """Where run `run_dir` keeps its checkpoints, for `resume=`: its storage.json, else the run directory.

    `requested` is the resuming command's `runtime.storage`: null, or the run's own storage.
    Another place would hold none of this run's checkpoints.
    """
    record = run_dir / RECORD
    location = StorageDir.local(run_dir)
    if record.is_file():
        saved = json.loads(record.read_text())
        location = StorageDir(str(saved["root"]), str(saved["path"]))
    wanted = storage_root(requested)
    if wanted is not None and wanted.root != location.root:
        where = f"{location} (recorded in {record})" if record.is_file() else "its run directory"
        raise ConfigError(
            KEY,
            requested,
            f"null or the run's own storage when resuming: run {run_dir} keeps its checkpoints in {where}",
        )
    return location


def storage_probe(runtime: RuntimeConfig, location: StorageDir, run_dir: Path) -> Callable[[Backend], None] | None:
    """The probe of `location` for this run's workers, or None where they share the driver's view for sure."""
    in_run_dir = location == StorageDir.local(run_dir)
    if in_run_dir and runtime.on_this_machine:
        return None
    setting = None if in_run_dir else location.root.split("?", 1)[0]
    return lambda backend: probe_storage(backend, location, setting)


def probe_storage(backend: Backend, location: StorageDir, setting: str | None) -> None:
    """Every worker writes a file into `location`, the driver reads each back; ConfigError for the first that fails.

    `setting` is `runtime.storage` as the message shows it (None: the run directory). The
    probe's files are removed again wherever the driver can reach them.
    """
    token = secrets.token_hex(16).encode()
    directory = location.child(f".probe-{token[:8].decode()}")
    try:
        for write in backend.probe_storage(directory, token):
            path = f"{directory}/{write.name}"
            if write.error is not None:
                raise ConfigError(
                    KEY,
                    setting,
                    f"a place every worker can write: {write.where} could not write {path} ({write.error})",
                )
            try:
                seen = directory.read_bytes(write.name)
            except OSError:
                seen = None
            if seen != token:
                found = "cannot read it" if seen is None else "reads other content"
                why = "the run directory is on the driver's disk only" if setting is None else "nodes see other files"
                shared = f"a place every worker shares with the driver: {write.where} wrote {path}"
                raise ConfigError(KEY, setting, f"{shared}, but the driver {found} there ({why}); {SHARE_ADVICE}")
    finally:
        with contextlib.suppress(OSError):  # best effort: a refused storage may refuse this too
            directory.delete()
