"""How and where agents run, whichever backend runs them: `RuntimeConfig` and its checks.

The serial backend and the Ray backend read the same settings (conf/runtime/*.yaml); only the
Ray-specific ones (placement, cluster) are interpreted in sim/backends/ray/. The checks here
reject what this machine can never do (a GPU it lacks, more agents than its memory holds)
before anything is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from agents.agent import ExecutionConfig
from sim.backends.faults import Fault
from sim.backends.ray.cluster import ClusterConfig
from sim.backends.storage import StorageDir
from sim.core.errors import ConfigError


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
    eval_channels_last: bool  # evaluate through an NHWC copy of each model (speed; test logits change by rounding)
    cluster: ClusterConfig  # placement strategy, per-backbone and custom resources, what ships to nodes
    faults: tuple[Fault, ...]  # fault injection, a test tool: workers killed at chosen points (sim/backends/faults.py)
    storage: StorageDir | None  # where agent state and checkpoints live; None: the run directory (backends/storage.py)
    keep_actors: bool  # warm mode: workers outlive the run for the next one on the same Ray (ray/kept.py)
    kept_idle_s: float  # a kept worker no run has used for this long exits

    @property
    def on_this_machine(self) -> bool:
        """Whether the agents run here: in this process (serial) or on a Ray started here (no address)."""
        return self.backend == "serial" or self.address is None


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


def execution_config(runtime: RuntimeConfig, threads: int) -> ExecutionConfig:
    """How agents' math runs in a worker (device "cpu"; an actor with a GPU swaps in "cuda")."""
    return ExecutionConfig(
        device="cpu",
        torch_threads=threads,
        channels_last=runtime.channels_last,
        compile=runtime.compile,
        vectorize=runtime.vectorize,
        bf16=runtime.bf16,
        eval_channels_last=runtime.eval_channels_last,
    )


MIN_AGENT_BYTES = 16 * 1024
"""A floor under one agent's memory in its worker, known before any data is read: its Python
objects, RNG, optimizer and a model of a few hundred parameters already take more (measured per
agent in docs/performance.md, "Scale"). It only has to reject the impossible at once; the check after
the data is read uses the real model and shard sizes."""


def machine_memory_bytes() -> int:
    """Physical memory of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_population_fits(num_agents: int, bytes_per_agent: int, runtime: RuntimeConfig, what: str) -> None:
    """Rejects a population that cannot fit this machine's memory, before anything is built for it.

    Agents on a cluster (runtime.address) are checked against the nodes' resources when
    actors are planned; here only a run on this machine is.
    """
    if not runtime.on_this_machine:
        return
    memory = machine_memory_bytes()
    if num_agents * bytes_per_agent > memory:
        raise ConfigError(
            "num_agents",
            num_agents,
            f"at most {memory // bytes_per_agent:,} on this machine ({memory / 2**30:.1f} GiB of memory): "
            f"each agent needs at least {bytes_per_agent / 2**20:.2f} MiB ({what})",
        )
