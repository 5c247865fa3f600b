"""Checks for topology params, so a bad value fails with the config key that holds it.

Values come from YAML or the command line, where a typo such as `directed: "no"` or
`p: 2` is easy; each check names the key as `topology.<param>` and what is allowed.
"""

from __future__ import annotations

from typing import Any

from sim.core.errors import ConfigError


def config_key(param: str) -> str:
    """The user-facing key of a topology param, as it is written in an override."""
    return f"topology.{param}"


def check_bool(param: str, value: Any) -> bool:
    """`value` if it is a bool; strings such as "false" are refused rather than read as true."""
    if not isinstance(value, bool):
        raise ConfigError(config_key(param), value, "must be true or false")
    return value


def check_int(param: str, value: Any, low: int, high: int) -> int:
    """`value` if it is an int in low..high (inclusive); bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(config_key(param), value, f"must be an integer in {low}..{high}")
    return value


def check_probability(param: str, value: Any) -> float:
    """`value` as a float if it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(config_key(param), value, "must be a probability in [0, 1]")
    return float(value)
