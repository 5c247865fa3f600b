"""Runs every agent group in the driver process, one after another."""

from __future__ import annotations

from collections.abc import Sequence

from agents.agent import ExecutionConfig, PublicData
from agents.group import AgentGroup, Bundle
from agents.hosting import build_group
from agents.inbox import RoundPlan
from agents.messages import EvalCounts
from agents.weight_sharing import Mixing, WeightBundle
from sim.backends.base import Backend, GroupPlan, round_sources
from sim.backends.storage import StorageDir


class SerialBackend(Backend):
    """Same groups and routing as the Ray backend, without processes or an object store."""

    def __init__(self, execution: ExecutionConfig) -> None:
        self.execution = execution
        self.groups: list[AgentGroup] = []
        self.plans: list[GroupPlan] = []
        self.bundles: list[Bundle] = []

    def start(self, plans: Sequence[GroupPlan], public: PublicData) -> None:
        self.plans = list(plans)
        self.groups = [build_group(plan.specs, public, self.execution) for plan in self.plans]
        self.bundles = [{} for _ in self.plans]

    def run_round(self, round_idx: int, publish: bool, plan: RoundPlan | None = None) -> dict[int, dict[str, float]]:
        metrics: dict[int, dict[str, float]] = {}
        outgoing: list[Bundle] = []
        sources = [group.sources for group in self.plans] if plan is None else round_sources(self.plans, plan)
        for index, group in enumerate(self.groups):
            incoming = [self.bundles[source] for source in sources[index]]
            if plan is None:
                group_metrics, bundle = group.run_round(round_idx, incoming, publish and self.plans[index].publishes)
            else:
                group_plan = plan.for_agents(self.plans[index].agent_ids)
                group_metrics, bundle = group.run_round(round_idx, incoming, publish, group_plan)
            metrics.update(group_metrics)
            outgoing.append(bundle)
        self.bundles = outgoing
        return metrics

    def mix_weights(self, round_idx: int, mixing: Mixing) -> dict[int, int]:
        shares = [group.export_weights(round_idx) for group in self.groups]  # all, before any mixes
        for group in self.groups:
            group.mix_weights(mixing, shares)
        return share_bytes(shares)

    def evaluate(self, full: bool) -> dict[int, EvalCounts]:
        counts: dict[int, EvalCounts] = {}
        for group in self.groups:
            counts.update(group.evaluate(full))
        return counts

    def save(self, directory: StorageDir) -> None:
        for group in self.groups:
            group.save(directory)

    def restore(self, directory: StorageDir) -> None:
        self.bundles = [group.restore(directory) for group in self.groups]

    def shutdown(self) -> None:
        self.groups = []
        self.bundles = []

    def describe(self) -> dict[str, object]:
        return {"backend": "serial", "workers": len(self.groups), "torch_threads": self.execution.torch_threads}


def share_bytes(bundles: Sequence[WeightBundle]) -> dict[int, int]:
    return {sender: share.nbytes for bundle in bundles for sender, share in bundle.items()}
