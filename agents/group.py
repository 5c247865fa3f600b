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
        self, round_idx: int, incoming: Iterable[Bundle], publish: bool
    ) -> tuple[dict[int, dict[str, float]], dict[int, Prediction]]:
        """Train every agent on round `round_idx`, then predict on the next public batch.

        Args:
            round_idx: the round being trained; its public batch is `round_idx`.
            incoming: bundles of predictions on batch `round_idx` from the groups that host
                in-neighbours of this group's agents (may contain other senders too).
            publish: whether to predict on batch `round_idx + 1` (False when nobody listens).

        Returns:
            (metrics per agent id, outgoing predictions per agent id).
        """
        inboxes = self.inboxes(incoming)
        metrics: dict[int, dict[str, float]] = {}
        for agent_id, agent in self.agents.items():
            metrics[agent_id] = check_metrics(agent.train_round(round_idx, inboxes[agent_id]))
        outgoing: dict[int, Prediction] = {}
        if publish:
            for agent_id, agent in self.agents.items():
                if agent.stopped:  # stopped by its privacy budget (agents/privacy.py)
                    continue
                outgoing[agent_id] = agent.predict(round_idx + 1)
                metrics[agent_id]["comm/message_bytes"] = float(outgoing[agent_id].nbytes)
                metrics[agent_id].update(agent.release_metrics())
        return metrics, outgoing

    def inboxes(self, incoming: Iterable[Bundle]) -> dict[int, list[Prediction]]:
        """Each hosted agent's in-neighbours' predictions, picked out of the incoming bundles."""
        by_sender: dict[int, Prediction] = {}
        for bundle in incoming:
            by_sender.update(bundle)
        return {
            agent_id: [by_sender[sender] for sender in agent.in_neighbours if sender in by_sender]
            for agent_id, agent in self.agents.items()
        }

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


def agent_state_file(agent_id: int) -> str:
    return f"agent_{agent_id:05d}.pt"
