"""Runs agent groups in Ray actors; predictions travel through the object store.

The driver holds only ObjectRefs: each actor `ray.put`s its outgoing bundle and the driver
passes that reference to the actors hosting the in-neighbours, so prediction bytes move actor
to actor. Resources are checked before any actor is created, and a start-up that does not
finish in time raises a named error instead of hanging.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ray

from agents.actor import RemoteAgentGroup
from agents.agent import PublicData
from agents.messages import EvalCounts
from sim.backends.base import Backend, GroupPlan
from sim.placement import Placement, RuntimeConfig


class ActorStartupError(RuntimeError):
    """Actors did not become ready within `runtime.startup_timeout_s`."""


class RayBackend(Backend):
    """One Ray actor per group; attaches to `runtime.address` or starts a local Ray."""

    def __init__(self, runtime: RuntimeConfig, placement: Placement, owns_ray: bool) -> None:
        self.runtime = runtime
        self.placement = placement
        self.owns_ray = owns_ray  # started Ray itself, so stops it on shutdown
        self.actors: list[Any] = []
        self.plans: list[GroupPlan] = []
        self.bundle_refs: list[ray.ObjectRef | None] = []
        self.locations: list[dict[str, str]] = []

    def start(self, plans: Sequence[GroupPlan], public: PublicData) -> None:
        self.plans = list(plans)
        public_ref = ray.put(public)  # one copy in the object store, read by every actor
        options = {"num_cpus": self.placement.num_cpus_per_group, "num_gpus": self.placement.num_gpus_per_group}
        self.actors = [
            RemoteAgentGroup.options(**options).remote(plan.specs, public_ref, self.placement.torch_threads)
            for plan in self.plans
        ]
        try:
            self.locations = ray.get(
                [actor.ready.remote() for actor in self.actors], timeout=self.runtime.startup_timeout_s
            )
        except ray.exceptions.GetTimeoutError:
            raise ActorStartupError(
                f"{len(self.actors)} actors were not ready after runtime.startup_timeout_s="
                f"{self.runtime.startup_timeout_s}s (each asks for {options})"
            ) from None
        self.bundle_refs = [None] * len(self.actors)

    def run_round(self, round_idx: int, publish: bool) -> dict[int, dict[str, float]]:
        calls = []
        for actor, plan in zip(self.actors, self.plans, strict=True):
            incoming = [ref for ref in (self.bundle_refs[source] for source in plan.sources) if ref is not None]
            calls.append(actor.run_round.remote(round_idx, publish and plan.publishes, *incoming))
        results = ray.get(calls, timeout=self.runtime.round_timeout_s)
        metrics: dict[int, dict[str, float]] = {}
        for group_metrics, _ in results:
            metrics.update(group_metrics)
        self.bundle_refs = [bundle_ref for _, bundle_ref in results]
        return metrics

    def evaluate(self) -> dict[int, EvalCounts]:
        counts: dict[int, EvalCounts] = {}
        for group_counts in ray.get(
            [actor.evaluate.remote() for actor in self.actors], timeout=self.runtime.round_timeout_s
        ):
            counts.update(group_counts)
        return counts

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
