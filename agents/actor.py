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


class AgentGroupActor:
    """Plain class (testable without Ray); `RemoteAgentGroup` is its ray.remote form."""

    def __init__(self, execution: ExecutionConfig) -> None:
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so "cuda" is the right one.
        self.execution = replace(execution, device="cuda" if ray.get_gpu_ids() else "cpu")
        self._group: AgentGroup | None = None
        self.armed = ArmedFaults()  # fault injection (a test tool): where this process kills itself

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
