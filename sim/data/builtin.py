"""Datasets that need no downloaded files: scikit-learn's bundled digits and a generated one.

`digits` is the offline default (small enough for CPU tests and demos); `synthetic` produces
any number of samples of any shape, for scale tests where only the amount of data matters.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sim.core.seeding import derive_rng
from sim.data.core import DATASETS, ArrayDataset, DatasetSplits, standardised_splits, stratified_rows, unit_scaled
from sim.data.options import require

DIGITS_CLASSES = 10
DIGITS_MAX_PIXEL = 16.0


@DATASETS.register("digits")
def load_sklearn_digits(root: str | None, seed: int, *, test_fraction: float) -> DatasetSplits:
    """The 1,797 8x8 digit images bundled with scikit-learn, split into seeded stratified train/test sets.

    The dataset has no official test split, so one is drawn per seed; stratifying keeps every
    class's share equal in both splits (root unused).
    """
    require(
        isinstance(test_fraction, int | float) and 0 < test_fraction < 1,
        "data.test_fraction",
        test_fraction,
        "must lie strictly between 0 and 1",
    )
    images, labels = read_bundled_digits()
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[stratified_rows(labels, test_fraction, derive_rng(seed, "test_split"))] = True
    pixels = unit_scaled(images[:, None], DIGITS_MAX_PIXEL)
    train = ArrayDataset(pixels[~is_test], labels[~is_test])
    test = ArrayDataset(pixels[is_test], labels[is_test])
    return standardised_splits("digits", train, test, DIGITS_CLASSES)


def read_bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """([1797, 8, 8] pixels 0..16, [1797] int64 labels) from scikit-learn's digits.csv.gz.

    This is the file `sklearn.datasets.load_digits` reads; reading it directly skips importing
    sklearn.datasets, which pulls in scipy and costs over a second per process.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the digits dataset needs scikit-learn installed")
    table = np.loadtxt(Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


@DATASETS.register("synthetic")
def generate_synthetic(
    root: str | None,
    seed: int,
    *,
    num_train: int,
    num_test: int,
    num_classes: int,
    image_shape: Sequence[int],
    noise: float,
) -> DatasetSplits:
    """Class-conditional Gaussians: each class has a random prototype image, samples add Gaussian noise.

    Class c's samples are prototype_c + noise * N(0, I), with prototypes ~ N(0, I), so the
    Bayes-optimal classifier is nearest-prototype and `noise` sets how hard the task is.
    Classes are balanced. Prototypes, train and test samples use separate seeded streams (root unused).
    """
    require(
        isinstance(num_classes, int) and num_classes >= 2, "data.num_classes", num_classes, "must be an integer >= 2"
    )
    require(
        isinstance(num_train, int) and num_train >= num_classes, "data.num_train", num_train, "must be >= num_classes"
    )
    require(isinstance(num_test, int) and num_test >= 1, "data.num_test", num_test, "must be a positive integer")
    shape = tuple(image_shape)
    require(
        len(shape) == 3 and all(isinstance(size, int) and size >= 1 for size in shape),
        "data.image_shape",
        list(shape),
        "must be three positive integers [C, H, W]",
    )
    require(isinstance(noise, int | float) and noise >= 0, "data.noise", noise, "must be >= 0")
    prototypes = derive_rng(seed, "synthetic_prototypes").standard_normal((num_classes, *shape), dtype=np.float32)
    train = _sample_around(prototypes, num_train, noise, derive_rng(seed, "synthetic_train"))
    test = _sample_around(prototypes, num_test, noise, derive_rng(seed, "synthetic_test"))
    return standardised_splits("synthetic", train, test, num_classes)


def _sample_around(prototypes: np.ndarray, count: int, noise: float, rng: np.random.Generator) -> ArrayDataset:
    labels = rng.permutation(np.arange(count) % len(prototypes)).astype(np.int64)
    images = rng.standard_normal((count, *prototypes.shape[1:]), dtype=np.float32)
    images *= noise
    images += prototypes[labels]
    return ArrayDataset(images, labels)
