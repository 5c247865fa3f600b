"""Errors a user can act on.

A `ConfigError` is raised for bad input before any work starts; the CLI prints its one-line
message and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value that cannot be used: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
