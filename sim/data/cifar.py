"""CIFAR-10 and CIFAR-100, read from the official "python version" tar.gz archives.

The archives hold pickled dicts of uint8 rows (1024 red, then 1024 green, then 1024 blue
values per image, so a row reshapes straight to [3, 32, 32]). Batches are read from the tar in
memory in one pass over the stream, so nothing is extracted to disk. Unpickling is safe
because the archive's MD5 was checked against the official release first.
"""

from __future__ import annotations

import pickle
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.data.core import DATASETS, ArrayDataset, DatasetSplits, standardised_splits, unit_scaled
from sim.data.files import verified_folder
from sim.data.options import require

CIFAR_MIRRORS = ("https://www.cs.toronto.edu/~kriz/",)

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = {CIFAR10_ARCHIVE: "c58f30108f718f92721af3b95e74349a"}
CIFAR10_TRAIN_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{number}" for number in range(1, 6))
CIFAR10_TEST_BATCHES = ("cifar-10-batches-py/test_batch",)

CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_MD5 = {CIFAR100_ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85"}
CIFAR100_TRAIN_BATCHES = ("cifar-100-python/train",)
CIFAR100_TEST_BATCHES = ("cifar-100-python/test",)
CIFAR100_LABEL_TYPES = {"fine": (b"fine_labels", 100), "coarse": (b"coarse_labels", 20)}
"""label_type -> (the batch dict's label key, number of classes)."""

Batch = dict[bytes, Any]


@DATASETS.register("cifar10")
def load_cifar10(root: str | None, seed: int, *, download: bool) -> DatasetSplits:
    """CIFAR-10: 50,000 train and 10,000 test 32x32 colour images in 10 classes (seed unused)."""
    folder = verified_folder("cifar10", root, CIFAR10_MD5, CIFAR_MIRRORS, download)
    batches = read_batches(folder / CIFAR10_ARCHIVE, CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES)
    train = _stack(batches, CIFAR10_TRAIN_BATCHES, b"labels")
    test = _stack(batches, CIFAR10_TEST_BATCHES, b"labels")
    return standardised_splits("cifar10", train, test, 10)


@DATASETS.register("cifar100")
def load_cifar100(root: str | None, seed: int, *, download: bool, label_type: str) -> DatasetSplits:
    """CIFAR-100 with its 100 fine or 20 coarse (superclass) labels (seed unused)."""
    require(label_type in CIFAR100_LABEL_TYPES, "data.label_type", label_type, "must be fine or coarse")
    label_key, num_classes = CIFAR100_LABEL_TYPES[label_type]
    folder = verified_folder("cifar100", root, CIFAR100_MD5, CIFAR_MIRRORS, download)
    batches = read_batches(folder / CIFAR100_ARCHIVE, CIFAR100_TRAIN_BATCHES + CIFAR100_TEST_BATCHES)
    train = _stack(batches, CIFAR100_TRAIN_BATCHES, label_key)
    test = _stack(batches, CIFAR100_TEST_BATCHES, label_key)
    return standardised_splits("cifar100", train, test, num_classes)


def read_batches(archive: Path, members: Sequence[str]) -> dict[str, Batch]:
    """The unpickled batch dicts stored under `members` in the tar.gz `archive`.

    Iterating over the members in stream order decompresses the archive once; looking members
    up by name would seek backwards through gzip and decompress it again for every batch.
    """
    wanted = set(members)
    batches: dict[str, Batch] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            stream = tar.extractfile(member) if member.name in wanted else None
            if stream is not None:
                batches[member.name] = pickle.load(stream, encoding="bytes")
    absent = sorted(wanted - batches.keys())
    if absent:
        raise ConfigError("data.root", str(archive.parent), f"{archive} lacks {', '.join(absent)}")
    return batches


def _stack(batches: dict[str, Batch], names: Sequence[str], label_key: bytes) -> ArrayDataset:
    pixels = np.concatenate([np.asarray(batches[name][b"data"], dtype=np.uint8) for name in names])
    labels = np.concatenate([np.asarray(batches[name][label_key], dtype=np.int64) for name in names])
    return ArrayDataset(unit_scaled(pixels.reshape(-1, 3, 32, 32), 255.0), labels)
