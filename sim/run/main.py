"""One simulation from a composed config to a run directory.

Writes, next to Hydra's own files: config.yaml (resolved), partition.csv (class counts per
agent), graph.edgelist, metrics.jsonl (one line per evaluation), rounds.jsonl (one per round),
checkpoints/, summary.json and, once the run completes, report.html with plots/.
`resume=RUN_DIR` continues a run in its own directory from its newest intact checkpoint, with
the config it was started with (only `runtime` and `logger` may change: where a run continues
does not change its results).
"""

from __future__ import annotations

import importlib
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from sim.backends import BACKENDS, create_backend
from sim.backends.base import RecoveryFailedError
from sim.backends.storage import StorageDir
from sim.core.config import plain_dict
from sim.core.errors import ConfigError
from sim.core.validation import non_negative_int, positive_int
from sim.experiment.assembly import Experiment, build_experiment
from sim.reporting.loggers import LOGGERS, JsonlSink, Sink
from sim.run.checkpoint import Checkpoint, CheckpointStore
from sim.run.interrupt import RunInterrupted, resume_command
from sim.run.loop import CheckpointPolicy, group_plans, run_rounds, write_json
from sim.run.storage import new_run_storage, recorded_storage, storage_probe
from topologies import write_edge_list

WANDB_MODES = ("online", "offline", "disabled")
REPORT_MODULE = "sim.reporting.report"  # imports matplotlib: only a run that writes its report loads it
RESUMABLE_GROUPS = ("runtime", "logger")  # may differ between a run and its resumption


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate, assemble, run; returns the summary. Bad input raises ConfigError before work."""
    resume_from: Checkpoint | None = None
    if cfg.resume is not None:
        cfg, run_dir, storage, resume_from = resumed_run(cfg)
    check_names(cfg)
    every = non_negative_int("checkpoint_every", cfg.checkpoint_every)
    keep = positive_int("checkpoint_keep", cfg.checkpoint_keep)
    experiment = build_experiment(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        storage = new_run_storage(run_dir, experiment.runtime.storage)
    policy = CheckpointPolicy(
        every, CheckpointStore(storage, keep), storage_probe(experiment.runtime, storage, run_dir)
    )
    backend, groups = create_backend(experiment)
    sinks: list[Sink] = [JsonlSink(run_dir)]
    completed = False
    prepared: ReportPreparation | None = None
    try:
        plans = group_plans(experiment, groups)
        if experiment.runtime.vectorize:  # before any worker starts (imported here: torch.func, only when used)
            from agents.vectorized import check_vectorizable

            for plan in plans:
                check_vectorizable(plan.specs)
        if resume_from is None:
            write_run_files(run_dir, cfg, experiment)
        sinks += LOGGERS.get(str(cfg.logger.name))(plain_dict(cfg.logger), run_dir)
        for sink in sinks:
            sink.start(plain_dict(cfg), experiment.settings.rounds)
        if cfg.logger.report:
            prepared = ReportPreparation.start(run_dir)
        summary = run_rounds(experiment, backend, plans, sinks, run_dir, policy, resume_from)
        completed = True
    except RunInterrupted:
        raise  # summary.json already says "interrupted" and how to resume
    except RecoveryFailedError as error:  # the checkpoints stay: resume= continues once the cause is fixed
        failed = {"status": "failed", "error": describe_error(error), "resume_command": resume_command(str(run_dir))}
        write_json(run_dir / "summary.json", failed)
        raise
    except BaseException as error:
        write_json(run_dir / "summary.json", {"status": "failed", "error": describe_error(error)})
        raise
    finally:
        for sink in sinks:
            sink.close()
        # After the summary and the table are out: the plots are drawn while the backend stops.
        report = start_report(run_dir, prepared) if completed and prepared is not None else None
        try:
            backend.shutdown()
        finally:
            if report is not None:
                report.join()
    return summary


class ReportPreparation:
    """What a run that writes its report does for it while the rounds run, in a daemon thread.

    It imports the report's module (matplotlib, ~0.8 s) and draws the figures that need only the
    files written before the first round (`render_early`: the partition). The driver mostly
    waits on its workers meanwhile, so both are done by the time the report is drawn, which a
    short run (and a warm one, whose Ray shutdown is only a disconnect) would otherwise wait for
    at its end. A failure is left to `write_report`, which imports the module again and draws
    every figure, naming an error in one line.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rendered: dict[str, bytes] = {}
        self.thread = threading.Thread(target=self._prepare, name="mhd-sim-report-preparation", daemon=True)

    @classmethod
    def start(cls, run_dir: Path) -> ReportPreparation:
        prepared = cls(run_dir)
        prepared.thread.start()
        return prepared

    def _prepare(self) -> None:
        try:
            self.rendered = importlib.import_module(REPORT_MODULE).render_early(self.run_dir)
        except Exception:  # noqa: BLE001 - write_report draws everything again and reports the error
            return

    def result(self) -> dict[str, bytes]:
        """The figures drawn early, once the preparation has ended."""
        self.thread.join()
        return self.rendered


def start_report(run_dir: Path, prepared: ReportPreparation) -> threading.Thread:
    """`write_report` in a thread, so that drawing overlaps the backend's shutdown (Ray stopping its processes)."""
    thread = threading.Thread(target=write_report, args=(run_dir, prepared), name="mhd-sim-report", daemon=True)
    thread.start()
    return thread


def write_report(run_dir: Path, prepared: ReportPreparation) -> None:
    """report.html and plots/ of a completed run; a failure is one line on stderr, never a failed run.

    The summary is final before this starts. matplotlib (~1 s to import) is imported only for a
    run that writes its report: here, or already during the rounds by `ReportPreparation`.
    """
    try:
        page = importlib.import_module(REPORT_MODULE).write_run_report(run_dir, prepared.result())
    except Exception as error:
        reason = describe_error(error)
        print(f"mhd-sim: report not written ({reason}); write it with: mhd-sim-report {run_dir}", file=sys.stderr)
        return
    print(f"report: {page}", flush=True)


def resumed_run(cfg: DictConfig) -> tuple[DictConfig, Path, StorageDir, Checkpoint]:
    """The saved config of run `cfg.resume` (with this call's runtime/logger), its storage and its checkpoint."""
    run_dir = Path(str(cfg.resume))
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError("resume", str(run_dir), "a run directory of mhd-sim (with config.yaml)")
    saved = OmegaConf.load(saved_path)
    assert isinstance(saved, DictConfig)
    for group in RESUMABLE_GROUPS:
        saved[group] = cfg[group]
    storage = recorded_storage(run_dir, cfg.runtime.storage)
    checkpoint = CheckpointStore(storage, 1).latest()
    if checkpoint is None:
        raise ConfigError("resume", str(run_dir), f"a run directory with an intact checkpoint in {storage}/checkpoints")
    if checkpoint.state.next_round >= saved.rounds:
        raise ConfigError("resume", str(run_dir), f"an unfinished run (this one finished all {saved.rounds} rounds)")
    return saved, run_dir, storage, checkpoint


def describe_error(error: BaseException) -> str:
    """One line naming the original error (Ray wraps actor errors in a RayTaskError)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"


def check_names(cfg: DictConfig) -> None:
    """Registry names and modes that can be checked before any data is loaded."""
    BACKENDS.get(str(cfg.runtime.backend))
    LOGGERS.get(str(cfg.logger.name))
    if cfg.logger.name == "wandb" and cfg.logger.mode not in WANDB_MODES:
        raise ConfigError("logger.mode", cfg.logger.mode, f"one of {', '.join(WANDB_MODES)}")
    if not isinstance(cfg.logger.report, bool):
        raise ConfigError("logger.report", cfg.logger.report, "true or false")


def write_run_files(run_dir: Path, cfg: DictConfig, experiment: Experiment) -> None:
    """The resolved config, the partition's class-count matrix and the graph's edge list."""
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    counts = experiment.class_counts
    header = "agent," + ",".join(f"class_{c}" for c in range(counts.shape[1]))
    rows = np.column_stack([np.arange(len(counts)), counts])
    np.savetxt(run_dir / "partition.csv", rows, fmt="%d", delimiter=",", header=header, comments="")
    write_edge_list(experiment.graph, run_dir / "graph.edgelist")  # reloads unchanged through topology=from_file
