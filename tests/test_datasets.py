"""Dataset loaders (on files the tests write themselves), the public/private split, and YAML coverage."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from sim.core.errors import ConfigError
from sim.data import cifar, idx
from sim.data.builtin import read_bundled_digits
from sim.data.datasets import (
    DATASETS,
    ArrayDataset,
    dataset_md5_check,
    load_dataset,
    split_public_private,
)
from sim.data.partition import PARTITIONERS, partition

CONF = Path(__file__).resolve().parents[1] / "conf"
CALLER_KEYS = {"name", "root", "public_size", "public_batch_size"}
"""Keys of conf/data/*.yaml that the experiment consumes itself; the rest are loader options."""


def yaml_config(group: str, name: str) -> dict[str, Any]:
    config = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))
    assert isinstance(config, dict)
    return {str(key): value for key, value in config.items()}


def loader_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The dataset's YAML options (without the caller's keys), with `overrides` applied."""
    options = {key: value for key, value in yaml_config("data", name).items() if key not in CALLER_KEYS}
    return {**options, **overrides}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_standardised(x: np.ndarray) -> None:
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1.0, atol=1e-3)


# --- digits ------------------------------------------------------------------------------


def test_digits_shapes_dtypes_and_normalisation() -> None:
    splits = load_dataset("digits", None, 0, **loader_options("digits"))
    assert (splits.name, splits.num_classes, splits.input_shape) == ("digits", 10, (1, 8, 8))
    assert len(splits.train) + len(splits.test) == 1797
    assert len(splits.test) == pytest.approx(0.25 * 1797, abs=10)
    for split in (splits.train, splits.test):
        assert split.x.shape[1:] == (1, 8, 8) and split.x.dtype == np.float32
        assert split.y.dtype == np.int64 and set(np.unique(split.y)) == set(range(10))
    assert_standardised(splits.train.x)
    train_share = np.bincount(splits.train.y) / len(splits.train)
    test_share = np.bincount(splits.test.y) / len(splits.test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)  # stratified


def test_digits_split_depends_only_on_the_seed() -> None:
    first, again, other = (load_dataset("digits", None, seed, test_fraction=0.25) for seed in (3, 3, 4))
    assert np.array_equal(first.test.x, again.test.x) and np.array_equal(first.train.y, again.train.y)
    assert not np.array_equal(first.test.x, other.test.x)


def test_bundled_digits_file_matches_sklearn_load_digits() -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    images, labels = read_bundled_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, "a quarter"])
def test_digits_bad_test_fraction_is_a_config_error(test_fraction: object) -> None:
    with pytest.raises(ConfigError, match="data.test_fraction"):
        load_dataset("digits", None, 0, test_fraction=test_fraction)


# --- synthetic ---------------------------------------------------------------------------


def synthetic(seed: int = 0, **overrides: Any) -> Any:
    return load_dataset("synthetic", None, seed, **loader_options("synthetic", **overrides))


def test_synthetic_shapes_and_balanced_classes() -> None:
    splits = synthetic(num_train=300, num_test=60, num_classes=6, image_shape=[3, 4, 5])
    assert splits.input_shape == (3, 4, 5) and splits.num_classes == 6
    assert splits.train.x.shape == (300, 3, 4, 5) and splits.test.x.shape == (60, 3, 4, 5)
    assert np.bincount(splits.train.y).tolist() == [50] * 6
    assert_standardised(splits.train.x)


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    splits = synthetic(noise=1.0)
    train_x = splits.train.x.reshape(len(splits.train), -1)
    test_x = splits.test.x.reshape(len(splits.test), -1)
    class_means = np.stack([train_x[splits.train.y == label].mean(axis=0) for label in range(splits.num_classes)])
    distances = ((test_x[:, None, :] - class_means[None]) ** 2).sum(axis=-1)
    assert np.mean(distances.argmin(axis=1) == splits.test.y) > 0.95


def test_synthetic_depends_only_on_the_seed() -> None:
    assert np.array_equal(synthetic(5).train.x, synthetic(5).train.x)
    assert not np.array_equal(synthetic(5).train.x, synthetic(6).train.x)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"image_shape": [8, 8]}, "data.image_shape"),
        ({"num_classes": 1}, "data.num_classes"),
        ({"num_train": 3}, "data.num_train"),
        ({"noise": -1.0}, "data.noise"),
    ],
)
def test_synthetic_bad_options_name_their_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        synthetic(**overrides)
    assert raised.value.key == key


# --- public / private split --------------------------------------------------------------


@pytest.fixture
def numbered_train() -> ArrayDataset:
    """100 samples whose every pixel holds the sample's own index, so samples can be identified."""
    x = np.repeat(np.arange(100, dtype=np.float32), 4).reshape(100, 1, 2, 2)
    return ArrayDataset(x, np.arange(100, dtype=np.int64) % 10)


def test_public_and_private_are_disjoint_and_cover_train(numbered_train: ArrayDataset) -> None:
    shared = split_public_private(numbered_train, 30, seed=0)
    public_ids = shared.public_x[:, 0, 0, 0].astype(int)
    private_ids = shared.private.x[:, 0, 0, 0].astype(int)
    assert shared.public_x.shape == (30, 1, 2, 2) and len(shared.private) == 70
    assert sorted(public_ids.tolist() + private_ids.tolist()) == list(range(100))
    np.testing.assert_array_equal(shared.private.y, private_ids % 10)  # labels stay with their images


def test_public_split_depends_only_on_the_seed(numbered_train: ArrayDataset) -> None:
    first, again, other = (split_public_private(numbered_train, 30, seed) for seed in (1, 1, 2))
    assert np.array_equal(first.public_x, again.public_x)
    assert not np.array_equal(first.public_x, other.public_x)


@pytest.mark.parametrize("public_size", [-1, 100, 2.5])
def test_bad_public_size_is_a_config_error(public_size: object, numbered_train: ArrayDataset) -> None:
    with pytest.raises(ConfigError, match="data.public_size"):
        split_public_private(numbered_train, public_size, seed=0)  # type: ignore[arg-type]


# --- MNIST / Fashion-MNIST (IDX) ---------------------------------------------------------


def write_idx(path: Path, values: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, values.ndim) + struct.pack(f">{values.ndim}I", *values.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + values.astype(np.uint8).tobytes())


@pytest.fixture
def idx_folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A folder with tiny IDX files under the official names: 20 train and 10 test 28x28 images."""
    rng = np.random.default_rng(0)
    arrays = {
        idx.TRAIN_IMAGES: rng.integers(0, 256, (20, 28, 28)),
        idx.TRAIN_LABELS: np.arange(20) % 10,
        idx.TEST_IMAGES: rng.integers(0, 256, (10, 28, 28)),
        idx.TEST_LABELS: np.arange(10)[::-1],
    }
    for name, values in arrays.items():
        write_idx(tmp_path / name, values)
    return tmp_path, arrays


IDX_DATASETS = [("mnist", "MNIST_MD5"), ("fashion_mnist", "FASHION_MNIST_MD5")]


@pytest.mark.parametrize(("name", "md5_constant"), IDX_DATASETS)
def test_idx_loader_reads_images_and_labels(
    name: str, md5_constant: str, idx_folder: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, arrays = idx_folder
    monkeypatch.setattr(idx, md5_constant, {file: md5_of(folder / file) for file in arrays})
    splits = load_dataset(name, str(folder), 0, download=False)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.train.x.shape == (20, 1, 28, 28) and splits.test.x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(splits.train.y, arrays[idx.TRAIN_LABELS])
    np.testing.assert_array_equal(splits.test.y, arrays[idx.TEST_LABELS])
    assert_standardised(splits.train.x)
    # Standardisation is one increasing affine map, so pixel order is preserved exactly.
    raw = arrays[idx.TEST_IMAGES].ravel()
    loaded = splits.test.x.ravel()
    np.testing.assert_array_equal(np.argsort(raw, kind="stable"), np.argsort(loaded, kind="stable"))


@pytest.mark.parametrize(("name", "md5_constant"), IDX_DATASETS)
def test_idx_file_with_wrong_md5_is_named(
    name: str, md5_constant: str, idx_folder: tuple[Path, dict[str, np.ndarray]]
) -> None:
    folder, _ = idx_folder  # the official MD5s are kept, so the tiny files do not match them
    with pytest.raises(ConfigError, match="MD5") as raised:
        load_dataset(name, str(folder), 0, download=False)
    assert str(folder / idx.TRAIN_IMAGES) in str(raised.value)


@pytest.mark.parametrize(("name", "md5_constant"), IDX_DATASETS)
def test_missing_idx_file_names_data_root_the_path_and_download(name: str, md5_constant: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_dataset(name, str(tmp_path), 0, download=False)
    assert raised.value.key == "data.root"
    assert str(tmp_path / idx.TRAIN_IMAGES) in str(raised.value)
    assert "data.download=true" in str(raised.value)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_unset_root_asks_for_data_root(name: str) -> None:
    with pytest.raises(ConfigError, match=r"data.root=None .*set data.root"):
        load_dataset(name, None, 0, **loader_options(name))


def test_md5_check_passes_on_match_and_names_the_file_on_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"payload")
    dataset_md5_check(path, hashlib.md5(b"payload").hexdigest())
    with pytest.raises(ConfigError, match=f"{path} has MD5"):
        dataset_md5_check(path, "0" * 32)


def test_idx_file_of_the_wrong_kind_is_named(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    write_idx(path, np.arange(5))
    with pytest.raises(ConfigError, match=f"{path} is not a 3-dimensional uint8 IDX file"):
        idx.read_idx(path, ndim=3)


# --- CIFAR -------------------------------------------------------------------------------


def constant_channel_rows(count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, 3072] uint8 rows in CIFAR layout (1024 red, 1024 green, 1024 blue) with one value per channel."""
    channel_values = rng.integers(0, 256, (count, 3))
    return np.repeat(channel_values, 1024, axis=1).astype(np.uint8)


def write_tar_gz(path: Path, members: dict[str, dict[bytes, Any]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in members.items():
            payload = pickle.dumps(batch)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def cifar10_members(rng: np.random.Generator) -> dict[str, dict[bytes, Any]]:
    names = [*cifar.CIFAR10_TRAIN_BATCHES, *cifar.CIFAR10_TEST_BATCHES]
    return {
        name: {b"data": constant_channel_rows(4, rng), b"labels": [number, 9, 0, 5]}
        for number, name in enumerate(names)
    }


def test_cifar10_loader_reads_batches_in_channel_first_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / cifar.CIFAR10_ARCHIVE
    metadata: dict[str, dict[bytes, Any]] = {
        "cifar-10-batches-py/batches.meta": {b"label_names": []}
    }  # a member the loader must skip
    write_tar_gz(archive, {**metadata, **cifar10_members(np.random.default_rng(0))})
    monkeypatch.setattr(cifar, "CIFAR10_MD5", {archive.name: md5_of(archive)})
    splits = load_dataset("cifar10", str(tmp_path), 0, download=False)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.test.x.shape == (4, 3, 32, 32)
    assert splits.train.y.tolist()[:8] == [0, 9, 0, 5, 1, 9, 0, 5] and splits.test.y.tolist() == [5, 9, 0, 5]
    # Each channel of each image is constant only if rows were reshaped as [3, 32, 32].
    flat_channels = splits.train.x.reshape(20, 3, -1)
    assert np.all(flat_channels.max(axis=2) == flat_channels.min(axis=2))
    assert_standardised(splits.train.x)


@pytest.mark.parametrize(
    ("label_type", "num_classes", "label_key"), [("fine", 100, b"fine_labels"), ("coarse", 20, b"coarse_labels")]
)
def test_cifar100_loader_picks_fine_or_coarse_labels(
    label_type: str, num_classes: int, label_key: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    members = {
        name: {b"data": constant_channel_rows(count, rng), b"fine_labels": [99] * count, b"coarse_labels": [19] * count}
        for name, count in [(*cifar.CIFAR100_TRAIN_BATCHES, 6), (*cifar.CIFAR100_TEST_BATCHES, 3)]
    }
    archive = tmp_path / cifar.CIFAR100_ARCHIVE
    write_tar_gz(archive, members)
    monkeypatch.setattr(cifar, "CIFAR100_MD5", {archive.name: md5_of(archive)})
    splits = load_dataset("cifar100", str(tmp_path), 0, download=False, label_type=label_type)
    assert splits.num_classes == num_classes
    assert splits.train.y.tolist() == members[cifar.CIFAR100_TRAIN_BATCHES[0]][label_key]
    assert splits.test.x.shape == (3, 3, 32, 32)


def test_cifar100_bad_label_type_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.label_type='superclass'"):
        load_dataset("cifar100", str(tmp_path), 0, download=False, label_type="superclass")


def test_cifar_archive_with_wrong_md5_is_named(tmp_path: Path) -> None:
    archive = tmp_path / cifar.CIFAR10_ARCHIVE
    write_tar_gz(archive, cifar10_members(np.random.default_rng(0)))
    with pytest.raises(ConfigError, match=f"{archive} has MD5"):
        load_dataset("cifar10", str(tmp_path), 0, download=False)


def test_cifar_archive_lacking_a_batch_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / cifar.CIFAR10_ARCHIVE
    members = cifar10_members(np.random.default_rng(0))
    del members[cifar.CIFAR10_TEST_BATCHES[0]]
    write_tar_gz(archive, members)
    monkeypatch.setattr(cifar, "CIFAR10_MD5", {archive.name: md5_of(archive)})
    with pytest.raises(ConfigError, match=f"{archive} lacks {cifar.CIFAR10_TEST_BATCHES[0]}"):
        load_dataset("cifar10", str(tmp_path), 0, download=False)


# --- options, registry and YAML ----------------------------------------------------------


def test_unknown_and_missing_options_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"data.bogus=1 .*digits takes only test_fraction"):
        load_dataset("digits", None, 0, test_fraction=0.25, bogus=1)
    with pytest.raises(ConfigError, match=r"data.download=None .*conf/data/mnist.yaml"):
        load_dataset("mnist", None, 0)


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="data='svhn' .*cifar10, cifar100, digits, fashion_mnist, mnist, synthetic"):
        load_dataset("svhn", None, 0)


def test_every_dataset_has_a_yaml_with_exactly_its_options_and_vice_versa() -> None:
    yaml_names = {path.stem for path in (CONF / "data").glob("*.yaml")}
    assert yaml_names == set(DATASETS.names())
    for name in yaml_names:
        config = yaml_config("data", name)
        assert config["name"] == name
        assert config.keys() >= CALLER_KEYS
        assert config["root"] is None
        assert isinstance(config["public_size"], int) and isinstance(config["public_batch_size"], int)
        if name in ("digits", "synthetic"):
            load_dataset(name, None, 0, **loader_options(name))
        else:  # needs files: the options are checked before root is looked at
            with pytest.raises(ConfigError, match="data.root=None"):
                load_dataset(name, None, 0, **loader_options(name))


@pytest.mark.parametrize("partitioner", ["iid", "shards", "label_skew", "dirichlet"])
def test_digits_defaults_leave_enough_private_data_for_eight_agents(partitioner: str) -> None:
    data_config = yaml_config("data", "digits")
    splits = load_dataset("digits", None, 0, **loader_options("digits"))
    shared = split_public_private(splits.train, data_config["public_size"], seed=0)
    params = yaml_config("partition", partitioner)
    params.pop("name")
    parts = partition(partitioner, shared.private.y, 8, splits.num_classes, 0, **params)
    assert min(len(part) for part in parts) >= 10


def test_every_partition_yaml_names_a_registered_partitioner() -> None:
    assert {path.stem for path in (CONF / "partition").glob("*.yaml")} == set(PARTITIONERS.names())
