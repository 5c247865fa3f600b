"""Methods: how a population is built and what its agents exchange.

Every method runs the same Agent; a method only decides the population (one model per agent,
or one central model), the number of heads, the distillation rule, and what its agents send
each other after local training (`exchange`, a step of sim/run/exchange.py). A new method is one
registered builder plus one conf/method/NAME.yaml.

`fedavg` and `gossip` are baselines that share WEIGHTS (`MethodPlan.shares_weights`): they
cross the privacy boundary that MHD keeps, on purpose, so that MHD can be compared with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents.codecs import MESSAGE_CODECS, CodecConfig
from agents.losses import TEACHER_RULES, DistillConfig
from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.core.validation import boolean, non_negative_number, positive_int, positive_number
from sim.experiment.mixing import MIXING_RULES


@dataclass(frozen=True)
class MethodPlan:
    central: bool  # True: one model trained on the union of all private shards
    aux_heads: int  # auxiliary heads each model gets
    distill: DistillConfig | None  # None: no predictions are exchanged
    message_codec: CodecConfig  # wire format of the predictions sent on each edge
    exchange: str  # what agents send after local training: a name in sim.run.exchange.EXCHANGES
    mixing: str | None = None  # gossip only: the name of its mixing weights in sim.experiment.mixing.MIXING_RULES

    @property
    def exchanges(self) -> bool:
        """Whether messages travel on the graph's edges (predictions, or gossip's weights)."""
        return self.exchange in GRAPH_EXCHANGES

    @property
    def shares_weights(self) -> bool:
        """A baseline that sends model weights: NOT privacy-preserving (agents/weight_sharing.py)."""
        return self.exchange in WEIGHT_EXCHANGES


GRAPH_EXCHANGES = ("predictions", "gossip")
WEIGHT_EXCHANGES = ("fedavg", "gossip")


NO_MESSAGES = CodecConfig("float32", 1)  # the codec of a method that sends nothing (never used)

MethodBuilder = Callable[[dict[str, Any], int], MethodPlan]
METHODS: Registry[MethodBuilder] = Registry("method")


def _param(params: dict[str, Any], key: str) -> Any:
    """`params[key]`, or a ConfigError naming `method.KEY` (e.g. after `method.name=mhd` on a method without it)."""
    if key not in params:
        raise ConfigError(f"method.{key}", None, "missing; a distilling method needs it (see conf/method/mhd.yaml)")
    return params[key]


def _distill_config(params: dict[str, Any]) -> DistillConfig:
    teacher_rule = str(_param(params, "teacher_rule"))
    TEACHER_RULES.get(teacher_rule)
    return DistillConfig(
        nu_main=non_negative_number("method.nu_main", _param(params, "nu_main")),
        nu_aux=non_negative_number("method.nu_aux", _param(params, "nu_aux")),
        nu_emb=non_negative_number("method.nu_emb", _param(params, "nu_emb")),
        temperature=positive_number("method.temperature", _param(params, "temperature")),
        teacher_rule=teacher_rule,
        include_self=boolean("method.include_self", _param(params, "include_self")),
    )


def _message_codec(params: dict[str, Any]) -> CodecConfig:
    """The codec and its k; k < classes is checked once the dataset is known (AgentSpec)."""
    name = str(_param(params, "message_codec"))
    MESSAGE_CODECS.get(name)
    return CodecConfig(name, positive_int("method.message_topk", _param(params, "message_topk")))


@METHODS.register("mhd")
def mhd(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Multi-Headed Distillation: main head from neighbours' main heads, head k from heads k-1."""
    return MethodPlan(False, aux_heads, _distill_config(params), _message_codec(params), "predictions")


@METHODS.register("mean_teacher")
def mean_teacher(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Single head distilled from the neighbours' mean prediction (FedDF / FedMD style)."""
    del aux_heads  # one head by definition
    distill = _distill_config({**params, "nu_aux": 0.0, "nu_emb": 0.0, "teacher_rule": "mean", "include_self": False})
    return MethodPlan(False, 0, distill, _message_codec(params), "predictions")


@METHODS.register("isolated")
def isolated(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Each agent trains on its own shard only: the lower bound. Aux heads would never train."""
    del params, aux_heads
    return MethodPlan(False, 0, None, NO_MESSAGES, "none")


@METHODS.register("central")
def central(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """One model on the union of the private shards, same total optimizer steps: the upper bound."""
    del params, aux_heads
    return MethodPlan(True, 0, None, NO_MESSAGES, "none")


@METHODS.register("fedavg")
def fedavg(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Shares WEIGHTS (a baseline): a server averages all agents' weights by shard size every round.

    McMahan et al. 2017 with every agent in every round. The graph is not used: the traffic is a
    star through the server. One head: auxiliary heads would never train.
    """
    del params, aux_heads
    return MethodPlan(False, 0, None, NO_MESSAGES, "fedavg")


@METHODS.register("gossip")
def gossip(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Shares WEIGHTS (a baseline): each agent averages its weights with its in-neighbours' (D-PSGD).

    Lian et al. 2017's decentralised averaging over the same graph MHD uses, with local steps
    between averagings; the mixing weights are sim/experiment/mixing.py's. One head, as for fedavg.
    """
    del aux_heads
    if "mixing" not in params:
        raise ConfigError("method.mixing", None, "missing; gossip needs it (see conf/method/gossip.yaml)")
    mixing = str(params["mixing"])
    MIXING_RULES.get(mixing)
    return MethodPlan(False, 0, None, NO_MESSAGES, "gossip", mixing)
