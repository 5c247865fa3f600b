"""What an agent holds of its neighbours' messages, and what one round asks of a group.

A static run delivers every message exactly one round after it was made, so an agent could
simply read last round's bundles. A dynamic network (docs/dynamic.md) breaks that: a message
may arrive `d` rounds late, an edge may be down, a sender or a receiver may be offline. The
driver decides all of that from the seed (sim/experiment/schedule.py) and tells each group, in
a `RoundPlan`, which messages of last round's bundles each receiver gets and in which round it
may first use them. The agent keeps them in its `Inbox`: pending until they arrive, then the
newest message per sender, which it distils from (on that message's own public batch) until a
newer one replaces it or it grows older than `max_staleness` rounds.

Only `Prediction`s pass through here; the inbox is part of the agent's own checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from agents.messages import Prediction


@dataclass(frozen=True)
class Delivery:
    """One message a receiver gets out of last round's bundles."""

    sender: int
    batch_id: int  # the message's public batch: published at the end of round batch_id - 1
    arrives: int  # the first round the receiver may use it (batch_id when on time, later when delayed)


@dataclass(frozen=True)
class RoundPlan:
    """Who trains, who publishes and who receives what in one round.

    `deliveries` name messages published at the end of the previous round; a receiver missing
    from it gets nothing this round. Agents missing from `active` neither train, publish nor
    receive (their plan has no deliveries); they keep their weights and inbox unchanged.
    """

    active: frozenset[int]
    publishers: frozenset[int]  # active agents that predict on the next public batch (if the round publishes)
    deliveries: Mapping[int, tuple[Delivery, ...]] = field(default_factory=dict)
    max_staleness: int | None = None  # held messages older than this many rounds are not used; None: no limit

    @classmethod
    def static(cls, in_neighbours: Mapping[int, Iterable[int]], round_idx: int) -> RoundPlan:
        """The lock-step plan of a fixed graph: everyone active and publishing, every message on time."""
        agents = frozenset(in_neighbours)
        deliveries = {
            receiver: tuple(Delivery(sender, round_idx, round_idx) for sender in senders)
            for receiver, senders in in_neighbours.items()
        }
        return cls(agents, agents, deliveries)

    def for_agents(self, agent_ids: Iterable[int]) -> RoundPlan:
        """The part of this plan that concerns `agent_ids` (what one worker needs to see)."""
        ids = frozenset(agent_ids)
        deliveries = {receiver: self.deliveries[receiver] for receiver in ids if receiver in self.deliveries}
        return RoundPlan(self.active & ids, self.publishers & ids, deliveries, self.max_staleness)

    def senders(self, agent_ids: Iterable[int]) -> set[int]:
        """Every agent whose message one of `agent_ids` receives this round (whose bundle must travel)."""
        return {delivery.sender for receiver in agent_ids for delivery in self.deliveries.get(receiver, ())}


class Inbox:
    """Messages in transit to one agent, and the newest message it holds from each sender."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, Prediction]] = []  # (arrival round, message), in arrival order
        self.held: dict[int, Prediction] = {}  # sender -> its newest arrived message

    def receive(self, message: Prediction, arrives: int) -> None:
        """Accept a message that becomes usable in round `arrives`."""
        self.pending.append((arrives, message))

    def open(self, round_idx: int) -> None:
        """Move the messages that have arrived by `round_idx` into `held`; the newest batch per sender wins.

        With drawn delays a later message can overtake an earlier one: the earlier one, arriving
        after it, is then dropped.
        """
        arrived = [message for arrives, message in self.pending if arrives <= round_idx]
        self.pending = [(arrives, message) for arrives, message in self.pending if arrives > round_idx]
        for message in arrived:
            held = self.held.get(message.sender)
            if held is None or message.batch_id > held.batch_id:
                self.held[message.sender] = message

    def usable(self, round_idx: int, max_staleness: int | None) -> list[Prediction]:
        """The held messages, by sender, that are at most `max_staleness` rounds old (`round_idx - batch_id`)."""
        return [
            message
            for _, message in sorted(self.held.items())
            if max_staleness is None or round_idx - message.batch_id <= max_staleness
        ]

    # ---- the agent's own checkpoint ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "pending": [{"arrives": arrives, "message": message_state(message)} for arrives, message in self.pending],
            "held": [message_state(message) for _, message in sorted(self.held.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any], num_classes: int) -> None:
        self.pending = [
            (int(item["arrives"]), message_from_state(item["message"], num_classes)) for item in state["pending"]
        ]
        held = [message_from_state(item, num_classes) for item in state["held"]]
        self.held = {message.sender: message for message in held}


def message_state(message: Prediction) -> dict[str, Any]:
    """A Prediction as tensors and numbers, so a checkpoint loads with torch.load(weights_only=True)."""
    return {
        "sender": message.sender,
        "batch_id": message.batch_id,
        "codec": message.codec,
        "payload": {name: torch.from_numpy(array.copy()) for name, array in message.payload.items()},
        "embeddings": None if message.embeddings is None else torch.from_numpy(message.embeddings.copy()),
    }


def message_from_state(state: Mapping[str, Any], num_classes: int) -> Prediction:
    embeddings = state["embeddings"]
    return Prediction(
        int(state["sender"]),
        int(state["batch_id"]),
        str(state["codec"]),
        num_classes,
        {name: array.numpy() for name, array in state["payload"].items()},
        None if embeddings is None else embeddings.numpy(),
    )
