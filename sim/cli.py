"""`mhd-sim`: the Hydra entry point. Configs ship inside the package (conf/)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from agents.agent import TrainingDivergedError
from sim.errors import ConfigError
from sim.run import describe_error, run

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one simulation (or one job of a --multirun sweep) into Hydra's output directory."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir)
    except ConfigError as error:
        if cfg.get("debug", False):
            raise
        print(f"mhd-sim: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingDivergedError as error:  # Ray re-raises it as a subclass of the original
        if cfg.get("debug", False):
            raise
        print(f"mhd-sim: {describe_error(error)}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
