"""Public data API: load a dataset by name, and set aside the shared public (unlabelled) set.

In Multi-Headed Distillation the agents exchange predictions on a public set drawn from the
training split with its labels dropped; the rest of the training split is partitioned among
the agents as their private labelled data (see `sim.data.partition`).

Usage, with a data config from conf/data/NAME.yaml:
    splits = load_dataset(cfg.name, cfg.root, seed, **options)  # options: keys other than
                                                                # name, root, public_size, public_batch_size
    shared = split_public_private(splits.train, cfg.public_size, seed)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.core.seeding import derive_rng

# Importing the loader modules registers their datasets in DATASETS.
from sim.data import builtin, cifar, idx  # noqa: F401
from sim.data.core import DATASETS, ArrayDataset, DatasetSplits
from sim.data.files import dataset_md5_check
from sim.data.options import check_options, require

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetSplits",
    "PublicPrivateSplit",
    "dataset_md5_check",
    "load_dataset",
    "split_public_private",
]


def load_dataset(name: str, root: str | None, seed: int, **options: object) -> DatasetSplits:
    """Loads the dataset registered as `name`, with images normalised per channel.

    Args:
        name: A registered dataset (`DATASETS.names()`), e.g. "digits" or "mnist".
        root: The folder holding the dataset's official files; None for datasets that need none.
        seed: Root seed; datasets without an official test split, or generated ones, use it.
        **options: The dataset's own options from its YAML (e.g. download, test_fraction); an
            unknown or missing option is a ConfigError before anything is read.
    """
    loader = DATASETS.get(name)
    check_options("data", name, loader, options)
    return loader(root, seed, **options)


@dataclass(frozen=True)
class PublicPrivateSplit:
    """The training split cut in two disjoint parts.

    Attributes:
        public_x: [P, C, H, W] float32 public images; labels are dropped on purpose so that no
            method can use them by accident.
        private: The remaining labelled samples, to be partitioned among agents.
    """

    public_x: np.ndarray
    private: ArrayDataset


def split_public_private(train: ArrayDataset, public_size: int, seed: int) -> PublicPrivateSplit:
    """Draws `public_size` random training samples as the public set; the rest stay private.

    Both parts keep the training split's order, so the result depends only on the seed.
    """
    require(
        isinstance(public_size, int) and 0 <= public_size < len(train),
        "data.public_size",
        public_size,
        f"must be an integer in [0, {len(train)}) so that private data remains",
    )
    is_public = np.zeros(len(train), dtype=bool)
    is_public[derive_rng(seed, "public_split").permutation(len(train))[:public_size]] = True
    return PublicPrivateSplit(train.x[is_public], train.subset(~is_public))
