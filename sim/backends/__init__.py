"""Backends by name (`runtime.backend`): each builds itself and decides agent placement.

Importing this package imports neither torch nor Ray (each factory imports its backend), so
that `mhd-sim` can start Ray from sim.backends.ray.connection before torch is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from sim.core.registry import Registry

if TYPE_CHECKING:
    from sim.backends.base import Backend, Workload

BackendFactory: TypeAlias = "Callable[[Workload], tuple[Backend, list[list[int]]]]"
BACKENDS: Registry[BackendFactory] = Registry("runtime.backend")

__all__ = ["BACKENDS", "create_backend"]


@BACKENDS.register("serial")
def serial(experiment: Workload) -> tuple[Backend, list[list[int]]]:
    """Every agent in the driver process, as one group, using all cores for intra-op threads."""
    from sim.backends.runtime import execution_config
    from sim.backends.serial import SerialBackend

    runtime = experiment.runtime
    threads = runtime.torch_threads or os.cpu_count() or 1
    return SerialBackend(execution_config(runtime, threads)), [list(range(experiment.num_agents))]


@BACKENDS.register("ray")
def ray_actors(experiment: Workload) -> tuple[Backend, list[list[int]]]:
    """Groups of agents in Ray actors, planned against the nodes of the cluster (Ray imported only here)."""
    from sim.backends.ray.backend import create_ray_backend

    return create_ray_backend(experiment)


def create_backend(experiment: Workload) -> tuple[Backend, list[list[int]]]:
    """The backend `experiment.runtime.backend` names, and the agent ids of each of its groups."""
    return BACKENDS.get(experiment.runtime.backend)(experiment)
