"""Config nodes as plain Python: the one place an OmegaConf node becomes dicts and lists."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(node: Any, resolve: bool = True) -> Any:
    """An OmegaConf node as plain dicts and lists (resolved unless `resolve` is off); other values as they are."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=resolve)
    return node


def plain_dict(node: Any, *, resolve: bool = True, drop: Container[str] = ()) -> dict[str, Any]:
    """A mapping node as a dict with string keys, without the keys in `drop`."""
    container = to_plain(node, resolve)
    assert isinstance(container, dict), f"a mapping, not {type(container).__name__}"
    return {str(key): value for key, value in container.items() if key not in drop}
