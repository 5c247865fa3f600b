"""The optimizer as configured: checked once in the driver by building it as every agent will.

A bad `_target_` or kwarg fails here, naming its key, instead of inside every agent after the
workers have started; the build avoids importing torch._dynamo (start-up time).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from agents.agent import TrainConfig
from sim.core.config import to_plain
from sim.core.errors import ConfigError
from sim.core.validation import (
    positive_int,
)


def train_config(train: DictConfig) -> TrainConfig:
    """The train group as a TrainConfig, with an optimizer that is known to build."""
    node = train.optimizer
    optimizer = to_plain(node)
    if not isinstance(optimizer, dict) or "_target_" not in optimizer:
        raise ConfigError("train.optimizer", optimizer, "a mapping with _target_ (e.g. torch.optim.SGD) and its kwargs")
    kwargs = {str(key): value for key, value in optimizer.items()}
    check_optimizer(kwargs, "train.optimizer")
    return TrainConfig(
        local_steps=positive_int("train.local_steps", train.local_steps),
        batch_size=positive_int("train.batch_size", train.batch_size),
        distill_batch_size=positive_int("train.distill_batch_size", train.distill_batch_size),
        eval_batch_size=positive_int("train.eval_batch_size", train.eval_batch_size),
        optimizer=kwargs,
    )


def check_optimizer(optimizer: dict[str, Any], key: str) -> None:
    """Builds the optimizer as every Agent will (Hydra's instantiate), on one throwaway parameter.

    A bad `_target_` or kwarg then fails here, once, naming its key, instead of inside every
    agent after the workers have started. The class's own constructor checks the values; only
    the build goes through `_build_without_dynamo`, so that the driver of a Ray run never
    imports torch._dynamo (~2 s of start-up), which only the agents' processes need.
    """
    target = str(optimizer["_target_"])
    optimizer_class = _import_class(target, f"{key}._target_")
    if not issubclass(optimizer_class, torch.optim.Optimizer):
        raise ConfigError(f"{key}._target_", target, "a subclass of torch.optim.Optimizer")
    _check_kwarg_names(optimizer_class, optimizer, key)
    builder = f"{__name__}.{_build_without_dynamo.__name__}"
    try:
        instantiate({**optimizer, "_target_": builder}, optimizer_class, params=[torch.nn.Parameter(torch.zeros(1))])
    except InstantiationException as error:
        kwargs = {key: value for key, value in optimizer.items() if key != "_target_"}
        reason = " ".join(str(error.__cause__ or error).split())
        raise ConfigError(key, kwargs, f"{target} rejects them: {reason}") from None


class _UndecoratedParamGroups(torch.optim.Optimizer):
    """Optimizer.add_param_group without its `torch._disable_dynamo` wrapper.

    The wrapper imports torch._dynamo on its first call; the function it wraps is the same
    code, so a class that has this mixin after itself in its MRO builds exactly as it would.
    """

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)


def _build_without_dynamo(optimizer_class: type, /, **kwargs: Any) -> Any:
    """`optimizer_class(**kwargs)`, with the base class's add_param_group undecorated.

    The throwaway subclass puts `_UndecoratedParamGroups` between the class (and its own
    overrides) and torch.optim.Optimizer; a class that does not admit it (Optimizer itself)
    is built as it is.
    """
    try:
        probe = type(optimizer_class.__name__, (optimizer_class, _UndecoratedParamGroups), {})
    except TypeError:
        probe = optimizer_class
    return probe(**kwargs)


def _check_kwarg_names(optimizer_class: type, optimizer: dict[str, Any], key: str) -> None:
    """A misspelt kwarg named as its key, with the accepted ones (Hydra's `_..._` keys are its own)."""
    parameters = inspect.signature(optimizer_class).parameters
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        return
    accepted = [name for name in parameters if name != "params"]
    for name, value in optimizer.items():
        if not name.startswith("_") and name not in accepted:
            raise ConfigError(f"{key}.{name}", value, f"{optimizer['_target_']} takes {', '.join(accepted)}")


def _import_class(path: str, key: str) -> type:
    """The class at `path` (module.Class); Hydra's own locator would log each failure to stderr."""
    module_name, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        found = None
    if not isinstance(found, type):
        raise ConfigError(key, path, "an importable optimizer class, e.g. torch.optim.SGD")
    return found
