"""Which agents share a worker process, and what each worker asks the cluster for.

Default: one worker per CPU core (or per GPU slot when GPUs are requested), agents spread in
contiguous, near-equal blocks — neighbours in a ring mostly share a worker. Requests that the
cluster cannot satisfy are rejected here, before any actor exists (Ray would otherwise wait
forever without a word).
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import numpy as np

from agents.agent import ExecutionConfig
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
    channels_last: bool  # NHWC memory format for convolutions (speed only)
    compile: bool  # torch.compile each agent's model (speed only; first rounds pay the compile)
    vectorize: bool  # vmap a process's homogeneous agents together (an option to prove on GPU)
    bf16: bool  # bfloat16 autocast of forward passes (speed; numerics change, see docs/performance.md)

    @property
    def on_this_machine(self) -> bool:
        """Whether the agents run here: in this process (serial) or on a Ray started here (no address)."""
        return self.backend == "serial" or self.address is None


ADDRESS_TIMEOUT_S = 3.0
"""A reachable Ray head accepts a TCP connection in milliseconds; 3 s also covers a slow WAN link."""


def check_gpus_exist(runtime: RuntimeConfig, cuda_available: bool) -> None:
    """Rejects a GPU request for agents on this machine when torch sees no CUDA device here.

    A locally started Ray would report 0 GPUs only after it has started, and the serial
    backend would run on the CPU while the config claims a GPU.
    """
    if runtime.num_gpus_per_actor > 0 and runtime.on_this_machine and not cuda_available:
        raise ConfigError(
            "runtime.num_gpus_per_actor",
            runtime.num_gpus_per_actor,
            "0 here: torch sees no CUDA device on this machine (set runtime.address to use a GPU cluster)",
        )


def check_cluster_address(runtime: RuntimeConfig) -> None:
    """Rejects a Ray address that does not accept a TCP connection, before ray.init retries it.

    `auto` (find the cluster this machine belongs to) is left to Ray, and so is the address
    when it is unused (serial backend) or absent (a local Ray is started).
    """
    if runtime.on_this_machine or runtime.address == "auto":
        return
    assert runtime.address is not None
    host, port = _host_port(runtime.address)
    try:
        socket.create_connection((host, port), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(
            "runtime.address", runtime.address, f"a reachable Ray cluster ({host}:{port}: {error.strerror or error})"
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("runtime.address", address, "null, auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Placement:
    groups: list[list[int]]  # agent ids hosted by each worker
    num_cpus_per_group: float
    num_gpus_per_group: float
    torch_threads: int


def execution_config(runtime: RuntimeConfig, threads: int) -> ExecutionConfig:
    """How agents' math runs in a worker (device "cpu"; an actor with a GPU swaps in "cuda")."""
    return ExecutionConfig(
        device="cpu",
        torch_threads=threads,
        channels_last=runtime.channels_last,
        compile=runtime.compile,
        vectorize=runtime.vectorize,
        bf16=runtime.bf16,
    )


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
