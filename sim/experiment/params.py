"""A config group as the keyword arguments of its registered builder."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from sim.core.config import plain_dict


def builder_params(group: DictConfig, drop: tuple[str, ...] = ("name",)) -> dict[str, Any]:
    """A config group as plain kwargs for its registered builder (without `name`)."""
    return plain_dict(group, drop=drop)
