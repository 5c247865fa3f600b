"""A group of agents stepped in turn inside one process (an actor, or the driver itself).

Agents stay resident for the whole run: each keeps its model, optimizer, RNG and shard, so a
round ships only a round number in and predictions plus metric numbers out. Grouping never
changes results: every agent draws from its own seeded stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from agents.agent import Agent, AgentSpec, ExecutionConfig, PublicData
from agents.inbox import RoundPlan
from agents.messages import EvalCounts, Prediction, check_metrics
from agents.weight_sharing import Mixing, WeightBundle, WeightShare, load_weights, mix, share_weights
from sim.core.atomic import write_then_rename

Bundle = Mapping[int, Prediction]  # sender id -> its prediction on one public batch


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
        plan = plan or RoundPlan.static({i: agent.in_neighbours for i, agent in self.agents.items()}, round_idx)
        inboxes = self.inboxes(round_idx, incoming, plan)
        metrics: dict[int, dict[str, float]] = {}
        for agent_id in self.active(plan):
            metrics[agent_id] = check_metrics(self.agents[agent_id].train_round(round_idx, inboxes[agent_id]))
            metrics[agent_id].update(staleness(round_idx, inboxes[agent_id]))
        outgoing: dict[int, Prediction] = {}
        for agent_id in self.publishers(plan, publish):
            outgoing[agent_id] = self.agents[agent_id].predict(round_idx + 1)
            metrics[agent_id]["comm/message_bytes"] = float(outgoing[agent_id].nbytes)
        return metrics, outgoing

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

    def save(self, directory: str, agent_ids: Iterable[int] | None = None) -> None:
        """Write every agent's (or only `agent_ids`') state to `directory/agent_XXXXX.pt` (write-then-rename)."""
        for agent_id in self.agents if agent_ids is None else agent_ids:
            agent = self.agents[agent_id]
            with write_then_rename(Path(directory) / agent_state_file(agent_id)) as partial:
                torch.save(agent.state_dict(), partial)

    def restore(self, directory: str) -> dict[int, Prediction]:
        """Load every agent's state; returns the predictions they had in flight (the bundle)."""
        for agent_id, agent in self.agents.items():
            state = torch.load(Path(directory) / agent_state_file(agent_id), weights_only=True)
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
