"""Checkpoints of a whole population: every agent's state plus the driver's loop state.

Layout, one directory per checkpoint (named by the next round to run), in the run's storage
(the run directory, or STORAGE/RUN_ID for `runtime.storage`; sim/run/storage.py):

    checkpoints/round_000010/agent_00000.pt ...   written by each agent's own worker
                             driver.json          loop state + a manifest of file sizes

Commit, by what the storage can do atomically:
- a filesystem (local, NFS): the checkpoint is built in `round_000010.partial/` and renamed
  into place only after every agent file and driver.json are on disk;
- object storage (S3, GCS), which cannot rename a directory: the agent files are written in
  place and driver.json, the manifest, is written last: a checkpoint without it is not one.
Either way a crash mid-write leaves nothing that looks complete. On load, the manifest's sizes
are checked: a damaged (e.g. truncated) newest checkpoint is skipped in favour of the previous
one, and nothing is ever deleted on load.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sim.backends.base import Backend
from sim.backends.storage import StorageDir

PREFIX = "round_"
PARTIAL = ".partial"
COMPLETE = re.compile(rf"{PREFIX}[0-9]+")  # a committed checkpoint's name (not a .partial one)
MANIFEST = "driver.json"


@dataclass
class LoopState:
    """Everything the round loop needs to continue exactly where it stopped."""

    next_round: int = 0  # the public-batch schedule position is a pure function of this
    comm_bytes_total: int = 0
    round_times_s: list[float] = field(default_factory=list)
    eval_time_s: float = 0.0  # summed over the evaluations so far
    eval_history: list[dict[str, float]] = field(default_factory=list)  # per evaluation: round, main-head means
    last_eval: dict[str, Any] = field(default_factory=dict)
    actor_failures: int = 0
    rounds_replayed: int = 0
    # A dynamic network's totals (the schedule itself is a pure function of the round: nothing to save)
    messages_used: int = 0  # messages the agents distilled from, over all rounds
    staleness_sum: float = 0.0  # their ages in rounds, summed
    staleness_max: float = 0.0
    agent_rounds_active: int = 0  # agents that took part, summed over rounds


@dataclass(frozen=True)
class Checkpoint:
    directory: StorageDir
    state: LoopState


class CheckpointStore:
    """Writes, lists and validates the checkpoints of one run, in the run's storage."""

    def __init__(self, run_storage: Path | StorageDir, keep: int) -> None:
        """`run_storage`: the run directory, or the run's directory in `runtime.storage`."""
        root = StorageDir.local(run_storage) if isinstance(run_storage, Path) else run_storage
        self.root = root.child("checkpoints")
        self.keep = keep

    def save(self, backend: Backend, state: LoopState) -> StorageDir:
        """Write a complete checkpoint of `backend`'s agents and `state`; prune old ones."""
        final = self.root.child(f"{PREFIX}{state.next_round:06d}")
        if final.renames_atomically:
            staging = self.root.child(final.name + PARTIAL)
            staging.delete()
        else:  # no rename: uncommit a stale one from before a rollback (its manifest first), then fill it in place
            final.delete(MANIFEST)
            final.delete()
            staging = final
        backend.save(staging)
        manifest = {name: staging.size(name) for name in staging.names() if name.endswith(".pt")}
        staging.write_bytes(MANIFEST, json.dumps({"state": asdict(state), "files": manifest}).encode())  # the commit
        if staging != final:
            final.delete()  # a stale one from before a rollback
            staging.rename(final)
        self._prune()
        return final

    def latest(self, before_round: int | None = None) -> Checkpoint | None:
        """The newest intact checkpoint (optionally at or before `before_round`), or None."""
        for directory in reversed(self._complete()):
            checkpoint = _read(directory)
            if checkpoint is None:
                print(f"mhd-sim: skipping damaged checkpoint {directory}", file=sys.stderr)
                continue
            if before_round is None or checkpoint.state.next_round <= before_round:
                return checkpoint
        return None

    def _complete(self) -> list[StorageDir]:
        """Checkpoint directories by round, oldest first, without partial ones (intact or not: _read decides)."""
        return [self.root.child(name) for name in self.root.names() if COMPLETE.fullmatch(name)]

    def _prune(self) -> None:
        complete = self._complete()
        for directory in complete[: max(len(complete) - self.keep, 0)]:
            directory.delete(MANIFEST)  # uncommit first: a prune cut short leaves nothing that looks whole
            directory.delete()


def _read(directory: StorageDir) -> Checkpoint | None:
    """The checkpoint in `directory` if driver.json parses and every agent file has its size."""
    try:
        payload = json.loads(directory.read_bytes(MANIFEST))
        files: dict[str, int] = payload["files"]
        if any(directory.size(name) != size for name, size in files.items()):
            return None
        return Checkpoint(directory, LoopState(**payload["state"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
