"""Finding, fetching and verifying the official files a dataset is loaded from.

Every file is checked against the MD5 of the official release before it is parsed, so a
truncated download or a different release fails with a message naming the file instead of
producing silently different data (and no unverified pickle is ever unpickled).
"""

from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from sim.core.atomic import write_then_rename
from sim.core.errors import ConfigError

MD5_CHUNK_BYTES = 1 << 20
"""Files are hashed in 1 MiB chunks so that a large archive is never held in memory just to be checked."""


def dataset_md5_check(path: str | Path, expected: str) -> None:
    """Raises ConfigError naming `path` unless its MD5 hex digest equals `expected`."""
    path = Path(path)
    digest = hashlib.md5()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(MD5_CHUNK_BYTES), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise ConfigError(
            "data.root",
            str(path.parent),
            f"{path} has MD5 {actual}, expected {expected}: it is corrupt or not the official release; "
            "delete it and fetch it again",
        )


def verified_folder(
    dataset: str, root: str | None, expected_md5: Mapping[str, str], mirrors: Sequence[str], download: bool
) -> Path:
    """The folder `root`, once it holds every file of `expected_md5` with the right MD5.

    Missing files are fetched from the first mirror that serves them when `download` is true;
    otherwise the error names the first missing path, before anything is read.

    Args:
        dataset: The dataset's registered name, for messages.
        root: The configured data.root; None means the user has not set it yet.
        expected_md5: File name -> official MD5 hex digest.
        mirrors: Base URLs (ending in "/") that serve the files under these names.
        download: The configured data.download.
    """
    if root is None:
        raise ConfigError("data.root", None, f"set data.root to the folder holding the {dataset} files")
    folder = Path(root).expanduser()
    missing = [folder / name for name in expected_md5 if not (folder / name).is_file()]
    if missing and not download:
        raise ConfigError(
            "data.root",
            str(folder),
            f"{missing[0]} is missing ({len(missing)} of {len(expected_md5)} {dataset} files are); "
            "put the official files there or set data.download=true",
        )
    for path in missing:
        _fetch(path, mirrors)
    for name, md5 in expected_md5.items():
        dataset_md5_check(folder / name, md5)
    return folder


def _fetch(target: Path, mirrors: Sequence[str]) -> None:
    """Downloads `target.name` from the first mirror that answers; a partial file never takes its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for base_url in mirrors:
        try:
            with write_then_rename(target, ".part") as partial:
                urllib.request.urlretrieve(base_url + target.name, partial)
        except OSError as error:
            failures.append(f"{base_url}: {error}")
            continue
        return
    raise OSError(f"could not download {target.name}: {'; '.join(failures)}")
