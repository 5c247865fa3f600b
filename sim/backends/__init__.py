"""Backends by name (`runtime.backend`): each builds itself and decides agent placement."""

from __future__ import annotations

import os
from collections.abc import Callable

from sim.backends.base import Backend, GroupPlan
from sim.backends.serial import SerialBackend
from sim.placement import RuntimeConfig, execution_config, plan_placement
from sim.registry import Registry

BackendFactory = Callable[[RuntimeConfig, int], tuple[Backend, list[list[int]]]]
BACKENDS: Registry[BackendFactory] = Registry("runtime.backend")

__all__ = ["BACKENDS", "Backend", "GroupPlan", "create_backend"]


@BACKENDS.register("serial")
def serial(runtime: RuntimeConfig, num_agents: int) -> tuple[Backend, list[list[int]]]:
    """Every agent in the driver process, as one group, using all cores for intra-op threads."""
    threads = runtime.torch_threads or os.cpu_count() or 1
    return SerialBackend(execution_config(runtime, threads)), [list(range(num_agents))]


@BACKENDS.register("ray")
def ray_actors(runtime: RuntimeConfig, num_agents: int) -> tuple[Backend, list[list[int]]]:
    """Groups of agents in Ray actors, sized to the cluster this connects to."""
    from sim.backends.ray_backend import RayBackend, cluster_capacity, connect_ray

    started_here = connect_ray(runtime)
    cpus, gpus = cluster_capacity()
    placement = plan_placement(num_agents, runtime, cpus, gpus)
    return RayBackend(runtime, placement, started_here), placement.groups


def create_backend(runtime: RuntimeConfig, num_agents: int) -> tuple[Backend, list[list[int]]]:
    return BACKENDS.get(runtime.backend)(runtime, num_agents)
