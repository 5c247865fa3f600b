"""The engine boundary: the round loop talks only to this small interface.

Ray appears only in `ray/backend.py`; the serial backend runs the very same AgentGroup code in
the driver process (debugging, unit tests, the raw baseline of benchmarks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agents.agent import AgentSpec, PublicData
from agents.inbox import RoundPlan
from agents.messages import EvalCounts
from agents.weight_sharing import Mixing
from sim.backends.storage import StorageDir

if TYPE_CHECKING:
    from sim.backends.ray.cluster import PrivateData
    from sim.backends.runtime import RuntimeConfig


class WorkerLostError(RuntimeError):
    """A worker process died mid-call; its agents must be restored from a checkpoint."""


class RecoveryFailedError(RuntimeError):
    """Lost agents cannot be brought back in this run; the message names them and the cause.

    The run stops with its checkpoints kept, so `resume=RUN_DIR` continues it once the cause
    (for example too few `runtime.max_actor_restarts`, or a node without the data) is fixed.
    """


class Workload(Protocol):
    """What a backend needs of an experiment to place and start it.

    `sim.experiment.assembly.Experiment` is one (its `runtime` and `num_agents` are its
    settings'); the backends name this protocol instead, so they sit below the experiment
    layer (docs/design.md#layers).
    """

    @property
    def runtime(self) -> RuntimeConfig: ...

    @property
    def num_agents(self) -> int: ...

    @property
    def specs(self) -> list[AgentSpec]: ...

    @property
    def private(self) -> PrivateData: ...


@dataclass(frozen=True)
class GroupPlan:
    """One worker's share of the population and whose predictions it needs."""

    specs: list[AgentSpec]  # the agents this worker hosts (each with its own shard)
    sources: list[int]  # indices of the groups whose bundles carry this group's in-neighbours (lock-step)
    publishes: bool  # whether any agent here has an out-neighbour (lock-step)

    @property
    def agent_ids(self) -> list[int]:
        return [spec.agent_id for spec in self.specs]


def round_sources(plans: Sequence[GroupPlan], plan: RoundPlan) -> list[list[int]]:
    """Per group, the groups whose last bundles carry a message its agents receive this round.

    The per-round form of `GroupPlan.sources`, for a network that changes between rounds.
    """
    group_of = {agent_id: index for index, group in enumerate(plans) for agent_id in group.agent_ids}
    return [sorted({group_of[sender] for sender in plan.senders(group.agent_ids)}) for group in plans]


@dataclass(frozen=True)
class ProbeWrite:
    """One worker's write of the storage probe."""

    where: str  # the worker, for a message: "node 10.0.0.3 (actor 1)"
    name: str  # the file it wrote, in the probe's directory
    error: str | None  # why the write failed; None if it succeeded


class Backend(ABC):
    """Hosts agent groups and moves predictions between them, one synchronous round at a time."""

    @abstractmethod
    def start(self, plans: Sequence[GroupPlan], public: PublicData) -> None:
        """Create the workers; returns when every agent is resident and ready."""

    @abstractmethod
    def run_round(self, round_idx: int, publish: bool, plan: RoundPlan | None = None) -> dict[int, dict[str, float]]:
        """Train the agents on round `round_idx`; metrics per agent id that trained.

        Without a `plan` (lock-step): every agent trains, and predictions published in round r
        are delivered to the in-neighbours in round r + 1. A plan (sim/experiment/schedule.py)
        names the round's active agents, publishers and deliveries instead; each group then gets
        the bundles of the groups whose messages it receives this round.
        `publish=False` skips predicting (the last round, or a method without messages).
        """

    # The weight-sharing baselines (method=fedavg, gossip) only: this moves WEIGHTS between agents.

    @abstractmethod
    def mix_weights(self, round_idx: int, mixing: Mixing) -> dict[int, int]:
        """Every agent in `mixing` loads the weighted mean of its row's senders' weights.

        The one way weights cross agents: gossip's rows name in-neighbours; FedAvg's rows are
        all the same (every agent, weighted by shard size), and each worker computes a row it
        sees more than once only once. All agents' weights after round `round_idx` are taken
        before any agent's change. Returns the bytes of each sender's share.
        """

    @abstractmethod
    def evaluate(self, full: bool) -> dict[int, EvalCounts]:
        """Test-set counts per agent id, on the whole test set or on its evaluation subset (PublicData.eval_rows)."""

    @abstractmethod
    def save(self, directory: StorageDir) -> None:
        """Every agent writes its own state into `directory`, from the worker that hosts it."""

    @abstractmethod
    def restore(self, directory: StorageDir) -> None:
        """Every agent loads its state from `directory`; in-flight predictions are re-sent.

        Waits for restarted workers and builds their agents again first, so it is also the
        recovery step after a WorkerLostError. Raises WorkerLostError if a worker dies
        meanwhile, RecoveryFailedError if a worker cannot be brought back.
        """

    def probe_storage(self, directory: StorageDir, token: bytes) -> list[ProbeWrite]:
        """Every worker writes `token` into `directory`, each under its own name (sim/run/storage.py reads them back).

        Workers in the driver's process share its view of the storage: the driver writes for them.
        """
        name = "probe-driver"
        try:
            directory.write_bytes(name, token)
        except Exception as error:  # any reason the storage refuses: named in one line by the caller
            return [ProbeWrite("the driver", name, f"{type(error).__name__}: {' '.join(str(error).split())}")]
        return [ProbeWrite("the driver", name, None)]

    @property
    def worker_restarts(self) -> int:
        """Worker processes found restarted so far in this run (each one a worker that died)."""
        return 0

    def arm_fault(self, worker: int, point: str) -> None:
        """Fault injection (sim/backends/faults.py): worker `worker` dies at `point` of its next such call."""
        raise NotImplementedError(f"{type(self).__name__} has no worker processes to kill")

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers; safe to call twice or after a failed start."""

    def describe(self) -> dict[str, object]:
        """Facts about where agents run, for the summary."""
        return {}
