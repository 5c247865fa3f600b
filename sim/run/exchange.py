"""What agents send each other after a round's local training: one registered step per kind.

    none         isolated, central: nothing
    predictions  mhd, mean_teacher: logits on the next public batch, on every graph edge, in
                 every round but the last (the round loop delivers them in the next round)
    fedavg       shares WEIGHTS: every agent uploads its weights to a server, which averages them
                 weighted by shard size; every agent downloads the average (a star: 2 links per agent).
                 Simulated as mixing rows that are all that average (sim/experiment/mixing.py)
    gossip       shares WEIGHTS: every agent sends its weights on each out-edge of the graph and
                 replaces its own by the mixing-weighted mean of its own and its in-neighbours'

A method names its kind in `MethodPlan.exchange`. Each kind also says which links carry one
message in a round, so that bytes per edge mean the same for every method: one message's size.
Every kind follows the run's network schedule (sim/experiment/schedule.py, docs/dynamic.md):
predictions travel on the round's live edges from its active agents, FedAvg averages the
round's active agents only (client sampling; the others keep their weights), gossip mixes
active agents with their active neighbours on the round's graph, and all of them exchange
only every `comm_every` rounds.
Bytes count the payload arrays only (float32 weights: 4 bytes a value); the weight-sharing
baselines' shared starting point (agent 0's initial weights, as a server or a common seed
would give) is not counted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import networkx as nx

from agents.weight_sharing import INITIAL_ROUND
from sim.backends.base import Backend
from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.experiment.mixing import MIXING_RULES, shard_weighted_mean
from sim.reporting.metrics import round_bytes

if TYPE_CHECKING:
    from sim.experiment.assembly import Experiment

RoundMetrics = Mapping[int, Mapping[str, float]]


class Exchange(ABC):
    """One method's communication step; built once per run from the experiment."""

    def start(self, backend: Backend) -> None:
        """Once before round 0 of a fresh run (a resumed run's agents already hold their state)."""
        del backend  # nothing to prepare unless a kind says otherwise

    def publishes(self, round_idx: int) -> bool:
        """Whether agents predict on the next public batch at the end of round `round_idx`."""
        del round_idx
        return False

    @abstractmethod
    def after_training(self, backend: Backend, round_idx: int, metrics: RoundMetrics) -> int:
        """This round's exchange, once every agent trained; returns the bytes put on links."""

    @abstractmethod
    def link_rounds(self) -> int:
        """Links that carry one message, summed over the run's rounds (bytes per edge divides by it)."""

    def links(self, round_idx: int) -> list[tuple[int, int, int]]:
        """(sender, receiver, delay) of the agent-to-agent messages of `round_idx` (network.jsonl)."""
        del round_idx
        return []


EXCHANGES: Registry[Callable[[Experiment], Exchange]] = Registry("method exchange")


@EXCHANGES.register("none")
class NoExchange(Exchange):
    def __init__(self, experiment: Experiment) -> None:
        del experiment

    def after_training(self, backend: Backend, round_idx: int, metrics: RoundMetrics) -> int:
        return 0

    def link_rounds(self) -> int:
        return 0


@EXCHANGES.register("predictions")
class PredictionExchange(Exchange):
    """Predictions travel as the backend routes them; here they are only counted."""

    def __init__(self, experiment: Experiment) -> None:
        self.rounds = experiment.settings.rounds
        self.schedule = experiment.settings.schedule
        self.edges = experiment.graph.number_of_edges()
        self.out_degree = dict(experiment.graph.out_degree())  # messages each agent puts on edges per round

    def publishes(self, round_idx: int) -> bool:
        # nobody trains on a prediction made after the last round
        return round_idx < self.rounds - 1 and self.schedule.communicates(round_idx)

    def links(self, round_idx: int) -> list[tuple[int, int, int]]:
        return self.schedule.sends(round_idx) if self.publishes(round_idx) else []

    def after_training(self, backend: Backend, round_idx: int, metrics: RoundMetrics) -> int:
        if self.schedule.static:
            return round_bytes(metrics, self.out_degree)
        return round_bytes(metrics, Counter(sender for sender, _, _ in self.links(round_idx)))

    def link_rounds(self) -> int:
        if self.schedule.static:
            return self.edges * (self.rounds - 1)
        return sum(len(self.links(round_idx)) for round_idx in range(self.rounds))


class WeightExchange(Exchange):
    """Shared by the weight-sharing baselines: one architecture, one starting point."""

    def __init__(self, experiment: Experiment) -> None:
        models = {spec.model for spec in experiment.specs}
        if len(models) > 1:
            raise ConfigError(
                "backbone",
                sorted({model.backbone for model in models}),
                f"one architecture for every agent: method={experiment.settings.method_name} averages weights "
                "tensor by tensor",
            )
        self.agents = [spec.agent_id for spec in experiment.specs]
        self.rounds = experiment.settings.rounds
        self.schedule = experiment.settings.schedule

    def start(self, backend: Backend) -> None:
        """Every agent starts from agent 0's initial weights, as FedAvg and D-PSGD assume."""
        backend.mix_weights(INITIAL_ROUND, {agent: ((0, 1.0),) for agent in self.agents})


@EXCHANGES.register("fedavg")
class FedAvgExchange(WeightExchange):
    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        self.shard_sizes = {spec.agent_id: len(spec.private_y) for spec in experiment.specs}
        self.mixing = shard_weighted_mean(self.shard_sizes)

    def clients(self, round_idx: int) -> list[int]:
        """The agents that take part in this round's average: the active ones, in rounds that communicate."""
        if not self.schedule.communicates(round_idx):
            return []
        return sorted(self.schedule.active(round_idx))

    def after_training(self, backend: Backend, round_idx: int, metrics: RoundMetrics) -> int:
        if self.schedule.static:
            mixing = self.mixing
        else:  # client sampling: the shard-weighted mean of the active agents, loaded by them alone
            mixing = shard_weighted_mean({agent: self.shard_sizes[agent] for agent in self.clients(round_idx)})
        if not mixing:
            return 0
        uploads = backend.mix_weights(round_idx, mixing)
        return 2 * sum(uploads[agent] for agent in mixing)  # each upload, and its download of an equal-sized average

    def link_rounds(self) -> int:
        if self.schedule.static:
            return 2 * len(self.agents) * self.rounds
        return 2 * sum(len(self.clients(round_idx)) for round_idx in range(self.rounds))


@EXCHANGES.register("gossip")
class GossipExchange(WeightExchange):
    def __init__(self, experiment: Experiment) -> None:
        super().__init__(experiment)
        assert experiment.settings.method.mixing is not None  # the gossip builder always sets one
        self.rule = MIXING_RULES.get(experiment.settings.method.mixing)
        self.mixing = self.rule(experiment.graph)
        self.edges = experiment.graph.number_of_edges()
        self.out_degree = dict(experiment.graph.out_degree())

    def round_graph(self, round_idx: int) -> nx.DiGraph:
        """The round's live edges between its active agents (empty in rounds that do not communicate)."""
        if not self.schedule.communicates(round_idx):
            return nx.DiGraph()
        return self.schedule.graph(round_idx).subgraph(self.schedule.active(round_idx))

    def links(self, round_idx: int) -> list[tuple[int, int, int]]:
        return [(u, v, 0) for u, v in sorted(self.round_graph(round_idx).edges())]

    def after_training(self, backend: Backend, round_idx: int, metrics: RoundMetrics) -> int:
        if self.schedule.static:
            sizes = backend.mix_weights(round_idx, self.mixing)
            return sum(sizes[agent] * degree for agent, degree in self.out_degree.items())
        graph = self.round_graph(round_idx)
        if graph.number_of_nodes() == 0:
            return 0
        sizes = backend.mix_weights(round_idx, self.rule(graph))  # rows for the active agents only
        return sum(sizes[agent] * degree for agent, degree in graph.out_degree())

    def link_rounds(self) -> int:
        if self.schedule.static:
            return self.edges * self.rounds
        return sum(self.round_graph(round_idx).number_of_edges() for round_idx in range(self.rounds))


def build_exchange(experiment: Experiment) -> Exchange:
    """The exchange step of the experiment's method."""
    return EXCHANGES.get(experiment.settings.method.exchange)(experiment)
