"""The network of every round: live edges, active agents, message delays (docs/dynamic.md).

A `NetworkSchedule` is a pure function of (config, seed, round): every draw comes from a
stream derived from the root seed and the round, never from the agents' streams or from how
agents are grouped into workers. A resumed run and a round replayed after a lost worker
therefore see exactly the network they saw the first time, and the schedule itself needs no
state in a checkpoint.

Per round r:
  graph(r)     the topology, re-drawn every `topology.resample_every` rounds (draw r // n), minus
               the edges that fail this round (each independently with `topology.p_fail`)
  active(r)    the agents that train, publish and receive in r (`participation`)
  sends(r)     the messages published at the end of r: (sender, receiver, delay) for every live
               edge from an active sender, in rounds that communicate (`comm_every`)
  plan(r)      what the backend needs to run r: active agents, publishers, and the deliveries of
               sends(r - 1) whose receivers are active when their message arrives

A message sent at the end of round r (made on public batch r + 1) arrives in round r + 1 + d.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from omegaconf import DictConfig

from agents.inbox import Delivery, RoundPlan
from sim.core.config import plain_dict
from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.core.seeding import derive_rng
from sim.core.validation import non_negative_int, positive_int
from sim.experiment.methods import MethodPlan
from topologies import build_topology

Message = tuple[int, int, int]  # (sender, receiver, delay in rounds)


# ---- participation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Participation:
    """Which agents take part in a round; `trace` is rounds x agents of 0/1 for rule `trace`."""

    rule: str
    q: float
    trace: np.ndarray | None

    def active(self, num_agents: int, seed: int, round_idx: int) -> np.ndarray:
        """A bool mask over agents 0..K-1 for round `round_idx`."""
        return PARTICIPATION_RULES.get(self.rule)(
            self, num_agents, derive_rng(seed, "participation", round_idx), round_idx
        )


ParticipationRule = Callable[[Participation, int, np.random.Generator, int], np.ndarray]
PARTICIPATION_RULES: Registry[ParticipationRule] = Registry("participation.rule")


@PARTICIPATION_RULES.register("always")
def _always(config: Participation, num_agents: int, rng: np.random.Generator, round_idx: int) -> np.ndarray:
    return np.ones(num_agents, dtype=bool)


@PARTICIPATION_RULES.register("bernoulli")
def _bernoulli(config: Participation, num_agents: int, rng: np.random.Generator, round_idx: int) -> np.ndarray:
    """Each agent independently with probability q (cross-device dropout); a round may have nobody."""
    return rng.random(num_agents) < config.q


@PARTICIPATION_RULES.register("fraction")
def _fraction(config: Participation, num_agents: int, rng: np.random.Generator, round_idx: int) -> np.ndarray:
    """Exactly max(1, round(q K)) agents, drawn uniformly (FedAvg's client sampling)."""
    mask = np.zeros(num_agents, dtype=bool)
    mask[rng.choice(num_agents, size=max(1, round(config.q * num_agents)), replace=False)] = True
    return mask


@PARTICIPATION_RULES.register("trace")
def _trace(config: Participation, num_agents: int, rng: np.random.Generator, round_idx: int) -> np.ndarray:
    """Row `round_idx` of an availability trace read from `participation.trace`."""
    assert config.trace is not None  # read and checked by participation()
    return config.trace[round_idx].astype(bool)


def participation(node: DictConfig, num_agents: int, rounds: int) -> Participation:
    """The `participation` block, checked: q in (0, 1], a trace with every agent and every round."""
    params = plain_dict(node)
    rule = str(params.get("rule"))
    PARTICIPATION_RULES.get(rule)
    q = params.get("q")
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 < q <= 1.0:
        raise ConfigError("participation.q", q, "a probability in (0, 1]: the chance (or share) of being active")
    trace = read_trace(params.get("trace"), num_agents, rounds) if rule == "trace" else None
    return Participation(rule, float(q), trace)


def read_trace(path: Any, num_agents: int, rounds: int) -> np.ndarray:
    """A rounds x agents 0/1 matrix from a CSV (header: agent ids; one row per round) or a JSON
    object {agent id: [0/1 per round]}; every agent 0..K-1 exactly once, exactly `rounds` rounds."""
    if path is None or not Path(str(path)).is_file():
        raise ConfigError(
            "participation.trace", path, "an existing CSV or JSON availability file (rounds x agents of 0/1)"
        )
    file = Path(str(path))
    try:
        if file.suffix.lower() == ".json":
            columns = {str(agent): list(values) for agent, values in json.loads(file.read_text()).items()}
        else:
            lines = [line.split(",") for line in file.read_text().splitlines() if line.strip()]
            header, rows = [name.strip() for name in lines[0]], lines[1:]
            columns = {agent: [row[index].strip() for row in rows] for index, agent in enumerate(header)}
        agents = sorted(int(agent) for agent in columns)
        matrix = np.array([[int(value) for value in columns[key]] for key in sorted(columns, key=int)]).T
    except (ValueError, IndexError, AttributeError, TypeError) as error:
        raise ConfigError("participation.trace", str(file), f"unreadable ({error}); see docs/dynamic.md") from None
    if agents != list(range(num_agents)):
        unknown = sorted(set(agents) - set(range(num_agents))) or sorted(set(range(num_agents)) - set(agents))
        raise ConfigError(
            "participation.trace", str(file), f"one column per agent 0..{num_agents - 1} (agents {unknown} do not fit)"
        )
    if matrix.shape[0] != rounds:
        raise ConfigError(
            "participation.trace", str(file), f"{matrix.shape[0]} rounds, but the run has rounds={rounds}"
        )
    if not np.isin(matrix, (0, 1)).all():
        raise ConfigError("participation.trace", str(file), "only 0 (offline) and 1 (active) values")
    return matrix


# ---- delays ------------------------------------------------------------------------------------


DelayRule = Callable[[np.random.Generator, int, int], np.ndarray]
DELAY_RULES: Registry[DelayRule] = Registry("delay.rule")


@DELAY_RULES.register("fixed")
def _fixed(rng: np.random.Generator, size: int, rounds: int) -> np.ndarray:
    return np.full(size, rounds, dtype=np.int64)


@DELAY_RULES.register("uniform")
def _uniform(rng: np.random.Generator, size: int, rounds: int) -> np.ndarray:
    """0..rounds, each equally likely."""
    return rng.integers(0, rounds + 1, size=size)


DELAY_UNITS = ("edge", "agent")


@dataclass(frozen=True)
class Delay:
    """How late messages arrive: per message on an edge, or per sender (a straggler, drawn once)."""

    rule: str
    rounds: int
    per: str
    max_staleness: int | None

    @property
    def none(self) -> bool:
        return self.rounds == 0


def delay(node: DictConfig) -> Delay:
    params = plain_dict(node)
    rule = str(params.get("rule"))
    DELAY_RULES.get(rule)
    per = params.get("per")
    if per not in DELAY_UNITS:
        raise ConfigError("delay.per", per, f"one of {', '.join(DELAY_UNITS)}")
    max_staleness = params.get("max_staleness")
    return Delay(
        rule=rule,
        rounds=non_negative_int("delay.rounds", params.get("rounds")),
        per=str(per),
        max_staleness=None if max_staleness is None else non_negative_int("delay.max_staleness", max_staleness),
    )


# ---- the schedule ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dynamics:
    """Every dynamic setting, checked; all at their defaults is the static, lock-step network."""

    resample_every: int | None
    p_fail: float
    participation: Participation
    delay: Delay
    comm_every: int

    @property
    def static(self) -> bool:
        return (
            self.resample_every is None
            and self.p_fail == 0.0
            and self.participation.rule == "always"
            and self.delay.none
            and self.comm_every == 1
        )

    def describe(self) -> dict[str, Any]:
        participation = {"rule": self.participation.rule, "q": self.participation.q}
        delay = {"rule": self.delay.rule, "rounds": self.delay.rounds, "per": self.delay.per}
        return {
            "resample_every": self.resample_every,
            "p_fail": self.p_fail,
            "participation": participation,
            "delay": {**delay, "max_staleness": self.delay.max_staleness},
            "comm_every": self.comm_every,
        }


class NetworkSchedule:
    """The network of each round as a pure function of the round (see the module docstring)."""

    def __init__(
        self,
        dynamics: Dynamics,
        num_agents: int,
        seed: int,
        rounds: int,
        base_graph: nx.DiGraph,
        redraw: Callable[[int], nx.DiGraph] | None,
        include_self: bool,
    ) -> None:
        self.dynamics = dynamics
        self.num_agents = num_agents
        self.seed = seed
        self.rounds = rounds
        self.base_graph = base_graph
        self.redraw = redraw  # draw index -> graph; None: the base graph in every round
        self.include_self = include_self
        self._graphs: dict[int, nx.DiGraph] = {}  # a few recent draws (each round asks for r and r - 1)
        self._active: dict[int, frozenset[int]] = {}  # recent rounds' participants (a delivery asks for later ones)
        self._sends: dict[int, list[Message]] = {}
        self._sender_delay = self._straggler_delays() if dynamics.delay.per == "agent" else None

    @property
    def static(self) -> bool:
        return self.dynamics.static

    def communicates(self, round_idx: int) -> bool:
        """Whether messages (or weights) are exchanged at the end of `round_idx` (every `comm_every` rounds)."""
        return (round_idx + 1) % self.dynamics.comm_every == 0

    def graph(self, round_idx: int) -> nx.DiGraph:
        """The edges that can carry a message sent at the end of `round_idx`."""
        every = self.dynamics.resample_every
        drawn = self._draw(round_idx // every) if every is not None and self.redraw is not None else self.base_graph
        if self.dynamics.p_fail == 0.0:
            return drawn
        edges = sorted(drawn.edges())
        fails = derive_rng(self.seed, "edge_failures", round_idx).random(len(edges)) < self.dynamics.p_fail
        live: nx.DiGraph = nx.empty_graph(self.num_agents, create_using=nx.DiGraph)
        live.add_edges_from(edge for edge, failed in zip(edges, fails, strict=True) if not failed)
        return live

    def _draw(self, index: int) -> nx.DiGraph:
        if index not in self._graphs:
            assert self.redraw is not None
            _remember(self._graphs, index, self.redraw(index))
        return self._graphs[index]

    def active(self, round_idx: int) -> frozenset[int]:
        """The agents that train, publish and receive in `round_idx`."""
        if round_idx not in self._active:
            mask = self.dynamics.participation.active(self.num_agents, self.seed, round_idx)
            _remember(self._active, round_idx, frozenset(int(agent) for agent in np.flatnonzero(mask)))
        return self._active[round_idx]

    def sends(self, round_idx: int) -> list[Message]:
        """(sender, receiver, delay) of every message put on an edge at the end of `round_idx`, sorted."""
        if round_idx not in self._sends:
            messages: list[Message] = []
            if self.communicates(round_idx):
                active = self.active(round_idx)
                edges = [(u, v) for u, v in sorted(self.graph(round_idx).edges()) if u in active]
                delays = self._delays(round_idx, edges)
                messages = [(u, v, int(d)) for (u, v), d in zip(edges, delays, strict=True)]
            _remember(self._sends, round_idx, messages)
        return self._sends[round_idx]

    def _delays(self, round_idx: int, edges: list[tuple[int, int]]) -> np.ndarray:
        config = self.dynamics.delay
        if self._sender_delay is not None:
            return np.array([self._sender_delay[u] for u, _ in edges], dtype=np.int64)
        rng = derive_rng(self.seed, "delay", round_idx)
        return DELAY_RULES.get(config.rule)(rng, len(edges), config.rounds)

    def _straggler_delays(self) -> np.ndarray:
        """Per agent, the delay of all its messages (drawn once: the same stragglers all run long)."""
        config = self.dynamics.delay
        return DELAY_RULES.get(config.rule)(derive_rng(self.seed, "straggler_delay"), self.num_agents, config.rounds)

    def out_degree(self, round_idx: int) -> dict[int, int]:
        """Messages each agent put on edges at the end of `round_idx` (for the bytes sent)."""
        counts = Counter(sender for sender, _, _ in self.sends(round_idx))
        return {agent: counts.get(agent, 0) for agent in range(self.num_agents)}

    def plan(self, round_idx: int) -> RoundPlan:
        """Round `round_idx` for the backend: who trains and publishes, what each receiver gets."""
        active = self.active(round_idx)
        deliveries: dict[int, list[Delivery]] = {}
        if round_idx > 0:
            for sender, receiver, late in self.sends(round_idx - 1):
                arrives = round_idx + late
                if arrives < self.rounds and receiver in self.active(arrives):
                    deliveries.setdefault(receiver, []).append(Delivery(sender, round_idx, arrives))
        talking = {sender for sender, _, _ in self.sends(round_idx)} if self.communicates(round_idx) else set()
        publishers = frozenset(active if self.include_self and self.communicates(round_idx) else talking)
        return RoundPlan(
            active,
            publishers,
            {receiver: tuple(found) for receiver, found in deliveries.items()},
            self.dynamics.delay.max_staleness,
        )

    def record(self, round_idx: int) -> dict[str, Any]:
        """Round `round_idx`'s network, compactly, for network.jsonl: active agents and messages sent."""
        active = self.active(round_idx)
        return {
            "round": round_idx + 1,
            "active": sorted(active),
            "sent": [list(message) for message in self.sends(round_idx)],
        }


CACHED = 64  # rounds (or draws) each cache keeps: enough for the delays a run can sensibly have


def _remember(cache: dict[int, Any], key: int, value: Any) -> None:
    """Keep `value` under `key`, forgetting the oldest key once CACHED are held (everything is recomputable)."""
    if len(cache) >= CACHED:
        cache.pop(min(cache))
    cache[key] = value


def network_schedule(
    cfg: DictConfig, num_agents: int, seed: int, rounds: int, method: MethodPlan, graph: nx.DiGraph
) -> NetworkSchedule:
    """The run's schedule from `topology.resample_every`, `topology.p_fail`, `participation`, `delay`, `comm_every`.

    Raises ConfigError for a bad value, naming its key, before any work starts.
    """
    dynamics = Dynamics(
        resample_every=_resample_every(cfg.topology.get("resample_every")),
        p_fail=_p_fail(cfg.topology.get("p_fail")),
        participation=participation(cfg.participation, num_agents, rounds),
        delay=delay(cfg.delay),
        comm_every=positive_int("comm_every", cfg.comm_every),
    )
    _check_method(dynamics, method)
    redraw = None
    if method.exchanges and dynamics.resample_every is not None:
        name, params = str(cfg.topology.name), plain_dict(cfg.topology, drop=("name",))
        redraw = lambda draw: build_topology(name, num_agents, seed, params, draw=draw)  # noqa: E731
    base = graph if method.exchanges else nx.create_empty_copy(graph)
    include_self = method.distill is not None and method.distill.include_self
    return NetworkSchedule(dynamics, num_agents, seed, rounds, base, redraw, include_self)


def _resample_every(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("topology.resample_every", value, "null (a fixed graph) or an integer >= 1 (rounds per draw)")
    return value


def _p_fail(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ConfigError(
            "topology.p_fail", value, "a probability in [0, 1): the chance that an edge is down in a round"
        )
    return float(value)


def _check_method(dynamics: Dynamics, method: MethodPlan) -> None:
    """Dynamics a method cannot honour are refused rather than ignored."""
    if method.central and not dynamics.static:
        raise ConfigError("method", "central", "a static network: one central model has no agents to drop or delay")
    if method.shares_weights and not dynamics.delay.none:
        raise ConfigError(
            "delay.rounds", dynamics.delay.rounds, "0 for a weight-sharing baseline: it averages weights in lock-step"
        )
