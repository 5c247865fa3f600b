"""Checks the options a config hands to a dataset loader or a partitioner.

Loaders and partitioners take their tunables as keyword-only arguments without Python defaults
(the defaults live in conf/<group>/<name>.yaml). Checking a config's keys against the signature
first turns a typo or a forgotten key into a one-line ConfigError before any work starts,
instead of a TypeError from deep inside the call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from sim.core.errors import ConfigError


def check_options(group: str, name: str, consumer: Callable[..., object], options: Mapping[str, object]) -> None:
    """Raises ConfigError unless `options` names exactly the keyword-only parameters of `consumer`.

    Args:
        group: The config group, used as the key prefix in errors ("data", "partition").
        name: The registered name of `consumer`, so the error says whose options these are.
        consumer: The loader or partitioner the options are meant for.
        options: The config's options, without the keys the caller consumes itself.
    """
    accepted = [
        parameter.name
        for parameter in inspect.signature(consumer).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(f"{group}.{key}", value, f"{name} takes only {', '.join(accepted) or 'no options'}")
    for key in accepted:
        if key not in options:
            raise ConfigError(f"{group}.{key}", None, f"{name} needs it; its default is in conf/{group}/{name}.yaml")


def require(condition: bool, key: str, value: object, allowed: str) -> None:
    """Raises ConfigError(key, value, allowed) unless `condition` holds; keeps validation to one line each."""
    if not condition:
        raise ConfigError(key, value, allowed)
