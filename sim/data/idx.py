"""MNIST and Fashion-MNIST, read from the four official IDX files (gzip-compressed).

Both datasets share the file names and the IDX format, so one reader serves both; they differ
only in their official MD5s and download mirrors.
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sim.core.errors import ConfigError
from sim.data.core import DATASETS, ArrayDataset, DatasetSplits, standardised_splits, unit_scaled
from sim.data.files import verified_folder

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

MNIST_MD5 = {
    TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
    TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
    TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

FASHION_MNIST_MD5 = {
    TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
    TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
    TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

NUM_CLASSES = 10
UINT8_TYPE_CODE = 0x08


@DATASETS.register("mnist")
def load_mnist(root: str | None, seed: int, *, download: bool) -> DatasetSplits:
    """MNIST handwritten digits: 60,000 train and 10,000 test 28x28 grayscale images (seed unused)."""
    return _load_idx_dataset("mnist", root, MNIST_MD5, MNIST_MIRRORS, download)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(root: str | None, seed: int, *, download: bool) -> DatasetSplits:
    """Fashion-MNIST clothing images, same sizes and format as MNIST (seed unused)."""
    return _load_idx_dataset("fashion_mnist", root, FASHION_MNIST_MD5, FASHION_MNIST_MIRRORS, download)


def _load_idx_dataset(
    name: str, root: str | None, expected_md5: Mapping[str, str], mirrors: Sequence[str], download: bool
) -> DatasetSplits:
    folder = verified_folder(name, root, expected_md5, mirrors, download)
    train = _read_split(folder / TRAIN_IMAGES, folder / TRAIN_LABELS)
    test = _read_split(folder / TEST_IMAGES, folder / TEST_LABELS)
    return standardised_splits(name, train, test, NUM_CLASSES)


def _read_split(images_path: Path, labels_path: Path) -> ArrayDataset:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise ConfigError("data.root", str(images_path.parent), f"{images_path} and {labels_path} differ in length")
    return ArrayDataset(unit_scaled(images[:, None], 255.0), labels.astype(np.int64))


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in the gzip-compressed IDX file `path`, which must have `ndim` dimensions.

    IDX header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension; the values follow in row-major order.
    """
    with gzip.open(path, "rb") as stream:
        payload = stream.read()
    zeros, type_code, stored_ndim = struct.unpack_from(">HBB", payload)
    if zeros != 0 or type_code != UINT8_TYPE_CODE or stored_ndim != ndim:
        raise ConfigError("data.root", str(path.parent), f"{path} is not a {ndim}-dimensional uint8 IDX file")
    shape = struct.unpack_from(f">{ndim}I", payload, 4)
    values = np.frombuffer(payload, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != math.prod(shape):
        raise ConfigError("data.root", str(path.parent), f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)
