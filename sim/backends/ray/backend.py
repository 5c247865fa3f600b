"""Runs agent groups in Ray actors; predictions travel through the object store.

The driver holds only ObjectRefs: each actor `ray.put`s its outgoing bundle and the driver
passes that reference to the actors hosting the in-neighbours, so prediction bytes move actor
to actor. Resources are checked against the nodes before any actor is created, and a start-up
that does not finish in time raises a named error instead of hanging.

All actors' resources are reserved at once as one placement group (PACK or SPREAD over the
nodes). On a cluster (`runtime.address`) the code travels with the job (sim.backends.ray.cluster.shipped_code),
and with `runtime.shard_source=node` each actor reads its agents' private shards on its own
node (NodeShardGroupActor).

Actors are created with small constructor arguments only and get their agents from a `setup`
call, which the driver issues at start and again to every actor Ray has restarted, before the
checkpoint is restored: a restart never depends on an object kept in the store since start-up.

With `runtime.keep_actors` the actors are kept workers (sim/backends/ray/kept.py): taken from the
previous run where one of the same kind waits idle, outside any placement group (a group dies
with its job), and released instead of killed at the end.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from agents.actor import AgentGroupActor, RemoteAgentGroup, WorkerRestartedError
from agents.agent import AgentSpec, ExecutionConfig, PublicData
from agents.inbox import RoundPlan
from agents.messages import EvalCounts
from agents.weight_sharing import Mixing
from sim.backends.base import (
    Backend,
    GroupPlan,
    ProbeWrite,
    RecoveryFailedError,
    WorkerLostError,
    Workload,
    round_sources,
)
from sim.backends.ray.cluster import SHARD_SOURCES, NodeDataError, PrivateData, read_shards
from sim.backends.ray.connection import RayTarget, connect_ray, shutdown_ray
from sim.backends.ray.kept import KEPT_NAMESPACE, KeptActors, code_digest, evict_idle, kind_key
from sim.backends.ray.placement import Node, Placement, plan_placement
from sim.backends.runtime import RuntimeConfig, execution_config
from sim.backends.storage import StorageDir


class ActorStartupError(RuntimeError):
    """Actors did not become ready within `runtime.startup_timeout_s`."""


class RayBackend(Backend):
    """One Ray actor per group; attaches to `runtime.address` or starts a local Ray."""

    def __init__(self, runtime: RuntimeConfig, placement: Placement, owns_ray: bool, private: PrivateData) -> None:
        self.runtime = runtime
        self.placement = placement
        self.owns_ray = owns_ray  # started Ray itself, so stops it on shutdown
        self.private = private  # where each agent's shard lives, for actors that read their own
        self.actors: list[Any] = []
        self.plans: list[GroupPlan] = []
        self.bundle_refs: list[ray.ObjectRef | None] = []
        self.locations: list[dict[str, Any]] = []  # per actor: node_id, device, pid, set_up (its ready())
        self.restart_counts: list[int] = []  # per actor: restarts found (a new pid)
        self.payloads: list[Any] = []  # per actor: what `setup` builds its agents from
        self.pending_faults: dict[str, set[int]] = {}  # fault point -> actors to die there (sim/backends/faults.py)
        self.node_ips: dict[str, str] = {}  # node id -> IP, for describe()
        self.reservation: PlacementGroup | None = None
        self.kept: KeptActors | None = None  # runtime.keep_actors: this driver's hold on kept workers

    def start(self, plans: Sequence[GroupPlan], public: PublicData) -> None:
        self.plans = list(plans)
        if len(self.plans) != len(self.placement.requests):
            raise ValueError(f"{len(self.plans)} group plans for {len(self.placement.requests)} planned actors")
        self.public = public
        ship = SHARD_SOURCES.get(self.runtime.cluster.shard_source)
        self.payloads, node_reads = [], []
        for plan in self.plans:
            specs, node_shards = ship(plan.specs, self.private)
            self.payloads.append(list(specs) if node_shards is None else (specs, node_shards))
            node_reads.append(node_shards is not None)
        if self.runtime.keep_actors:
            self.actors = self._take_kept_actors(node_reads)
        else:
            if self.runtime.address is not None:  # idle kept workers would hold the resources this run needs
                evict_idle(set(), KeptActors().owner)
            reservation = self._reserve()
            self.actors = [self._create_actor(reservation, index, reads) for index, reads in enumerate(node_reads)]
        self.restart_counts = [0] * len(self.actors)
        self._set_up(self._wait_ready())
        self.node_ips = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        self.bundle_refs = [None] * len(self.actors)

    def _reserve(self) -> PlacementGroup:
        """Reserve every actor's resources at once (a placement group), or raise a named error in time.

        The requests were checked to fit the nodes, so a reservation that does not complete
        means other jobs hold the resources.
        """
        bundles = [request.amounts for request in self.placement.requests]
        self.reservation = reservation = placement_group(bundles, strategy=self.placement.strategy)
        try:
            ray.get(reservation.ready(), timeout=self.runtime.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ActorStartupError(
                f"the cluster did not free the resources of {len(bundles)} actors within runtime.startup_timeout_s="
                f"{self.runtime.startup_timeout_s}s (other jobs hold them; see `ray status`)"
            ) from None
        return reservation

    def _create_actor(self, reservation: PlacementGroup, index: int, reads_shards_on_node: bool) -> Any:
        """The actor of group `index`, in its own bundle of the reservation, still without agents.

        Its constructor gets only the execution settings, so Ray can always re-run it on a
        restart; the agents come with `_set_up`.
        """
        strategy = PlacementGroupSchedulingStrategy(reservation, placement_group_bundle_index=index)
        actor_class = RemoteNodeShardGroup if reads_shards_on_node else RemoteAgentGroup
        return actor_class.options(**self._actor_options(index), scheduling_strategy=strategy).remote(
            self._execution(index)
        )

    def _actor_options(self, index: int) -> dict[str, Any]:
        request = self.placement.requests[index]
        return {
            "num_cpus": request.num_cpus,
            "num_gpus": request.num_gpus,
            "resources": request.custom,
            "max_restarts": self.runtime.max_actor_restarts,  # the driver sets a restarted actor up again
            "max_task_retries": 0,  # a lost call surfaces as WorkerLostError; the loop rolls back
        }

    def _execution(self, index: int) -> ExecutionConfig:
        return execution_config(self.runtime, self.placement.torch_threads[index])  # "cuda" swapped in there

    def _take_kept_actors(self, node_reads: Sequence[bool]) -> list[Any]:
        """Workers for every planned actor: idle kept ones of the same kind first, new kept ones for the rest.

        Kept workers are detached and outside any placement group (a group is removed with the
        job that made it, and its actors with it), so SPREAD is Ray's "SPREAD" scheduling of each
        actor and PACK is Ray's default.
        """
        self.kept = kept = KeptActors()
        digest = code_digest()
        shards = ["node" if reads else "driver" for reads in node_reads]
        kinds = [
            kind_key(request, self._execution(index), shards[index], digest)
            for index, request in enumerate(self.placement.requests)
        ]
        evict_idle(set(kinds), kept.owner)
        try:
            return kept.take(kinds, functools.partial(self._new_kept_actor, node_reads), self.runtime.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ActorStartupError(
                f"new kept workers did not start within runtime.startup_timeout_s={self.runtime.startup_timeout_s}s "
                "(other jobs hold the resources; see `ray status`)"
            ) from None

    def _new_kept_actor(self, node_reads: Sequence[bool], index: int, name: str) -> Any:
        actor_class = RemoteNodeShardGroup if node_reads[index] else RemoteAgentGroup
        options = self._actor_options(index) | {
            "scheduling_strategy": "SPREAD" if self.placement.strategy == "SPREAD" else "DEFAULT",
            "lifetime": "detached",
            "namespace": KEPT_NAMESPACE,
            "name": name,
        }
        return actor_class.options(**options).remote(self._execution(index), self.runtime.kept_idle_s)

    def _set_up(self, indices: Sequence[int]) -> None:
        """Build the agents of actors `indices` from the driver's copy of their data.

        Each call carries objects put into the store just now, so nothing that an actor needs
        can have been freed or lost since the run started (ray-project/ray#53727).
        """
        if not indices:
            return
        if self.kept is not None:  # a restarted kept worker re-ran its constructor: it must be this run's again
            held = self.kept.hold([self.actors[index] for index in indices])
            for index, ours in zip(indices, held, strict=True):
                if not ours:
                    raise RecoveryFailedError(self._lost(index, "its restarted worker was taken by another run"))
        public_ref = ray.put(self.public)  # one copy for every actor set up now; they keep reading it in place
        try:
            self._get([self.actors[index].setup.remote(self.payloads[index], public_ref) for index in indices])
        except NodeDataError as error:  # a node lacks the data its agents need: bad input, named
            node_error = getattr(error, "cause", error)  # Ray raises RayTaskError(NodeDataError) here
            raise node_error.config_error() from None

    def _wait_ready(self) -> list[int]:
        """Block until every actor has run its constructor; returns the indices of those without agents.

        An actor Ray is restarting answers "temporarily unavailable" until its constructor has
        run again, so that answer is retried until runtime.startup_timeout_s. An actor Ray will
        not restart again raises RecoveryFailedError naming its agents.
        """
        deadline = time.monotonic() + self.runtime.startup_timeout_s
        locations = [self._await_ready(index, deadline) for index in range(len(self.actors))]
        for index, (before, now) in enumerate(zip(self.locations, locations, strict=False)):
            if before["pid"] != now["pid"]:
                self.restart_counts[index] += 1
        self.locations = locations
        return [index for index, location in enumerate(locations) if not location["set_up"]]

    def _await_ready(self, index: int, deadline: float) -> dict[str, Any]:
        while True:
            try:
                location: dict[str, Any] = ray.get(
                    self.actors[index].ready.remote(), timeout=max(deadline - time.monotonic(), 0.0)
                )
                return location
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise RecoveryFailedError(self._lost(index, "a restarted worker never became available")) from None
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                raise ActorStartupError(
                    f"{len(self.actors)} actors were not ready after runtime.startup_timeout_s="
                    f"{self.runtime.startup_timeout_s}s"
                ) from None
            except ray.exceptions.ActorDiedError as error:  # dead for good: Ray will not restart it
                raise RecoveryFailedError(self._lost(index, self._death_cause(index, error))) from None

    def _death_cause(self, index: int, error: Exception) -> str:
        if self.locations and self.restart_counts[index] + 1 > self.runtime.max_actor_restarts:
            restarts = self.runtime.max_actor_restarts
            return f"its worker died and Ray had already restarted it runtime.max_actor_restarts={restarts} times"
        return f"its worker died and was not restarted ({str(error).splitlines()[0]})"

    def _lost(self, index: int, cause: str) -> str:
        """'agents 4, 5 (actor 1 on 10.0.0.2): CAUSE', for a one-line error."""
        agents = ", ".join(str(spec.agent_id) for spec in self.plans[index].specs)
        where = f"actor {index}"
        if index < len(self.locations):
            where += f" on {self.node_ips.get(self.locations[index]['node_id'], 'its node')}"
        return f"agents {agents} ({where}) could not be restored: {cause}"

    def run_round(self, round_idx: int, publish: bool, plan: RoundPlan | None = None) -> dict[int, dict[str, float]]:
        self._deliver_faults("train")
        sources = [group.sources for group in self.plans] if plan is None else round_sources(self.plans, plan)
        calls = []
        for index, (actor, group) in enumerate(zip(self.actors, self.plans, strict=True)):
            incoming = [ref for ref in (self.bundle_refs[source] for source in sources[index]) if ref is not None]
            if plan is None:
                calls.append(actor.run_round.remote(round_idx, publish and group.publishes, None, *incoming))
            else:
                group_plan = plan.for_agents(group.agent_ids)  # only its own agents' part travels
                calls.append(actor.run_round.remote(round_idx, publish, group_plan, *incoming))
        results = self._get(calls)
        metrics: dict[int, dict[str, float]] = {}
        for group_metrics, _ in results:
            metrics.update(group_metrics)
        self.bundle_refs = [bundle_ref for _, bundle_ref in results]
        return metrics

    def mix_weights(self, round_idx: int, mixing: Mixing) -> dict[int, int]:
        """Each actor gets references to its agents' senders' shares, routed as predictions are."""
        group_of = {spec.agent_id: index for index, plan in enumerate(self.plans) for spec in plan.specs}
        rows: list[Mixing] = [
            {spec.agent_id: mixing[spec.agent_id] for spec in plan.specs if spec.agent_id in mixing}
            for plan in self.plans
        ]
        sources = [sorted({group_of[sender] for row in group.values() for sender, _ in row}) for group in rows]
        sizes, refs = self._export_weights(sorted(set().union(*sources)), round_idx)
        calls = [
            actor.mix_weights.remote(group_rows, *(refs[source] for source in group_sources))
            for actor, group_rows, group_sources in zip(self.actors, rows, sources, strict=True)
            if group_rows
        ]
        self._get(calls)
        return sizes

    def _export_weights(self, groups: Iterable[int], round_idx: int) -> tuple[dict[int, int], dict[int, Any]]:
        """Bytes of each share of `groups`' agents, and a reference to each group's bundle of shares."""
        indices = list(groups)
        results = self._get([self.actors[index].export_weights.remote(round_idx) for index in indices])
        sizes: dict[int, int] = {}
        refs: dict[int, Any] = {}
        for index, (group_sizes, ref) in zip(indices, results, strict=True):
            sizes.update(group_sizes)
            refs[index] = ref
        return sizes, refs

    def evaluate(self, full: bool) -> dict[int, EvalCounts]:
        self._deliver_faults("evaluate")
        counts: dict[int, EvalCounts] = {}
        for group_counts in self._get([actor.evaluate.remote(full) for actor in self.actors]):
            counts.update(group_counts)
        return counts

    def save(self, directory: StorageDir) -> None:
        self._deliver_faults("save")
        self._get([actor.save.remote(directory) for actor in self.actors])

    def restore(self, directory: StorageDir) -> None:
        self._set_up(self._wait_ready())  # restarted actors: constructor re-run by Ray, agents built here
        self._deliver_faults("restore")
        self.bundle_refs = self._get([actor.restore.remote(directory) for actor in self.actors])

    def probe_storage(self, directory: StorageDir, token: bytes) -> list[ProbeWrite]:
        """Each actor writes from its own node: exactly the nodes whose agents will write checkpoints."""
        names = [f"probe-actor-{index}" for index in range(len(self.actors))]
        answers = self._get(
            [actor.probe_storage.remote(directory, name, token) for actor, name in zip(self.actors, names, strict=True)]
        )
        return [
            ProbeWrite(f"node {node} (actor {index})", name, error)
            for index, (name, (node, error)) in enumerate(zip(names, answers, strict=True))
        ]

    @property
    def worker_restarts(self) -> int:
        return sum(self.restart_counts)

    def arm_fault(self, worker: int, point: str) -> None:
        self.pending_faults.setdefault(point, set()).add(worker)

    def _deliver_faults(self, point: str) -> None:
        """Arm the actors that are to die at `point` of the call about to be made (calls run in order)."""
        workers = sorted(self.pending_faults.pop(point, set()))
        self._get([self.actors[worker].arm.remote(point) for worker in workers])

    def _get(self, calls: list[Any]) -> list[Any]:
        """ray.get with the round timeout; a dead or restarted actor becomes a WorkerLostError."""
        try:
            return ray.get(calls, timeout=self.runtime.round_timeout_s)
        except ray.exceptions.RayActorError as error:  # also ActorDiedError / ActorUnavailableError
            raise WorkerLostError(f"an agent actor died: {type(error).__name__}") from error
        except WorkerRestartedError:  # restarted between two calls: it lost its agents
            raise WorkerLostError("an agent actor was restarted and had lost its agents") from None

    def shutdown(self) -> None:
        if self.kept is not None:
            self.kept.release(self.actors)  # they wait, without agents, for the next run
        else:
            for actor in self.actors:
                ray.kill(actor)
        self.actors = []
        self.bundle_refs = []
        if self.reservation is not None:  # frees the nodes for the next run on a shared cluster
            remove_placement_group(self.reservation)
            self.reservation = None
        if self.owns_ray and ray.is_initialized():
            shutdown_ray()

    def describe(self) -> dict[str, object]:
        return {
            "backend": "ray",
            "actors": len(self.actors),
            "agents_per_actor": [len(plan.specs) for plan in self.plans],
            "nodes": sorted({location["node_id"] for location in self.locations}),
            "node_ips": [self.node_ips.get(location["node_id"], "") for location in self.locations],
            "placement_strategy": self.placement.strategy,
            "shard_source": self.runtime.cluster.shard_source,
            "torch_threads": self.placement.torch_threads,
            "pids": [int(location["pid"]) for location in self.locations],
            "restarts": list(self.restart_counts),
            "devices": [location["device"] for location in self.locations],
            **({"kept_actors": {"reused": self.kept.reused, "created": self.kept.created}} if self.kept else {}),
        }


def create_ray_backend(experiment: Workload) -> tuple[RayBackend, list[list[int]]]:
    """Connect, then plan the experiment's agents onto the nodes; no actor exists until `start`."""
    runtime = experiment.runtime
    started_here = connect_ray(RayTarget.of(runtime))
    try:
        backbones = [spec.model.backbone for spec in experiment.specs]
        placement = plan_placement(backbones, runtime, cluster_nodes())
    except BaseException:
        if started_here:
            shutdown_ray()
        raise
    return RayBackend(runtime, placement, started_here, experiment.private), placement.groups


def nodes_of(runtime: RuntimeConfig) -> list[Node]:
    """The alive nodes of the cluster `runtime` attaches to, asked once (a parallel sweep sizes itself by them)."""
    started = connect_ray(RayTarget.of(runtime))
    try:
        return cluster_nodes()
    finally:
        if started:
            shutdown_ray()


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster with their total resources."""
    return [
        Node(str(node["NodeManagerAddress"]), {str(name): float(amount) for name, amount in node["Resources"].items()})
        for node in ray.nodes()
        if node["Alive"]
    ]


class NodeShardGroupActor(AgentGroupActor):
    """An agent group that reads its agents' private shards on the node it runs on.

    A node that cannot read them (a missing file, other data) raises a NodeDataError from
    `setup`, which the driver turns into a ConfigError naming the node and the path.
    """

    def agent_specs(self, payload: Any) -> Sequence[AgentSpec]:
        specs, shards = payload
        return read_shards(specs, shards, ray.util.get_node_ip_address())


RemoteNodeShardGroup = ray.remote(NodeShardGroupActor)
