"""Runs agent groups in Ray actors; predictions travel through the object store.

The driver holds only ObjectRefs: each actor `ray.put`s its outgoing bundle and the driver
passes that reference to the actors hosting the in-neighbours, so prediction bytes move actor
to actor. Resources are checked before any actor is created, and a start-up that does not
finish in time raises a named error instead of hanging.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from agents.actor import RemoteAgentGroup
from agents.agent import PublicData
from agents.messages import EvalCounts
from sim.backends.base import Backend, GroupPlan, WorkerLostError
from sim.placement import Placement, RuntimeConfig, execution_config


class ActorStartupError(RuntimeError):
    """Actors did not become ready within `runtime.startup_timeout_s`."""


class RayBackend(Backend):
    """One Ray actor per group; attaches to `runtime.address` or starts a local Ray."""

    def __init__(self, runtime: RuntimeConfig, placement: Placement, owns_ray: bool) -> None:
        self.runtime = runtime
        self.placement = placement
        self.owns_ray = owns_ray  # started Ray itself, so stops it on shutdown
        self.execution = execution_config(runtime, placement.torch_threads)  # actors swap in "cuda" for a GPU
        self.actors: list[Any] = []
        self.plans: list[GroupPlan] = []
        self.bundle_refs: list[ray.ObjectRef | None] = []
        self.locations: list[dict[str, str]] = []

    def start(self, plans: Sequence[GroupPlan], public: PublicData) -> None:
        self.plans = list(plans)
        # One copy in the object store, read by every actor. Held here for the whole run: Ray
        # needs it again to re-run __init__ when it restarts a dead actor.
        self.public_ref = ray.put(public)
        options = {
            "num_cpus": self.placement.num_cpus_per_group,
            "num_gpus": self.placement.num_gpus_per_group,
            "max_restarts": self.runtime.max_actor_restarts,  # Ray re-runs __init__ with the same specs
            "max_task_retries": 0,  # a lost call surfaces as WorkerLostError; the loop rolls back
        }
        self.actors = [
            RemoteAgentGroup.options(**options).remote(plan.specs, self.public_ref, self.execution)
            for plan in self.plans
        ]
        self._wait_ready()
        self.bundle_refs = [None] * len(self.actors)

    def _wait_ready(self) -> None:
        """Block until every actor has run its __init__; a start-up that hangs raises.

        A restarting actor answers "temporarily unavailable" until its __init__ has run again,
        so that answer is retried until runtime.startup_timeout_s.
        """
        deadline = time.monotonic() + self.runtime.startup_timeout_s
        while True:
            try:
                calls = [actor.ready.remote() for actor in self.actors]
                self.locations = ray.get(calls, timeout=max(deadline - time.monotonic(), 0.0))
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise WorkerLostError("a restarted agent actor never became available again") from None
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                raise ActorStartupError(
                    f"{len(self.actors)} actors were not ready after runtime.startup_timeout_s="
                    f"{self.runtime.startup_timeout_s}s (each asks for {self.placement.num_cpus_per_group} CPUs, "
                    f"{self.placement.num_gpus_per_group} GPUs)"
                ) from None

    def run_round(self, round_idx: int, publish: bool) -> dict[int, dict[str, float]]:
        calls = []
        for actor, plan in zip(self.actors, self.plans, strict=True):
            incoming = [ref for ref in (self.bundle_refs[source] for source in plan.sources) if ref is not None]
            calls.append(actor.run_round.remote(round_idx, publish and plan.publishes, *incoming))
        results = self._get(calls)
        metrics: dict[int, dict[str, float]] = {}
        for group_metrics, _ in results:
            metrics.update(group_metrics)
        self.bundle_refs = [bundle_ref for _, bundle_ref in results]
        return metrics

    def evaluate(self) -> dict[int, EvalCounts]:
        counts: dict[int, EvalCounts] = {}
        for group_counts in self._get([actor.evaluate.remote() for actor in self.actors]):
            counts.update(group_counts)
        return counts

    def save(self, directory: Path) -> None:
        self._get([actor.save.remote(str(directory)) for actor in self.actors])

    def restore(self, directory: Path) -> None:
        self._wait_ready()  # a restarted actor answers once its __init__ has run again
        self.bundle_refs = self._get([actor.restore.remote(str(directory)) for actor in self.actors])

    def _get(self, calls: list[Any]) -> list[Any]:
        """ray.get with the round timeout; a dead actor becomes a WorkerLostError."""
        try:
            return ray.get(calls, timeout=self.runtime.round_timeout_s)
        except ray.exceptions.RayActorError as error:  # also ActorDiedError / ActorUnavailableError
            raise WorkerLostError(f"an agent actor died: {type(error).__name__}") from error

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self.bundle_refs = []
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()

    def describe(self) -> dict[str, object]:
        return {
            "backend": "ray",
            "actors": len(self.actors),
            "agents_per_actor": [len(plan.specs) for plan in self.plans],
            "nodes": sorted({location["node_id"] for location in self.locations}),
            "torch_threads": self.placement.torch_threads,
            "pids": [int(location["pid"]) for location in self.locations],
            "devices": [location["device"] for location in self.locations],
        }


def connect_ray(runtime: RuntimeConfig) -> bool:
    """Attach to `runtime.address`, or start a local Ray on loopback; True if started here."""
    if ray.is_initialized():
        return False
    if runtime.address is None:
        # Keeps a single-node Ray on 127.0.0.1 instead of the machine's public address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(num_cpus=runtime.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=runtime.address, logging_level=logging.WARNING)
    return True


def cluster_capacity() -> tuple[float, float]:
    """(CPUs, GPUs) the connected cluster has in total."""
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
