"""Checkpoints of a whole population: every agent's state plus the driver's loop state.

Layout, one directory per checkpoint (named by the next round to run):

    RUN_DIR/checkpoints/round_000010/agent_00000.pt ...   written by each agent's own worker
                                     driver.json          loop state + a manifest of file sizes

A checkpoint is built in `round_000010.partial/` and renamed into place only after every
agent file and driver.json are on disk, so a crash mid-write leaves no directory that looks
complete. On load, the manifest's sizes are checked: a damaged (e.g. truncated) newest
checkpoint is skipped in favour of the previous one, and nothing is ever deleted on load.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sim.backends import Backend

PREFIX = "round_"
PARTIAL = ".partial"


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
    directory: Path
    state: LoopState


class CheckpointStore:
    """Writes, lists and validates the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.root = run_dir / "checkpoints"
        self.keep = keep

    def save(self, backend: Backend, state: LoopState) -> Path:
        """Write a complete checkpoint of `backend`'s agents and `state`; prune old ones."""
        final = self.root / f"{PREFIX}{state.next_round:06d}"
        partial = final.with_name(final.name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        backend.save(partial)
        manifest = {path.name: path.stat().st_size for path in sorted(partial.glob("*.pt"))}
        (partial / "driver.json").write_text(json.dumps({"state": asdict(state), "files": manifest}))
        shutil.rmtree(final, ignore_errors=True)  # a stale one from before a rollback
        partial.rename(final)
        self._prune()
        return final

    def latest(self, before_round: int | None = None) -> Checkpoint | None:
        """The newest intact checkpoint (optionally at or before `before_round`), or None."""
        for directory in sorted(self.root.glob(f"{PREFIX}[0-9]*"), reverse=True):
            if directory.name.endswith(PARTIAL):
                continue
            checkpoint = _read(directory)
            if checkpoint is None:
                print(f"mhd-sim: skipping damaged checkpoint {directory}", file=sys.stderr)
                continue
            if before_round is None or checkpoint.state.next_round <= before_round:
                return checkpoint
        return None

    def _prune(self) -> None:
        complete = sorted(d for d in self.root.glob(f"{PREFIX}[0-9]*") if not d.name.endswith(PARTIAL))
        for directory in complete[: max(len(complete) - self.keep, 0)]:
            shutil.rmtree(directory)


def _read(directory: Path) -> Checkpoint | None:
    """The checkpoint in `directory` if driver.json parses and every agent file has its size."""
    try:
        payload = json.loads((directory / "driver.json").read_text())
        files: dict[str, int] = payload["files"]
        if any((directory / name).stat().st_size != size for name, size in files.items()):
            return None
        return Checkpoint(directory, LoopState(**payload["state"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
