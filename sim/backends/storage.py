"""Where agent state and checkpoints live (`runtime.storage`): a local or shared path, or a URI.

Agent workers write their own checkpoint files, on whatever node they run, and the driver
writes the manifest beside them. So the place must be one that every node and the driver see
alike:

- null: the run directory. Right on one machine, and on a cluster whose nodes share the
  filesystem that holds it (the probe before training says so, or refuses the run).
- a path (`/mnt/nfs/mhd`; a relative one is resolved on the driver) or `file:///mnt/nfs/mhd`:
  plain file I/O on a filesystem every node mounts at the same path (NFS, Lustre, a copy is not
  enough).
- `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`: object storage through pyarrow.fs (the optional
  `storage` extra), resolved with `pyarrow.fs.FileSystem.from_uri` as Ray Train resolves its
  `storage_path`. URI query options pass through (`?endpoint_override=HOST:PORT&scheme=http`
  for an S3-compatible server); credentials come from each node's environment, never the URI
  of a config that is saved with the run.

Why pyarrow.fs rather than fsspec: one wheel carries S3 and GCS clients in C++, with no
aiobotocore/botocore pins to fight a user's own boto3 (s3fs and gcsfs bring those), and it
is the library Ray itself uses for the same job. Local paths need no pyarrow at all: they keep
the plain file code, so the default run writes exactly what it wrote before.

A `StorageDir` is two strings (the storage root and a relative path), so it pickles to any
node, and each process resolves the filesystem once, from its own environment.

Atomic writes differ by kind. A local file is written beside its name and renamed onto it;
an object appears only when its upload completes, so a reader never sees half of either. A
directory renames atomically only on a local filesystem: `renames_atomically` tells the
checkpoint store which commit to use (a staging directory renamed into place, or a manifest
written last; sim/run/checkpoint.py).
"""

from __future__ import annotations

import functools
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from sim.core.atomic import write_then_rename
from sim.core.errors import ConfigError
from sim.core.registry import Registry

KEY = "runtime.storage"
ALLOWED = (
    "null (the run directory), a path (a relative one is resolved on the driver), "
    "or a URI file:///PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX"
)
CREDENTIALS = "config.yaml keeps the URI: give each node its own, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
PYARROW_MISSING = "pyarrow installed on the driver and every node for object storage (pip install 'mhd-sim[storage]')"


class Files(ABC):
    """One filesystem, addressed by the paths it understands ('/abs/dir' or 'bucket/prefix')."""

    renames_atomically: bool  # a directory can be renamed in one step (local filesystems)

    @abstractmethod
    def write(self, path: str, data: bytes) -> None:
        """Write `data` so that a reader sees all of it or no file at all; parents are created."""

    @abstractmethod
    def read(self, path: str) -> bytes: ...

    @abstractmethod
    def size(self, path: str) -> int:
        """Bytes of the file at `path`; OSError (FileNotFoundError) if there is none."""

    @abstractmethod
    def names(self, path: str) -> list[str]:
        """Names of the entries in directory `path`, sorted; [] if it does not exist."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove the file or directory tree at `path`; nothing if it does not exist."""

    def rename(self, source: str, target: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot rename directories atomically")


class LocalFiles(Files):
    """A filesystem of this process's machine: a local disk, or NFS mounted at the same path everywhere."""

    renames_atomically = True

    def write(self, path: str, data: bytes) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with write_then_rename(target) as partial:
            partial.write_bytes(data)

    def read(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def size(self, path: str) -> int:
        return Path(path).stat().st_size

    def names(self, path: str) -> list[str]:
        folder = Path(path)
        return sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []

    def delete(self, path: str) -> None:
        target = Path(path)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def rename(self, source: str, target: str) -> None:
        Path(source).rename(target)


class ArrowFiles(Files):
    """Object storage through a pyarrow filesystem (S3, GCS): no rename, whole objects only."""

    renames_atomically = False

    def __init__(self, filesystem: Any) -> None:
        self.fs = filesystem

    def write(self, path: str, data: bytes) -> None:
        # One write of the whole payload: the object exists only once the upload completes.
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return bytes(stream.read())

    def size(self, path: str) -> int:
        info = self.fs.get_file_info(path)
        if info.size is None or not info.is_file:
            raise FileNotFoundError(path)
        return int(info.size)

    def names(self, path: str) -> list[str]:
        from pyarrow.fs import FileSelector

        return sorted(info.base_name for info in self.fs.get_file_info(FileSelector(path, allow_not_found=True)))

    def delete(self, path: str) -> None:
        from pyarrow.fs import FileType

        kind = self.fs.get_file_info(path).type
        if kind == FileType.Directory:
            self.fs.delete_dir(path)
        elif kind == FileType.File:
            self.fs.delete_file(path)


@dataclass(frozen=True)
class Resolved:
    """A storage root as this process reaches it: the filesystem and the root's path on it."""

    files: Files
    base: str


Resolver = Callable[[str], Resolved]
SCHEMES: Registry[Resolver] = Registry(KEY)  # URI scheme -> how a process reaches it


@SCHEMES.register("file")
def local_root(root: str) -> Resolved:
    return Resolved(LocalFiles(), urlsplit(root).path if root.startswith("file:") else root)


def arrow_root(root: str) -> Resolved:
    """pyarrow's own URI parsing, query options included (endpoint_override, scheme, region, ...)."""
    from pyarrow.fs import FileSystem

    filesystem, base = FileSystem.from_uri(root)
    return Resolved(ArrowFiles(filesystem), base.rstrip("/"))


SCHEMES.register("s3")(arrow_root)
SCHEMES.register("gs")(arrow_root)


@functools.cache
def resolve(root: str) -> Resolved:
    """The filesystem of `root`, once per process (an S3 client is worth keeping)."""
    return SCHEMES.get(urlsplit(root).scheme or "file")(root)


@dataclass(frozen=True)
class StorageDir:
    """A directory in storage: `root` as configured (a local path or a URI) and a path below it."""

    root: str
    path: str = ""  # '/'-separated, relative to root

    @classmethod
    def local(cls, folder: Path) -> StorageDir:
        return cls(str(folder.absolute()))

    def child(self, name: str) -> StorageDir:
        return StorageDir(self.root, str(PurePosixPath(self.path, name)))

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name if self.path else PurePosixPath(self._shown_root()).name

    @property
    def renames_atomically(self) -> bool:
        return resolve(self.root).files.renames_atomically

    def __str__(self) -> str:
        """The directory as a user would write it (a URI's query options left out)."""
        root = self._shown_root()
        return f"{root.rstrip('/')}/{self.path}" if self.path else root

    def _shown_root(self) -> str:
        return self.root.split("?", 1)[0]

    def _at(self, name: str = "") -> str:
        return str(PurePosixPath(resolve(self.root).base, self.path, name))

    # What agents/group.py's StateDirectory asks of a checkpoint directory.

    def write_bytes(self, name: str, data: bytes) -> None:
        resolve(self.root).files.write(self._at(name), data)

    def read_bytes(self, name: str) -> bytes:
        return resolve(self.root).files.read(self._at(name))

    # What the driver's checkpoint store needs besides.

    def size(self, name: str) -> int:
        return resolve(self.root).files.size(self._at(name))

    def names(self) -> list[str]:
        return resolve(self.root).files.names(self._at())

    def delete(self, name: str = "") -> None:
        resolve(self.root).files.delete(self._at(name))

    def rename(self, target: StorageDir) -> None:
        if target.root != self.root:
            raise ValueError(f"{self} and {target} are in different storage")
        resolve(self.root).files.rename(self._at(), target._at())


def storage_root(value: Any) -> StorageDir | None:
    """`runtime.storage` checked without touching the storage (that is the probe's job); None: the run directory.

    A relative path is taken from the driver's working directory, so every node gets the same
    absolute path.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(KEY, value, ALLOWED)
    parts = urlsplit(value)
    if not parts.scheme:
        return StorageDir.local(Path(value).expanduser())
    if parts.scheme not in SCHEMES:
        raise ConfigError(KEY, value, ALLOWED)
    if parts.username or parts.password:
        shown = value.replace(parts.password, "***") if parts.password else value
        raise ConfigError(KEY, shown, f"a URI without credentials ({CREDENTIALS})")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(KEY, value, f"file:///ABSOLUTE/PATH (three slashes); {ALLOWED}")
        return StorageDir(f"file://{parts.path}")
    if not parts.netloc:
        raise ConfigError(KEY, value, f"a URI that names a bucket ({parts.scheme}://BUCKET/PREFIX)")
    try:
        import pyarrow.fs  # noqa: F401  # checked here, before any work, not on the first write
    except ImportError:
        raise ConfigError(KEY, value, PYARROW_MISSING) from None
    return StorageDir(value)
