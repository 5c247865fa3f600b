"""SIGINT / SIGTERM as a request: finish the round, checkpoint, exit 128 + signal number.

A second signal while the first is being honoured stops at once (KeyboardInterrupt), so a
user is never trapped by a slow round.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


def resume_command(run_dir: str) -> str:
    """What continues a stopped run from its newest checkpoint (printed and written to summary.json)."""
    return f"mhd-sim resume={run_dir}"


class RunInterrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is 128 + signum."""

    def __init__(self, signum: int, checkpoint: str, run_dir: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        self.resume_command = resume_command(run_dir)
        super().__init__(f"stopped by {signal.Signals(signum).name} after a checkpoint in {checkpoint}")


class StopRequests:
    """Context manager that turns SIGINT/SIGTERM into `.signum` for the round loop to poll."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # signals only reach it
            self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
