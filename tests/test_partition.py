"""Partitioners: class proportions, disjointness, determinism and parameter validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from sim.core.errors import ConfigError
from sim.data.partition import PARTITIONERS, class_count_matrix, partition

CONF = Path(__file__).resolve().parents[1] / "conf" / "partition"
NUM_CLASSES = 10
NUM_AGENTS = 8


def yaml_params(name: str, **overrides: Any) -> dict[str, Any]:
    """The partitioner's YAML defaults (without `name`), with `overrides` applied."""
    params = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    assert isinstance(params, dict)
    params.pop("name")
    return {**params, **overrides}


@pytest.fixture
def labels() -> np.ndarray:
    """1,000 shuffled labels, 100 per class."""
    return np.random.default_rng(0).permutation(np.arange(1000) % NUM_CLASSES)


def split(
    name: str, labels: np.ndarray, seed: int = 0, num_agents: int = NUM_AGENTS, **overrides: Any
) -> list[np.ndarray]:
    return partition(name, labels, num_agents, NUM_CLASSES, seed, **yaml_params(name, **overrides))


def max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = class_count_matrix(labels, parts, NUM_CLASSES)
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


EVERY_SETUP = [
    ("iid", {}),
    ("iid", {"quantity_skew": 1.0}),
    ("shards", {}),
    ("label_skew", {}),
    ("label_skew", {"skew": 1.0, "samples_per_agent": 50}),
    ("dirichlet", {"variant": "per_class"}),
    ("dirichlet", {"variant": "per_client"}),
]


@pytest.mark.parametrize(("name", "overrides"), EVERY_SETUP)
def test_parts_are_sorted_disjoint_and_in_range(name: str, overrides: dict[str, Any], labels: np.ndarray) -> None:
    parts = split(name, labels, **overrides)
    assert len(parts) == NUM_AGENTS
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
        assert part.size == 0 or 0 <= part[0] <= part[-1] < len(labels)
    every_index = np.concatenate(parts)
    assert len(np.unique(every_index)) == len(every_index)


@pytest.mark.parametrize(("name", "overrides"), EVERY_SETUP)
def test_same_seed_same_parts_other_seed_other_parts(name: str, overrides: dict[str, Any], labels: np.ndarray) -> None:
    first = split(name, labels, seed=1, **overrides)
    again = split(name, labels, seed=1, **overrides)
    other = split(name, labels, seed=2, **overrides)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_class_count_matrix_counts_each_agents_classes() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = class_count_matrix(labels, [np.array([0, 3]), np.array([1, 2, 4, 5])], 4)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[1, 0, 1, 0], [0, 2, 2, 0]]


# --- iid ---------------------------------------------------------------------------------


def test_iid_uses_every_sample_in_equal_parts_with_global_proportions(labels: np.ndarray) -> None:
    parts = split("iid", labels)
    sizes = [len(part) for part in parts]
    assert sum(sizes) == len(labels) and max(sizes) - min(sizes) <= 1
    fractions = class_count_matrix(labels, parts, NUM_CLASSES) / np.array(sizes)[:, None]
    assert np.abs(fractions - 0.1).max() < 0.1


def test_iid_quantity_skew_gives_unequal_sizes_of_at_least_one(labels: np.ndarray) -> None:
    sizes = np.array([len(part) for part in split("iid", labels, quantity_skew=0.3)])
    assert sizes.sum() == len(labels) and sizes.min() >= 1
    assert sizes.max() > 2 * sizes.min()


# --- shards ------------------------------------------------------------------------------


@pytest.mark.parametrize("shards_per_agent", [1, 2, 3])
def test_shards_limit_each_agent_to_two_classes_per_shard(shards_per_agent: int, labels: np.ndarray) -> None:
    parts = split("shards", labels, shards_per_agent=shards_per_agent)
    shard_size = len(labels) // (NUM_AGENTS * shards_per_agent)
    counts = class_count_matrix(labels, parts, NUM_CLASSES)
    assert all(len(part) == shards_per_agent * shard_size for part in parts)
    assert np.all((counts > 0).sum(axis=1) <= 2 * shards_per_agent)


# --- label_skew --------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [0.0, 0.5, 0.9, 1.0])
def test_label_skew_takes_fraction_skew_from_dominant_classes(skew: float, labels: np.ndarray) -> None:
    classes_per_agent = 2
    parts = split("label_skew", labels, skew=skew, classes_per_agent=classes_per_agent)
    counts = class_count_matrix(labels, parts, NUM_CLASSES)
    per_agent = len(parts[0])
    assert all(len(part) == per_agent for part in parts)
    for agent, row in enumerate(counts):
        dominant = (agent * classes_per_agent + np.arange(classes_per_agent)) % NUM_CLASSES
        # The non-skewed remainder is uniform over all classes, dominant ones included.
        expected = skew + (1 - skew) * classes_per_agent / NUM_CLASSES
        rounding = (classes_per_agent + NUM_CLASSES) / per_agent
        assert abs(row[dominant].sum() / per_agent - expected) <= rounding
    if skew == 1.0:
        assert np.all((counts > 0).sum(axis=1) == classes_per_agent)


def test_label_skew_spreads_dominance_evenly_over_classes(labels: np.ndarray) -> None:
    parts = split("label_skew", labels, num_agents=10, skew=1.0, classes_per_agent=3)
    counts = class_count_matrix(labels, parts, NUM_CLASSES)
    assert np.all((counts > 0).sum(axis=0) == 3)


def test_label_skew_default_size_is_the_largest_that_fits(labels: np.ndarray) -> None:
    imbalanced = labels[(labels != 3) | (np.arange(len(labels)) % 4 == 0)]  # class 3 keeps a quarter
    parts = split("label_skew", imbalanced)
    per_agent = len(parts[0])
    assert per_agent * NUM_AGENTS <= len(imbalanced)
    split("label_skew", imbalanced, samples_per_agent=per_agent)
    with pytest.raises(ConfigError, match=rf"partition.samples_per_agent={per_agent + 1} .*at most {per_agent}"):
        split("label_skew", imbalanced, samples_per_agent=per_agent + 1)


def test_label_skew_without_any_fit_names_samples_per_agent() -> None:
    only_class_zero = np.zeros(50, dtype=np.int64)
    with pytest.raises(ConfigError, match="partition.samples_per_agent"):
        split("label_skew", only_class_zero, num_agents=2, skew=1.0, classes_per_agent=1)


# --- dirichlet ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["per_class", "per_client"])
def test_dirichlet_small_alpha_skews_much_more_than_large_alpha(variant: str, labels: np.ndarray) -> None:
    def mean_max_class_fraction(alpha: float) -> float:
        draws = [split("dirichlet", labels, seed, variant=variant, alpha=alpha, min_samples=1) for seed in range(3)]
        return float(np.mean([max_class_fraction(labels, parts) for parts in draws]))

    skewed, even = mean_max_class_fraction(0.1), mean_max_class_fraction(100.0)
    assert skewed > 0.4
    assert even < 0.25
    assert skewed > 2 * even


def test_dirichlet_per_class_uses_every_sample_and_honours_min_samples(labels: np.ndarray) -> None:
    parts = split("dirichlet", labels, variant="per_class", alpha=0.3, min_samples=40)
    assert sum(len(part) for part in parts) == len(labels)
    assert min(len(part) for part in parts) >= 40


def test_dirichlet_per_client_gives_every_agent_n_over_k(labels: np.ndarray) -> None:
    parts = split("dirichlet", labels, variant="per_client", alpha=0.05)
    assert all(len(part) == len(labels) // NUM_AGENTS for part in parts)


def test_dirichlet_min_samples_out_of_reach_is_a_config_error(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="partition.min_samples=124 .*no draw"):
        split("dirichlet", labels, variant="per_class", alpha=0.01, min_samples=124)


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("label_skew", {"skew": 1.5}, "partition.skew"),
        ("label_skew", {"skew": -0.1}, "partition.skew"),
        ("label_skew", {"classes_per_agent": 11}, "partition.classes_per_agent"),
        ("label_skew", {"classes_per_agent": 0}, "partition.classes_per_agent"),
        ("label_skew", {"samples_per_agent": 0}, "partition.samples_per_agent"),
        ("dirichlet", {"alpha": 0.0}, "partition.alpha"),
        ("dirichlet", {"variant": "per_agent"}, "partition.variant"),
        ("dirichlet", {"min_samples": 126}, "partition.min_samples"),
        ("shards", {"shards_per_agent": 0}, "partition.shards_per_agent"),
        ("shards", {"shards_per_agent": 126}, "partition.shards_per_agent"),
        ("iid", {"quantity_skew": -1.0}, "partition.quantity_skew"),
        ("iid", {"bogus": 1}, "partition.bogus"),
    ],
)
def test_bad_parameters_name_their_key(name: str, overrides: dict[str, Any], key: str, labels: np.ndarray) -> None:
    with pytest.raises(ConfigError) as raised:
        split(name, labels, **overrides)
    assert raised.value.key == key
    assert str(raised.value).startswith(f"{key}=")


def test_missing_parameter_names_its_key(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match=r"partition.alpha=None .*conf/partition/dirichlet.yaml"):
        partition("dirichlet", labels, NUM_AGENTS, NUM_CLASSES, 0, variant="per_class", min_samples=1)


def test_more_agents_than_samples_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_agents=5"):
        partition("iid", np.arange(4) % 2, 5, 2, 0, quantity_skew=None)


def test_unknown_partitioner_lists_the_known_ones(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="partition='nope' .*dirichlet, iid, label_skew, shards"):
        partition("nope", labels, NUM_AGENTS, NUM_CLASSES, 0)


# --- YAML <-> registry -------------------------------------------------------------------


def test_every_partitioner_has_a_yaml_with_all_its_parameters_and_vice_versa(labels: np.ndarray) -> None:
    yaml_names = {path.stem for path in CONF.glob("*.yaml")}
    assert yaml_names == set(PARTITIONERS.names())
    for name in yaml_names:
        assert OmegaConf.load(CONF / f"{name}.yaml").name == name
        partition(name, labels, NUM_AGENTS, NUM_CLASSES, 0, **yaml_params(name))  # every key accepted, none missing
