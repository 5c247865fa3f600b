"""Fault points of a worker process: where an injected fault kills it (a test tool; sim/backends/faults.py arms them).

Pure Python (no Ray, no torch), so the driver can check `runtime.faults` without importing Ray.
"""

from __future__ import annotations

import os
import signal

FAULT_POINTS = ("train", "evaluate", "save", "restore")
"""train, evaluate, restore: inside that call of the worker, after its work, before its answer;
save: after the first of the worker's agent checkpoint files is written, before the others."""


class ArmedFaults:
    """The fault points at which this process kills itself at its next call."""

    def __init__(self) -> None:
        self.points: set[str] = set()

    def arm(self, point: str) -> None:
        if point not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {point!r}; one of {', '.join(FAULT_POINTS)}")
        self.points.add(point)

    def __contains__(self, point: str) -> bool:
        return point in self.points

    def die_if_armed(self, point: str) -> None:
        """SIGKILL this process if `point` is armed: no clean-up and no answer, as the OOM killer would."""
        if point in self.points:
            os.kill(os.getpid(), signal.SIGKILL)
