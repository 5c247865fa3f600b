"""`mhd-sim`: checks the command line, then hands it to Hydra. Configs ship inside the package (conf/)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from agents.agent import TrainingDivergedError
from sim.backends.base import RecoveryFailedError
from sim.core.errors import ConfigError
from sim.run.interrupt import RunInterrupted, resume_command
from sim.run.main import describe_error, run
from sim.run.preflight import CONFIG_MODULE, CONFIG_NAME, HYDRA_VERSION_BASE, debug_requested, preflight
from sim.run.sweeps import SweepFailures, parallel_jobs_override

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1  # the run diverged, or lost agents it could not restore

# A failed --multirun job ends itself, not the sweep: the next jobs (other seeds, other
# learning rates) still run, and main() names the failed ones (sim.run.sweeps.SweepFailures
# reads their summary.json, whichever process ran them) and exits with EXIT_FAILED once the
# sweep is done.


def main() -> None:
    """The console entry point: every bad input is one line and exit 2 before Hydra starts a job.

    The objects that exist at start (the imports', ~200,000) and at exit are frozen out of the
    garbage collector: each full collection would walk them all again, and the interpreter's
    collections at exit took ~1 s after a run (docs/performance.md, Start-up). Files, sinks and
    Ray are closed before the end and atexit handlers still run; only the memory of frozen
    objects that become garbage is left to the operating system.
    """
    gc.freeze()
    try:
        args = sys.argv[1:]
        with bad_input_exits(debug_requested(args)):
            configs = preflight(args)
            sized = parallel_jobs_override(configs)  # how many jobs of a parallel sweep fit at once
        if sized:
            print(f"mhd-sim: {len(configs)} sweep jobs, {sized[0].rpartition('=')[2]} at a time", file=sys.stderr)
            sys.argv += sized
        start_ray_early(args, configs)
        simulate()
        if SweepFailures.failed:
            listed = "; ".join(SweepFailures.failed)
            print(f"mhd-sim: {len(SweepFailures.failed)} sweep job(s) failed: {listed}", file=sys.stderr)
            sys.exit(EXIT_FAILED)
    finally:
        gc.freeze()


def start_ray_early(args: list[str], configs: list[DictConfig]) -> None:
    """A single run on Ray (no flags): start the local Ray, or attach to `runtime.address`, now, while
    Hydra composes the job and the experiment is built (sim.backends.ray.backend.EarlyRay). The run
    waits for it where it would have started it."""
    if len(configs) != 1 or any(arg.startswith("-") for arg in args) or configs[0].runtime.backend != "ray":
        return
    from sim.backends.ray.backend import EarlyRay  # imports ray here, in this thread
    from sim.experiment.settings import runtime_config

    EarlyRay.start(runtime_config(configs[0].runtime))


@contextmanager
def bad_input_exits(debug: bool) -> Iterator[None]:
    """Turns a ConfigError into `mhd-sim: error: ...` on stderr and exit code 2; debug re-raises it."""
    try:
        yield
    except ConfigError as error:
        if debug:
            raise
        print(f"mhd-sim: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def simulate(cfg: DictConfig) -> None:
    """Run one simulation (or one job of a --multirun sweep) into Hydra's output directory."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    debug = bool(cfg.get("debug", False))
    with bad_input_exits(debug):
        try:
            run(cfg, run_dir)
        except (TrainingDivergedError, RecoveryFailedError) as error:  # Ray re-raises the first as a subclass
            if debug:
                raise
            reason = describe_error(error)
            if isinstance(error, RecoveryFailedError):
                kept = "every checkpoint is kept: once the cause is fixed, continue with"
                reason += f"; {kept}: {resume_command(str(run_dir))}"
            print(f"mhd-sim: {reason}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:  # summary.json says failed; the sweep goes on
                return
            sys.exit(EXIT_FAILED)
        except RunInterrupted as stopped:  # checkpoint written; summary.json says how to resume
            print(f"mhd-sim: {stopped}; continue with: {stopped.resume_command}", file=sys.stderr)
            sys.exit(stopped.exit_code)
