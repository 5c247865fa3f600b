"""Which agents share a worker process, and what each worker asks the cluster for.

Default: one worker per CPU core (or per GPU slot when GPUs are requested), agents spread in
contiguous, near-equal blocks — neighbours in a ring mostly share a worker. Requests that the
cluster cannot satisfy are rejected here, before any actor exists (Ray would otherwise wait
forever without a word).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.errors import ConfigError


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str  # "ray" or "serial"
    address: str | None  # Ray cluster to attach to; None starts a local one
    num_cpus: int | None  # CPUs of a locally started Ray; None: all of this machine
    agents_per_actor: int | None  # None: spread agents over one actor per CPU (or GPU slot)
    num_cpus_per_actor: float  # Ray resource request per actor (fractions allowed)
    num_gpus_per_actor: float  # e.g. 0.25 puts four actors on one GPU
    torch_threads: int | None  # intra-op threads per process; None: the actor's CPU share
    startup_timeout_s: float  # how long actors may take to start before the run fails
    round_timeout_s: float  # how long one round may take before the run fails
    max_actor_restarts: int  # times Ray restarts a dead actor before the run fails


@dataclass(frozen=True)
class Placement:
    groups: list[list[int]]  # agent ids hosted by each worker
    num_cpus_per_group: float
    num_gpus_per_group: float
    torch_threads: int


def plan_placement(num_agents: int, runtime: RuntimeConfig, cpus: float, gpus: float) -> Placement:
    """Split `num_agents` over workers that fit in `cpus` / `gpus` of the cluster."""
    if runtime.num_cpus_per_actor <= 0:
        raise ConfigError("runtime.num_cpus_per_actor", runtime.num_cpus_per_actor, "a number > 0")
    if runtime.num_gpus_per_actor < 0:
        raise ConfigError("runtime.num_gpus_per_actor", runtime.num_gpus_per_actor, "a number >= 0")
    if runtime.agents_per_actor is not None:
        if runtime.agents_per_actor < 1:
            raise ConfigError("runtime.agents_per_actor", runtime.agents_per_actor, "an integer >= 1 or null")
        num_groups = math.ceil(num_agents / runtime.agents_per_actor)
    else:
        slots = cpus / runtime.num_cpus_per_actor
        if runtime.num_gpus_per_actor > 0:
            slots = min(slots, gpus / runtime.num_gpus_per_actor)
        num_groups = max(1, min(num_agents, math.floor(slots + 1e-9)))
    _check_fits(num_groups, runtime, cpus, gpus)
    groups = [block.tolist() for block in np.array_split(np.arange(num_agents), num_groups)]
    threads = runtime.torch_threads or max(1, math.floor(runtime.num_cpus_per_actor))
    return Placement(groups, runtime.num_cpus_per_actor, runtime.num_gpus_per_actor, threads)


def _check_fits(num_groups: int, runtime: RuntimeConfig, cpus: float, gpus: float) -> None:
    need_cpus = num_groups * runtime.num_cpus_per_actor
    if need_cpus > cpus + 1e-9:
        raise ConfigError(
            "runtime.num_cpus_per_actor",
            runtime.num_cpus_per_actor,
            f"{num_groups} actors x {runtime.num_cpus_per_actor} CPUs = {need_cpus:g} "
            f"but the cluster has {cpus:g} CPUs; lower it (fractions allowed) or raise runtime.agents_per_actor",
        )
    need_gpus = num_groups * runtime.num_gpus_per_actor
    if need_gpus > gpus + 1e-9:
        raise ConfigError(
            "runtime.num_gpus_per_actor",
            runtime.num_gpus_per_actor,
            f"{num_groups} actors need {need_gpus:g} GPUs but the cluster has {gpus:g}",
        )
