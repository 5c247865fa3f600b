"""Methods: how a population is built and what its agents exchange.

Every method runs the same Agent; a method only decides the population (one model per agent,
or one central model), the number of heads, and the distillation rule. A new method is one
registered builder plus one conf/method/NAME.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents.losses import TEACHER_RULES, DistillConfig
from agents.messages import MESSAGE_DTYPES
from sim.errors import ConfigError
from sim.registry import Registry
from sim.validation import boolean, non_negative_number, positive_number


@dataclass(frozen=True)
class MethodPlan:
    central: bool  # True: one model trained on the union of all private shards
    aux_heads: int  # auxiliary heads each model gets
    distill: DistillConfig | None  # None: no messages are exchanged
    message_dtype: str  # dtype of the logits sent on each edge

    @property
    def exchanges(self) -> bool:
        return self.distill is not None


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


def _message_dtype(params: dict[str, Any]) -> str:
    dtype = str(_param(params, "message_dtype"))
    if dtype not in MESSAGE_DTYPES:
        raise ConfigError("method.message_dtype", dtype, f"one of {', '.join(sorted(MESSAGE_DTYPES))}")
    return dtype


@METHODS.register("mhd")
def mhd(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Multi-Headed Distillation: main head from neighbours' main heads, head k from heads k-1."""
    return MethodPlan(False, aux_heads, _distill_config(params), _message_dtype(params))


@METHODS.register("mean_teacher")
def mean_teacher(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Single head distilled from the neighbours' mean prediction (FedDF / FedMD style)."""
    del aux_heads  # one head by definition
    distill = _distill_config({**params, "nu_aux": 0.0, "nu_emb": 0.0, "teacher_rule": "mean", "include_self": False})
    return MethodPlan(False, 0, distill, _message_dtype(params))


@METHODS.register("isolated")
def isolated(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """Each agent trains on its own shard only: the lower bound. Aux heads would never train."""
    del params, aux_heads
    return MethodPlan(False, 0, None, "float32")


@METHODS.register("central")
def central(params: dict[str, Any], aux_heads: int) -> MethodPlan:
    """One model on the union of the private shards, same total optimizer steps: the upper bound."""
    del params, aux_heads
    return MethodPlan(True, 0, None, "float32")
