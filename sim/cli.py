"""`mhd-sim`: checks the command line, then hands it to Hydra. Configs ship inside the package (conf/)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from agents.agent import TrainingDivergedError
from sim.errors import ConfigError
from sim.interrupt import RunInterrupted
from sim.preflight import CONFIG_MODULE, CONFIG_NAME, HYDRA_VERSION_BASE, debug_requested, preflight
from sim.run import describe_error, run

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1

# "RUN_DIR: reason" of each --multirun job that diverged. A diverged job ends itself, not the
# sweep: the next jobs (other seeds, other learning rates) still run, and main() names the
# diverged ones and exits with EXIT_DIVERGED once the sweep is done.
diverged_sweep_jobs: list[str] = []


def main() -> None:
    """The console entry point: every bad input is one line and exit 2 before Hydra starts a job."""
    args = sys.argv[1:]
    with bad_input_exits(debug_requested(args)):
        preflight(args)
    simulate()
    if diverged_sweep_jobs:
        listed = "; ".join(diverged_sweep_jobs)
        print(f"mhd-sim: {len(diverged_sweep_jobs)} sweep job(s) diverged: {listed}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


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
        except TrainingDivergedError as error:  # Ray re-raises it as a subclass of the original
            if debug:
                raise
            reason = describe_error(error)
            print(f"mhd-sim: {reason}", file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:  # summary.json says failed; the sweep goes on
                diverged_sweep_jobs.append(f"{run_dir}: {reason}")
                return
            sys.exit(EXIT_DIVERGED)
        except RunInterrupted as stopped:  # checkpoint written; summary.json says how to resume
            print(f"mhd-sim: {stopped}; continue with: {stopped.resume_command}", file=sys.stderr)
            sys.exit(stopped.exit_code)
