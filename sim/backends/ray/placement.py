"""Which agents share a worker process, what each worker asks the cluster for, and whether the
cluster can ever give it.

Agents share workers by *kind*: every backbone with its own entry in
`runtime.backbone_resources` is a kind of its own (a large backbone may take a whole GPU where a
small one takes a quarter), and the backbones without one form a single kind that asks for the
runtime-wide `num_cpus_per_actor`, `num_gpus_per_actor` and custom `resources` (with
`runtime.vectorize`, each backbone is its own kind: one vmapped model per worker). So a mixed
population of four backbones runs on two cores without any setting. A kind's agents are spread
in contiguous, near-equal blocks, so neighbours in a ring mostly share a worker. Default count:
workers are added one at a time, to the kind with the most agents per worker, while one more
still fits on some node; on one machine with one kind that is one worker per CPU core (or per
GPU slot).

Requests are packed onto the nodes' own totals, not the cluster's sum: two nodes with one CPU
each cannot host a two-CPU worker, and Ray would wait forever without a word. So a request no
node can hold is a ConfigError here, before any actor exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sim.backends.runtime import RuntimeConfig
from sim.core.errors import ConfigError

NODES_SHOWN = 4
"""Nodes listed in a placement error; a large cluster is summarised after these."""


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster, as placement sees it."""

    address: str  # IP, for messages
    resources: dict[str, float] = field(hash=False)  # total of each Ray resource (CPU, GPU, custom)


@dataclass(frozen=True)
class ActorRequest:
    """What one worker asks Ray for, and which config key set each amount (named in errors)."""

    amounts: dict[str, float] = field(hash=False)  # Ray resource -> amount: CPU, GPU, custom (zeros left out)
    keys: dict[str, str] = field(hash=False)  # Ray resource -> config key

    @property
    def num_cpus(self) -> float:
        return self.amounts.get("CPU", 0.0)

    @property
    def num_gpus(self) -> float:
        return self.amounts.get("GPU", 0.0)

    @property
    def custom(self) -> dict[str, float]:
        return {name: amount for name, amount in self.amounts.items() if name not in ("CPU", "GPU")}


@dataclass(frozen=True)
class Placement:
    groups: list[list[int]]  # agent ids hosted by each worker
    requests: list[ActorRequest]  # what each worker asks for (same order)
    torch_threads: list[int]  # intra-op threads of each worker (same order)
    strategy: str  # Ray placement-group strategy: PACK or SPREAD


def actor_request(runtime: RuntimeConfig, backbone: str) -> ActorRequest:
    """The request of a worker hosting `backbone` agents: its backbone_resources entry over the runtime-wide one.

    A backbone without an entry (or SHARED_KIND) gets the runtime-wide request.
    """
    amounts = {"CPU": runtime.num_cpus_per_actor, "GPU": runtime.num_gpus_per_actor, **runtime.cluster.resources}
    keys = {"CPU": "runtime.num_cpus_per_actor", "GPU": "runtime.num_gpus_per_actor"}
    keys |= {name: f"runtime.resources.{name}" for name in runtime.cluster.resources}
    override = runtime.cluster.backbone_resources.get(backbone, {})
    prefix = f"runtime.backbone_resources.{backbone}"
    for name, amount in override.items():
        amounts[name] = amount
        keys[name] = {"CPU": f"{prefix}.num_cpus", "GPU": f"{prefix}.num_gpus"}.get(name, f"{prefix}.resources.{name}")
    return ActorRequest({name: amount for name, amount in amounts.items() if amount > 0}, keys)


def plan_placement(backbones: Sequence[str], runtime: RuntimeConfig, nodes: Sequence[Node]) -> Placement:
    """Groups agents (agent i has backbone `backbones[i]`) into workers whose requests fit on `nodes`.

    Raises:
        ConfigError: naming the key of the first request the nodes cannot hold.
    """
    if runtime.num_cpus_per_actor <= 0:
        raise ConfigError("runtime.num_cpus_per_actor", runtime.num_cpus_per_actor, "a number > 0")
    if runtime.num_gpus_per_actor < 0:
        raise ConfigError("runtime.num_gpus_per_actor", runtime.num_gpus_per_actor, "a number >= 0")
    if runtime.agents_per_actor is not None and runtime.agents_per_actor < 1:
        raise ConfigError("runtime.agents_per_actor", runtime.agents_per_actor, "an integer >= 1 or null")
    members: dict[str, list[int]] = {}
    names: dict[str, dict[str, None]] = {}  # kind -> its backbones, for messages
    for agent_id, backbone in enumerate(backbones):
        kind = _worker_kind(backbone, runtime)
        members.setdefault(kind, []).append(agent_id)
        names.setdefault(kind, {})[backbone] = None
    requests = {kind: actor_request(runtime, kind) for kind in members}
    described = {kind: "/".join(names[kind]) for kind in members}
    packing = _Packing(nodes)
    if runtime.agents_per_actor is not None:
        counts = {kind: math.ceil(len(ids) / runtime.agents_per_actor) for kind, ids in members.items()}
        for kind, count in counts.items():
            for _ in range(count):
                packing.place_or_fail(requests[kind], f"{count} actors for {described[kind]} agents")
    else:
        counts = _fill(members, requests, packing, described)
    groups, group_requests, threads = [], [], []
    for kind, ids in members.items():
        for block in np.array_split(np.array(ids), counts[kind]):
            groups.append(block.tolist())
            group_requests.append(requests[kind])
            threads.append(runtime.torch_threads or max(1, math.floor(requests[kind].num_cpus)))
    return Placement(groups, group_requests, threads, runtime.cluster.placement_strategy)


SHARED_KIND = ""
"""The worker kind of every backbone without its own resources (actor_request("") is the runtime-wide one)."""


def _worker_kind(backbone: str, runtime: RuntimeConfig) -> str:
    """Which workers may host a `backbone` agent: its own if it asks for its own resources or is vmapped."""
    return backbone if runtime.vectorize or backbone in runtime.cluster.backbone_resources else SHARED_KIND


def _fill(
    members: dict[str, list[int]], requests: dict[str, ActorRequest], packing: _Packing, described: dict[str, str]
) -> dict[str, int]:
    """Actors per kind: one each, then one more at a time to the most crowded kind while it fits."""
    counts = {}
    for kind in members:
        packing.place_or_fail(requests[kind], f"actors for every kind of worker ({', '.join(described.values())})")
        counts[kind] = 1
    growing = [kind for kind in members if counts[kind] < len(members[kind])]
    while growing:
        kind = max(growing, key=lambda name: len(members[name]) / counts[name])  # ties: the first listed
        if packing.place(requests[kind]):
            counts[kind] += 1
            if counts[kind] < len(members[kind]):
                continue
        growing.remove(kind)
    return counts


class _Packing:
    """Actors assigned first-fit to nodes: proof that the requests fit together, node by node."""

    SLACK = 1e-9  # fractional requests summed in floating point

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = nodes
        self.free = [dict(node.resources) for node in nodes]
        self.placed = 0

    def place(self, request: ActorRequest) -> bool:
        for free in self.free:
            if all(free.get(name, 0.0) + self.SLACK >= amount for name, amount in request.amounts.items()):
                for name, amount in request.amounts.items():
                    free[name] -= amount
                self.placed += 1
                return True
        return False

    def place_or_fail(self, request: ActorRequest, what: str) -> None:
        if not self.place(request):
            raise self._unfit(request, what)

    def _unfit(self, request: ActorRequest, what: str) -> ConfigError:
        """The error for a request that does not fit: its first resource no node has enough of."""
        for name, amount in request.amounts.items():
            most = max((node.resources.get(name, 0.0) for node in self.nodes), default=0.0)
            if most == 0 and name in request.custom:
                return ConfigError(
                    request.keys[name],
                    amount,
                    f"a resource some node has: start nodes with ray start --resources='{{\"{name}\": N}}'",
                )
            if most + self.SLACK < amount:
                return ConfigError(
                    request.keys[name],
                    amount,
                    f"at most {most:g}: no node has more {name} ({self._describe(name)})",
                )
        name = min(request.amounts, key=lambda resource: max(free.get(resource, 0.0) for free in self.free))
        return ConfigError(
            request.keys[name],
            request.amounts[name],
            f"{what} do not fit: {self.placed} actors took the nodes' {name} ({self._describe(name)}); "
            "lower it (fractions allowed) or raise runtime.agents_per_actor",
        )

    def _describe(self, resource: str) -> str:
        parts = [f"{node.address}: {node.resources.get(resource, 0.0):g}" for node in self.nodes[:NODES_SHOWN]]
        more = f", ... {len(self.nodes) - NODES_SHOWN} more" if len(self.nodes) > NODES_SHOWN else ""
        return f"{resource} per node: {', '.join(parts)}{more}" if parts else "the cluster has no nodes"


def requests_fit(requests: Sequence[ActorRequest], nodes: Sequence[Node]) -> bool:
    """Whether all of `requests` fit on `nodes` at once (first fit, node by node; e.g. several sweep jobs' actors)."""
    packing = _Packing(nodes)
    return all(packing.place(request) for request in requests)
