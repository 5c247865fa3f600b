"""A group of agents stepped in turn inside one process (an actor, or the driver itself).

Agents stay resident for the whole run: each keeps its model, optimizer, RNG and shard, so a
round ships only a round number in and predictions plus metric numbers out. Grouping never
changes results: every agent draws from its own seeded stream.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import torch

from agents.agent import Agent, AgentSpec, ExecutionConfig, PublicData
from agents.inbox import RoundPlan
from agents.messages import EvalCounts, Prediction, check_metrics
from agents.weight_sharing import Mixing, WeightBundle, WeightShare, load_weights, mix, share_weights

Bundle = Mapping[int, Prediction]  # sender id -> its prediction on one public batch


class StateDirectory(Protocol):
    """Where a checkpoint's agent files go: a local or shared folder, or a prefix in object storage.

    sim/backends/storage.py's StorageDir is the one the backends pass; it travels to the worker
    as two strings and reaches the storage from the worker's own node. A write is all-or-nothing
    for a reader (write-then-rename, or one whole object).
    """

    def write_bytes(self, name: str, data: bytes) -> None: ...

    def read_bytes(self, name: str) -> bytes: ...


class AgentGroup:
    """Hosts several agents; the unit a backend places on a worker process."""

    def __init__(self, specs: Sequence[AgentSpec], public: PublicData, execution: ExecutionConfig) -> None:
        torch.set_num_threads(execution.torch_threads)
        self.device = torch.device(execution.device)
        # The public and test sets stay as they arrived: on Ray, read-only views of the node's
        # object store, one copy for every actor of the node (agents.agent.shared_tensor).
        self.agents = {spec.agent_id: Agent(spec, public, execution) for spec in specs}

    def run_round(
        self, round_idx: int, incoming: Iterable[Bundle], publish: bool, plan: RoundPlan | None = None
    ) -> tuple[dict[int, dict[str, float]], dict[int, Prediction]]:
        """Train this round's active agents, then let its publishers predict on the next public batch.

        Args:
            round_idx: the round being trained; on-time messages are on public batch `round_idx`.
            incoming: bundles of predictions published in the previous round by the groups that
                host this round's senders (may contain other senders too).
            publish: whether this round publishes at all (False in the last round, or when nobody listens).
            plan: who is active, who publishes and who receives what (agents/inbox.py); None is
                the lock-step plan of the agents' fixed in-neighbours.

        Returns:
            (metrics per active agent id, outgoing predictions per publishing agent id).
        """
        plan = self.round_plan(round_idx, plan)
        inboxes = self.inboxes(round_idx, incoming, plan)
        metrics: dict[int, dict[str, float]] = {}
        for agent_id in self.active(plan):
            metrics[agent_id] = check_metrics(self.agents[agent_id].train_round(round_idx, inboxes[agent_id]))
            metrics[agent_id].update(staleness(round_idx, inboxes[agent_id]))
        outgoing: dict[int, Prediction] = {}
        for agent_id in self.publishers(plan, publish):
            agent = self.agents[agent_id]
            if agent.stopped:  # stopped by its privacy budget (agents/privacy.py)
                continue
            outgoing[agent_id] = agent.predict(round_idx + 1)
            metrics[agent_id]["comm/message_bytes"] = float(outgoing[agent_id].nbytes)
            metrics[agent_id].update(agent.release_metrics())
        return metrics, outgoing

    def round_plan(self, round_idx: int, plan: RoundPlan | None) -> RoundPlan:
        """`plan`, or for a static network the lock-step plan of the agents' fixed in-neighbours."""
        if plan is not None:
            return plan
        return RoundPlan.static({i: agent.in_neighbours for i, agent in self.agents.items()}, round_idx)

    def active(self, plan: RoundPlan) -> list[int]:
        """Hosted agents that train this round, in hosting order."""
        return [agent_id for agent_id in self.agents if agent_id in plan.active]

    def publishers(self, plan: RoundPlan, publish: bool) -> list[int]:
        """Hosted agents that predict on the next public batch this round, in hosting order."""
        return [agent_id for agent_id in self.agents if publish and agent_id in plan.publishers]

    def inboxes(self, round_idx: int, incoming: Iterable[Bundle], plan: RoundPlan) -> dict[int, list[Prediction]]:
        """Deliver the plan's messages out of the incoming bundles; each active agent's usable messages.

        A delivery whose message is not in the bundles (its sender did not publish, or a restore
        re-sent another batch) delivers nothing.
        """
        by_sender: dict[int, Prediction] = {}
        for bundle in incoming:
            by_sender.update(bundle)
        usable: dict[int, list[Prediction]] = {}
        for agent_id in self.active(plan):
            inbox = self.agents[agent_id].inbox
            for delivery in plan.deliveries.get(agent_id, ()):
                message = by_sender.get(delivery.sender)
                if message is not None and message.batch_id == delivery.batch_id:
                    inbox.receive(message, delivery.arrives)
            inbox.open(round_idx)
            usable[agent_id] = inbox.usable(round_idx, plan.max_staleness)
        return usable

    # ---- weight-sharing baselines only (fedavg, gossip): weights cross on purpose -----------

    def export_weights(self, round_idx: int) -> dict[int, WeightShare]:
        """A copy of every hosted agent's weights after round `round_idx` (agents/weight_sharing.py)."""
        return {agent_id: share_weights(agent, round_idx) for agent_id, agent in self.agents.items()}

    def mix_weights(self, mixing: Mixing, incoming: Iterable[WeightBundle]) -> None:
        """Every hosted agent with a row in `mixing` loads the weighted mean of its senders (gossip, FedAvg).

        `incoming` must hold the shares of every sender in those rows (this group's own too);
        every mean is computed before any agent's weights change.
        """
        hosted = [agent_id for agent_id in self.agents if agent_id in mixing]
        for agent_id, tensors in mix(mixing, hosted, incoming).items():
            load_weights(self.agents[agent_id], tensors)

    def evaluate(self, full: bool) -> dict[int, EvalCounts]:
        """Test-set counts per agent id: on the whole test set, or on its evaluation subset."""
        return {agent_id: agent.evaluate(full) for agent_id, agent in self.agents.items()}

    def save(self, directory: StateDirectory, agent_ids: Iterable[int] | None = None) -> None:
        """Write every agent's (or only `agent_ids`') state to `directory` as agent_XXXXX.pt, one whole file each."""
        for agent_id in self.agents if agent_ids is None else agent_ids:
            buffer = io.BytesIO()
            torch.save(self.agents[agent_id].state_dict(), buffer)
            directory.write_bytes(agent_state_file(agent_id), buffer.getvalue())

    def restore(self, directory: StateDirectory) -> dict[int, Prediction]:
        """Load every agent's state; returns the predictions they had in flight (the bundle)."""
        for agent_id, agent in self.agents.items():
            state = torch.load(io.BytesIO(directory.read_bytes(agent_state_file(agent_id))), weights_only=True)
            agent.load_state_dict(state)
        in_flight = {agent_id: agent.last_published for agent_id, agent in self.agents.items()}
        return {agent_id: message for agent_id, message in in_flight.items() if message is not None}


def staleness(round_idx: int, inbox: Iterable[Prediction]) -> dict[str, float]:
    """How old the messages an agent distils from are: 0 for one made at the end of the previous round.

    Reported as a count, sum and max, so the driver can average over every message used.
    """
    ages = [round_idx - message.batch_id for message in inbox]
    if not ages:
        return {}
    return {
        "inbox/messages": float(len(ages)),
        "inbox/staleness_sum": float(sum(ages)),
        "inbox/staleness_max": float(max(ages)),
    }


def agent_state_file(agent_id: int) -> str:
    return f"agent_{agent_id:05d}.pt"
