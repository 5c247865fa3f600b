"""Fault injection: kill agent workers at chosen points of a run, to test recovery for real.

`runtime.faults` lists faults; each kills one agent actor's process with SIGKILL (no clean-up,
no answer, as the OOM killer would) at one point of the round loop:

    runtime.faults='[{point: train, round: 5, actor: 1}, {point: restore, round: 5}]'

- `point`: train, evaluate, save (mid-checkpoint: after the first of the actor's agent files),
  restore (during a recovery's restore); see agents/faults.py.
- `round`: the fault fires at the first such point at or after this round of the loop (a
  checkpoint or a restore belongs to the round the loop is at; the start-up checkpoint to 0).
- `actor`: the actor index (summary.json `runtime.pids` order); left out or null: one drawn
  from the run's seed.

Every fault fires once, whatever rollbacks replay afterwards. Faults never change results: a
recovered run's numbers equal an undisturbed run's. tests/test_reliability.py and
scripts/chaos.py use this.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agents.faults import FAULT_POINTS
from sim.core.config import to_plain
from sim.core.errors import ConfigError
from sim.core.seeding import derive_rng
from sim.core.validation import non_negative_int

if TYPE_CHECKING:
    from sim.backends.base import Backend

FAULT_KEYS = ("point", "round", "actor")


@dataclass(frozen=True)
class Fault:
    point: str  # one of FAULT_POINTS
    round: int  # fires at the first `point` at or after this round
    actor: int | None  # actor index; None: drawn from the seed


def parse_faults(node: Any) -> tuple[Fault, ...]:
    """`runtime.faults` as Faults; a ConfigError names the first bad entry's key."""
    node = to_plain(node)
    if node is None:
        return ()
    if not isinstance(node, list):
        raise ConfigError("runtime.faults", node, "a list of {point, round, actor} mappings (or [])")
    return tuple(_fault(f"runtime.faults[{index}]", entry) for index, entry in enumerate(node))


def _fault(key: str, entry: Any) -> Fault:
    if not isinstance(entry, dict):
        raise ConfigError(key, entry, "a mapping {point, round, actor}")
    unknown = sorted(set(map(str, entry)) - set(FAULT_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", entry[unknown[0]], f"one of the keys {', '.join(FAULT_KEYS)}")
    point = entry.get("point")
    if point not in FAULT_POINTS:
        raise ConfigError(f"{key}.point", point, f"one of {', '.join(FAULT_POINTS)}")
    actor = entry.get("actor")
    return Fault(
        point=str(point),
        round=non_negative_int(f"{key}.round", entry.get("round", 0)),
        actor=None if actor is None else non_negative_int(f"{key}.actor", actor),
    )


class FaultSchedule:
    """Which faults are still to fire; the round loop asks it before every phase it runs."""

    def __init__(self, faults: Sequence[Fault], num_workers: int, seed: int) -> None:
        for index, fault in enumerate(faults):
            if fault.actor is not None and fault.actor >= num_workers:
                raise ConfigError(
                    f"runtime.faults[{index}].actor", fault.actor, f"an actor index below {num_workers} (actors here)"
                )
        rng = derive_rng(seed, "faults")
        drawn = [int(rng.integers(num_workers)) for _ in faults]
        self.pending = [
            (fault, fault.actor if fault.actor is not None else worker)
            for fault, worker in zip(faults, drawn, strict=True)
        ]

    def arm(self, backend: Backend, point: str, round_idx: int) -> None:
        """Arm `backend`'s workers for every pending fault due at `point` of round `round_idx`."""
        due = [(fault, worker) for fault, worker in self.pending if fault.point == point and round_idx >= fault.round]
        for fault, worker in due:
            self.pending.remove((fault, worker))
            print(f"mhd-sim: fault injection: actor {worker} dies during {point} at round {round_idx}", file=sys.stderr)
            backend.arm_fault(worker, point)
