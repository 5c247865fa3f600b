"""Shared fixtures: composed configs (from the packaged conf/) and one local Ray per session."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import DictConfig

from agents.agent import ExecutionConfig
from sim.run.preflight import compose_config

# How an Agent built directly in a test runs: one CPU thread, none of the speed options.
PLAIN_CPU = ExecutionConfig(
    device="cpu",
    torch_threads=1,
    channels_last=False,
    compile=False,
    vectorize=False,
    bf16=False,
    eval_channels_last=False,
)

# A tiny run: 4 agents on digits, 3 rounds — seconds on 2 cores.
TINY = [
    "num_agents=4",
    "rounds=3",
    "eval_every=3",
    "train.local_steps=2",
    "logger.progress=false",
    "runtime.torch_threads=1",
]


def make_config(*overrides: str) -> DictConfig:
    """The packaged config with `overrides` applied, as `mhd-sim` would compose it."""
    return compose_config(overrides)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray on loopback shared by every test that needs one (start-up costs ~6 s)."""
    import ray

    from sim.backends.ray.connection import loopback_only

    with loopback_only():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    yield
    ray.shutdown()


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module: scripts/ is not a package, so the script is loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
