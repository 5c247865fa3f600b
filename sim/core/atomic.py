"""Write-then-rename: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_then_rename(path: Path, suffix: str = ".partial") -> Iterator[Path]:
    """Yields the sibling `path` + `suffix` to write; renames it onto `path` only when the block ends without error."""
    partial = path.with_name(path.name + suffix)
    yield partial
    os.replace(partial, path)
