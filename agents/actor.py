"""The Ray actor that hosts an AgentGroup: the only module under agents/ that imports Ray.

Outgoing predictions are put into the object store by the actor itself, so the driver holds
only a reference and routes it to the actors that need it: prediction bytes move actor to
actor and never through the driver process. The weight-sharing baselines' WeightShares
(agents/weight_sharing.py) travel the same way; for FedAvg one of the actors also plays the server.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import ray

from agents.agent import AgentSpec, ExecutionConfig, PublicData
from agents.group import Bundle
from agents.hosting import build_group
from agents.messages import EvalCounts
from agents.weight_sharing import Mixing, WeightBundle, WeightShare, server_average


class AgentGroupActor:
    """Plain class (testable without Ray); `RemoteAgentGroup` is its ray.remote form."""

    def __init__(self, specs: Sequence[AgentSpec], public: PublicData, execution: ExecutionConfig) -> None:
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so "cuda" is the right one.
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.group = build_group(specs, public, replace(execution, device=device))

    def ready(self) -> dict[str, str]:
        """Answers once construction finished: where this group landed."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "device": str(self.group.device), "pid": str(os.getpid())}

    def run_round(
        self, round_idx: int, publish: bool, *incoming: Bundle
    ) -> tuple[dict[int, dict[str, float]], ray.ObjectRef | None]:
        """Train one round; returns metric numbers and a reference to the outgoing bundle."""
        metrics, outgoing = self.group.run_round(round_idx, incoming, publish)
        return metrics, (ray.put(outgoing) if outgoing else None)

    def evaluate(self) -> dict[int, EvalCounts]:
        return self.group.evaluate()

    # ---- weight-sharing baselines only (fedavg, gossip): weights cross on purpose -----------

    def export_weights(self, round_idx: int) -> tuple[dict[int, int], ray.ObjectRef]:
        """Bytes of each hosted agent's WeightShare, and a reference to the bundle of shares."""
        bundle = self.group.export_weights(round_idx)
        return {agent_id: share.nbytes for agent_id, share in bundle.items()}, ray.put(bundle)

    def mix_weights(self, mixing: Mixing, *incoming: WeightBundle) -> None:
        """Gossip: Ray resolved `incoming` from the references the driver routed here."""
        self.group.mix_weights(mixing, incoming)

    def server_average(self, *bundles: WeightBundle) -> ray.ObjectRef:
        """FedAvg's server, played by this actor: a reference to the shard-size-weighted mean."""
        return ray.put(server_average(bundles))

    def load_average(self, average: WeightShare) -> None:
        self.group.load_average(average)

    def save(self, directory: str) -> None:
        """Agents write their own state to the run directory (never through the driver)."""
        self.group.save(directory)

    def restore(self, directory: str) -> ray.ObjectRef | None:
        """Load agent states; returns a reference to the predictions they had in flight."""
        bundle = self.group.restore(directory)
        return ray.put(bundle) if bundle else None


RemoteAgentGroup = ray.remote(AgentGroupActor)
