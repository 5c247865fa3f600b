"""A name -> builder registry, used for datasets, partitioners, topologies, backbones, methods.

Registering a name twice raises, so two modules cannot silently shadow each other; a lookup
that misses names every known entry, so a typo in a config is fixed from the error alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sim.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders of one kind (the kind names the config key in errors)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers `fn` under `name`; raises if the name is taken."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry for `name`, or a ConfigError listing every known name."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.kind, name, f"known names are {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
