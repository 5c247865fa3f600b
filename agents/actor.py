"""The Ray actor that hosts an AgentGroup: the only module under agents/ that imports Ray.

Outgoing predictions are put into the object store by the actor itself, so the driver holds
only a reference and routes it to the actors that need it: prediction bytes move actor to
actor and never through the driver process. The weight-sharing baselines' WeightShares
(agents/weight_sharing.py) travel the same way; for FedAvg one of the actors also plays the server.

Restarts. The constructor takes only small values (the execution settings), and the agents
arrive through `setup`, which the driver calls once at start and again on every actor that Ray
has restarted. Ray re-runs a restarted actor's constructor with the arguments it was created
with, and an argument that lived in the object store may be gone by then (ray-project/ray#53727);
a constructor without such arguments can always be re-run. See docs/reliability.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray

from agents.agent import AgentSpec, ExecutionConfig, PublicData
from agents.faults import ArmedFaults
from agents.group import AgentGroup, Bundle, StateDirectory
from agents.hosting import build_group
from agents.inbox import RoundPlan
from agents.messages import EvalCounts
from agents.weight_sharing import Mixing, WeightBundle


class WorkerRestartedError(RuntimeError):
    """This worker process was restarted by Ray and hosts no agents until the driver sets it up again."""


Owner = tuple[str, list[ray.ObjectRef]]
"""A driver holding a kept actor: its run's token, and (wrapped in a list, so that Ray passes the
reference instead of its value) an object that driver owns. Ray raises OwnerDiedError on reading
an object whose owner has died, which is how a kept actor learns that its driver is gone."""

OWNER_CHECK_TIMEOUT_S = 5.0
"""A live owner answers in milliseconds; one that does not answer in time is taken to be alive."""

UNCLAIMED_GRACE_S = 30.0
"""A new kept actor is visible by name before the driver that created it acquires it (right after
its constructor): for this long, another driver may not take it over to evict it."""


def owner_alive(owner: Owner) -> bool:
    """Whether the driver of `owner` is still running (its object can still be read)."""
    try:
        ray.get(owner[1][0], timeout=OWNER_CHECK_TIMEOUT_S)
    except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
        return False
    except ray.exceptions.GetTimeoutError:
        return True
    return True


class Lease:
    """Which driver may use a kept actor: one at a time, and none once the actor has retired.

    A driver that dies without releasing leaves its token behind; the next `acquire` finds that
    driver dead and takes over. Calls come from the actor's method thread and its reaper thread,
    hence the lock.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: Owner | None = None
        self.idle_since = self.born = time.monotonic()
        self.claimed = False  # held by some driver since this process started
        self.retired = False

    def acquire(self, owner: Owner, evicting: bool = False) -> bool:
        """`evicting`: taken over only to be killed, which a worker its creator has not yet claimed refuses."""
        with self.lock:
            if self.retired:
                return False
            if evicting and not self.claimed and time.monotonic() - self.born < UNCLAIMED_GRACE_S:
                return False
            held_by_other = self.owner is not None and self.owner[0] != owner[0]
            if held_by_other and owner_alive(self.owner):  # type: ignore[arg-type]
                return False
            self.owner = owner
            self.claimed = True
            return True

    def release(self) -> None:
        with self.lock:
            self.owner = None
            self.idle_since = time.monotonic()

    def retire_if_idle(self, idle_s: float) -> bool:
        """True (and no acquire succeeds from then on) if nobody has held it for `idle_s` seconds."""
        with self.lock:
            if self.owner is None and time.monotonic() - self.idle_since >= idle_s:
                self.retired = True
            return self.retired


class AgentGroupActor:
    """Plain class (testable without Ray); `RemoteAgentGroup` is its ray.remote form."""

    def __init__(self, execution: ExecutionConfig, idle_exit_s: float | None = None) -> None:
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so "cuda" is the right one.
        self.execution = replace(execution, device="cuda" if ray.get_gpu_ids() else "cpu")
        self._group: AgentGroup | None = None
        self.armed = ArmedFaults()  # fault injection (a test tool): where this process kills itself
        self.lease = Lease()  # used only by a kept actor (idle_exit_s set)
        if idle_exit_s is not None:
            reaper = threading.Thread(target=self._exit_when_idle, args=(idle_exit_s,), name="kept-reaper", daemon=True)
            reaper.start()

    def _exit_when_idle(self, idle_s: float) -> None:
        """A kept actor ends itself (never restarted) once no run has held it for `idle_s` seconds."""
        while not self.lease.retire_if_idle(idle_s):
            time.sleep(min(idle_s, 5.0) / 2)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def acquire(self, owner: Owner, evicting: bool = False) -> bool:
        """A kept actor: True if it is now `owner`'s (it was free, already theirs, or its driver had died).

        A new owner finds no agents: those of a driver that died without releasing them never
        serve the next run (its `setup` builds that run's own). `evicting`: see Lease.acquire.
        """
        previous = self.lease.owner
        if not self.lease.acquire(owner, evicting):
            return False
        if previous is None or previous[0] != owner[0]:
            self._group = None
        return True

    def release(self) -> None:
        """A kept actor after its run: its agents are dropped (their memory freed) and it waits for the next run."""
        self._group = None
        self.lease.release()

    def setup(self, payload: Any, public: PublicData) -> None:
        """Build the agents from scratch (at start, and after a restart before their state is restored)."""
        self._group = build_group(self.agent_specs(payload), public, self.execution)

    def agent_specs(self, payload: Any) -> Sequence[AgentSpec]:
        """The specs in `payload`: here the specs themselves, with their shards."""
        return list(payload)

    @property
    def group(self) -> AgentGroup:
        if self._group is None:
            raise WorkerRestartedError(f"worker process {os.getpid()} was restarted and has not been set up")
        return self._group

    def ready(self) -> dict[str, Any]:
        """Answers once the constructor has run: where this process is, and whether it hosts agents."""
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "device": self.execution.device,
            "pid": os.getpid(),
            "set_up": self._group is not None,
        }

    def arm(self, point: str) -> None:
        """Fault injection: die at `point` of the next such call (agents/faults.py)."""
        self.armed.arm(point)

    def run_round(
        self, round_idx: int, publish: bool, plan: RoundPlan | None, *incoming: Bundle
    ) -> tuple[dict[int, dict[str, float]], ray.ObjectRef | None]:
        """Train one round as `plan` says (None: lock-step); metric numbers and a reference to the outgoing bundle."""
        metrics, outgoing = self.group.run_round(round_idx, incoming, publish, plan)
        self.armed.die_if_armed("train")
        return metrics, (ray.put(outgoing) if outgoing else None)

    def evaluate(self, full: bool) -> dict[int, EvalCounts]:
        counts = self.group.evaluate(full)
        self.armed.die_if_armed("evaluate")
        return counts

    # ---- weight-sharing baselines only (fedavg, gossip): weights cross on purpose -----------

    def export_weights(self, round_idx: int) -> tuple[dict[int, int], ray.ObjectRef]:
        """Bytes of each hosted agent's WeightShare, and a reference to the bundle of shares."""
        bundle = self.group.export_weights(round_idx)
        return {agent_id: share.nbytes for agent_id, share in bundle.items()}, ray.put(bundle)

    def mix_weights(self, mixing: Mixing, *incoming: WeightBundle) -> None:
        """Ray resolved `incoming` from the references the driver routed here."""
        self.group.mix_weights(mixing, incoming)

    def save(self, directory: StateDirectory) -> None:
        """Agents write their own state to storage from this node (never through the driver)."""
        if "save" in self.armed:  # die mid-checkpoint: one file written, the rest not
            self.group.save(directory, agent_ids=list(self.group.agents)[:1])
            self.armed.die_if_armed("save")
        self.group.save(directory)

    def restore(self, directory: StateDirectory) -> ray.ObjectRef | None:
        """Load agent states; returns a reference to the predictions they had in flight."""
        bundle = self.group.restore(directory)
        self.armed.die_if_armed("restore")
        return ray.put(bundle) if bundle else None

    def probe_storage(self, directory: StateDirectory, name: str, token: bytes) -> tuple[str, str | None]:
        """Write `token` as `name` for the driver to read back: (this node's IP, the error if the write failed)."""
        node = ray.util.get_node_ip_address()
        try:
            directory.write_bytes(name, token)
        except Exception as error:  # any reason the storage refuses this node: named in one line by the driver
            return node, f"{type(error).__name__}: {' '.join(str(error).split())}"
        return node, None


RemoteAgentGroup = ray.remote(AgentGroupActor)
