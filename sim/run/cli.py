"""`mhd-sim`: checks the command line, then hands it to Hydra. Configs ship inside the package (conf/).

Start-up order (docs/performance.md, Start-up): the command line is composed (Hydra only); a
single run on Ray starts its Ray in a thread; only then are torch and the agents imported, for
the value checks and the run, while Ray's processes come up on another core. So nothing at the
top of this module imports torch (tests/test_startup.py checks it).
"""

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

from sim.core.errors import ConfigError
from sim.run.interrupt import RunInterrupted, resume_command
from sim.run.preflight import CONFIG_MODULE, CONFIG_NAME, HYDRA_VERSION_BASE, check_jobs, compose_jobs, debug_requested

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
        debug = debug_requested(args)
        with bad_input_exits(debug):
            jobs = compose_jobs(args)
        early = start_ray_early(args, jobs.configs)
        try:
            from sim.run.sweeps import SweepFailures, parallel_jobs_override  # imports torch: after Ray began

            with bad_input_exits(debug):
                check_jobs(jobs)
                sized = parallel_jobs_override(jobs.configs)  # how many jobs of a parallel sweep fit at once
        except BaseException:  # a bad value: the run will not happen, so neither will its Ray
            if early:
                stop_early_ray()
            raise
        gc.freeze()  # again: torch and the agents are imported by now
        if sized:
            print(f"mhd-sim: {len(jobs.configs)} sweep jobs, {sized[0].rpartition('=')[2]} at a time", file=sys.stderr)
            sys.argv += sized
        simulate()
        if SweepFailures.failed:
            listed = "; ".join(SweepFailures.failed)
            print(f"mhd-sim: {len(SweepFailures.failed)} sweep job(s) failed: {listed}", file=sys.stderr)
            sys.exit(EXIT_FAILED)
    finally:
        gc.freeze()


def start_ray_early(args: list[str], configs: list[DictConfig]) -> bool:
    """A single run on Ray (no flags): start the local Ray, or attach to `runtime.address`, now, in a
    thread, while torch is imported, the values are checked and the experiment is built
    (sim.backends.ray.connection.EarlyRay). The run waits for it where it would have started it.
    True if a start began; a runtime group that is not plainly valid starts nothing (the checks
    name what is wrong)."""
    if len(configs) != 1 or any(arg.startswith("-") for arg in args):
        return False
    from sim.backends.ray.address import RayTarget

    target = RayTarget.requested(configs[0].runtime)
    if target is None:
        return False
    from sim.backends.ray.connection import EarlyRay  # imports ray here, in this thread, before torch

    EarlyRay.start(target)
    return True


def stop_early_ray() -> None:
    """Stops the Ray `start_ray_early` began, because a check failed after it began.

    Its error line is already on stderr; Ray is waited for and shut down (a second or two), so
    that none of its processes outlives the command (an exit without it leaves Ray's agent
    processes running for a minute).
    """
    from sim.backends.ray.connection import EarlyRay

    EarlyRay.abandon()


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
    from agents.agent import TrainingDivergedError  # torch: imported once Ray is starting (module docstring)
    from sim.backends.base import RecoveryFailedError
    from sim.run.main import describe_error, run

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
