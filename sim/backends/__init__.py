"""Backends by name (`runtime.backend`): each builds itself and decides agent placement."""

from __future__ import annotations

import os
from collections.abc import Callable

from sim.backends.base import Backend, GroupPlan, Workload
from sim.backends.runtime import execution_config
from sim.backends.serial import SerialBackend
from sim.core.registry import Registry

BackendFactory = Callable[[Workload], tuple[Backend, list[list[int]]]]
BACKENDS: Registry[BackendFactory] = Registry("runtime.backend")

__all__ = ["BACKENDS", "Backend", "GroupPlan", "create_backend"]


@BACKENDS.register("serial")
def serial(experiment: Workload) -> tuple[Backend, list[list[int]]]:
    """Every agent in the driver process, as one group, using all cores for intra-op threads."""
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
