"""Small checks for scalar config values; each raises a one-line ConfigError.

YAML and Hydra overrides give ints, floats, bools and strings alike, and `bool` is an `int` in
Python, so every check rejects booleans explicitly: `num_agents=true` is a typo, not 1 agent.
"""

from __future__ import annotations

import math
from typing import Any

from sim.core.errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number; NaN is not (it passes every comparison check, then poisons the run)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def positive_int(key: str, value: Any) -> int:
    """`value` if it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ConfigError(key, value, "an integer >= 1")
    return int(value)


def non_negative_int(key: str, value: Any) -> int:
    """`value` if it is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ConfigError(key, value, "an integer >= 0")
    return int(value)


def int_between(key: str, value: Any, low: int, high: int) -> int:
    """`value` if it is an integer in [low, high]."""
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(key, value, f"an integer in [{low}, {high}]")
    return int(value)


def optional_positive_int(key: str, value: Any) -> int | None:
    """None (the config's "choose for me"), or an integer >= 1."""
    return None if value is None else positive_int(key, value)


def positive_number(key: str, value: Any) -> float:
    """`value` as a float if it is a number > 0."""
    if not _is_number(value) or value <= 0:
        raise ConfigError(key, value, "a number > 0")
    return float(value)


def non_negative_number(key: str, value: Any) -> float:
    """`value` as a float if it is a number >= 0."""
    if not _is_number(value) or value < 0:
        raise ConfigError(key, value, "a number >= 0")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    """`value` if it is true or false (a string such as 'yes' would be truthy by accident)."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value
