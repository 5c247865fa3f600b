"""Where metrics go: the run directory's metrics.jsonl always, plus the sinks of `logger`.

A sink sees the run start, every round, every evaluation and the summary; `close` is always
called (in a finally), so a wandb run is finished even when the simulation fails.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sim.registry import Registry


class Sink:
    """No-op base: subclasses override what they care about."""

    def start(self, config: dict[str, Any], total_rounds: int) -> None: ...

    def log_round(self, round_idx: int, record: dict[str, float]) -> None: ...

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...

    def rewind(self, next_round: int) -> None:
        """Forget what was logged after `next_round` rounds (a rollback or a resume)."""

    def close(self) -> None: ...


class JsonlSink(Sink):
    """metrics.jsonl: one JSON line per evaluation, flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("a")

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def rewind(self, next_round: int) -> None:
        """Drop evaluations after round `next_round` (their rounds will be run again)."""
        self.file.close()
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["round"] <= next_round]
        partial = self.path.with_suffix(".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        partial.replace(self.path)
        self.file = self.path.open("a")

    def close(self) -> None:
        self.file.close()


class ConsoleSink(Sink):
    """A progress bar over rounds, and the per-head accuracy table at the end."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress
        self.bar: tqdm | None = None

    def start(self, config: dict[str, Any], total_rounds: int) -> None:
        self.bar = tqdm(total=total_rounds, desc="rounds", unit="round", disable=not self.progress, file=sys.stderr)

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        self.rewind(round_idx + 1)

    def rewind(self, next_round: int) -> None:
        if self.bar is not None:
            self.bar.n = next_round
            self.bar.refresh()

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            main = record["heads"]["main"]
            self.bar.set_postfix(shared=f"{main['shared_acc']:.3f}", private=f"{main['private_acc']:.3f}")

    def finish(self, summary: dict[str, Any]) -> None:
        self.close()
        print(format_head_table(summary), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_head_table(summary: dict[str, Any]) -> str:
    """The terminal table: per head, shared and private accuracy as mean / min / max."""
    lines = [
        f"{summary['method']} | {summary['num_agents']} agents | {summary['rounds']} rounds | "
        f"{summary['wall_time_s']:.1f} s | {summary['comm_bytes_total'] / 1e6:.2f} MB sent",
        f"{'head':<6} {'shared acc  mean   min   max':>29} {'private acc  mean   min   max':>31}",
    ]
    for head, row in summary["final"]["heads"].items():
        shared = f"{row['shared_acc']:.3f} {row['shared_acc_min']:.3f} {row['shared_acc_max']:.3f}"
        private = f"{row['private_acc']:.3f} {row['private_acc_min']:.3f} {row['private_acc_max']:.3f}"
        lines.append(f"{head:<6} {shared:>29} {private:>31}")
    return "\n".join(lines)


class WandbSink(Sink):
    """One wandb run per simulation (online, offline for `wandb sync` later, or disabled)."""

    def __init__(self, params: dict[str, Any], run_dir: Path) -> None:
        self.params = params
        self.run_dir = run_dir
        self.run: Any = None

    def start(self, config: dict[str, Any], total_rounds: int) -> None:
        import wandb  # imported here: runs without logger=wandb never pay for it

        self.run = wandb.init(
            project=self.params["project"],
            entity=self.params["entity"],
            group=self.params["group"],
            tags=list(self.params["tags"]),
            mode=self.params["mode"],
            job_type=config["method"]["name"],
            dir=str(self.run_dir),
            config=config,
        )

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        self.run.log(record, step=round_idx)

    def log_eval(self, round_idx: int, record: dict[str, Any]) -> None:
        flat = {f"acc/{head}/{name}": value for head, row in record["heads"].items() for name, value in row.items()}
        self.run.log(flat, step=round_idx)

    def finish(self, summary: dict[str, Any]) -> None:
        final = summary["final"]["heads"]
        self.run.summary.update({f"final/{head}/{name}": v for head, row in final.items() for name, v in row.items()})
        self.run.summary.update(
            {"wall_time_s": summary["wall_time_s"], "comm_bytes_total": summary["comm_bytes_total"]}
        )

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


SinkBuilder = Callable[[dict[str, Any], Path], list[Sink]]
LOGGERS: Registry[SinkBuilder] = Registry("logger")


@LOGGERS.register("console")
def console(params: dict[str, Any], run_dir: Path) -> list[Sink]:
    return [ConsoleSink(params["progress"])]


@LOGGERS.register("wandb")
def wandb_and_console(params: dict[str, Any], run_dir: Path) -> list[Sink]:
    return [ConsoleSink(params["progress"]), WandbSink(params, run_dir)]
