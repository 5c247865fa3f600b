"""Partitioners: how the private training data is split among agents (the non-iid-ness).

`partition` returns one sorted index array per agent into the private labels; the arrays are
pairwise disjoint and drawn without replacement, and some schemes leave samples unused so that
every agent gets the same amount. All randomness comes from derive_rng(seed, "partition"), so a
partition depends only on the labels, the parameters and the seed.

Each partitioner takes `(labels, num_agents, num_classes, rng)` plus keyword-only parameters
whose defaults live in conf/partition/NAME.yaml.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sim.core.errors import ConfigError
from sim.core.registry import Registry
from sim.core.seeding import derive_rng
from sim.data.options import check_options, require

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[Partitioner] = Registry("partition")

MAX_DIRICHLET_ATTEMPTS = 1000
"""Redraws allowed before `dirichlet` gives up on min_samples (each draw is cheap)."""


def partition(
    name: str, labels: np.ndarray, num_agents: int, num_classes: int, seed: int, **params: object
) -> list[np.ndarray]:
    """Splits the samples behind `labels` among `num_agents` agents with the partitioner `name`.

    Args:
        name: A registered partitioner (`PARTITIONERS.names()`).
        labels: [N] integer class labels in [0, num_classes).
        num_agents: K, the number of agents; each gets one index array.
        num_classes: C, the dataset's number of classes (some may be absent from `labels`).
        seed: Root seed; the partition uses the stream derive_rng(seed, "partition").
        **params: The partitioner's parameters from its YAML; unknown or missing ones are a
            ConfigError before any work.

    Returns:
        K sorted, pairwise disjoint int64 index arrays into `labels`.
    """
    partitioner = PARTITIONERS.get(name)
    check_options("partition", name, partitioner, params)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} of {labels.dtype}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    require(
        isinstance(num_agents, int) and 1 <= num_agents <= len(labels),
        "num_agents",
        num_agents,
        f"must be between 1 and the {len(labels)} private samples",
    )
    parts = partitioner(labels, num_agents, num_classes, derive_rng(seed, "partition"), **params)
    return [np.sort(part).astype(np.int64) for part in parts]


def class_count_matrix(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[K, C] int64 matrix: entry (k, c) counts agent k's samples of class c."""
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for agent, indices in enumerate(parts):
        counts[agent] = np.bincount(labels[indices], minlength=num_classes)
    return counts


@PARTITIONERS.register("iid")
def iid(
    labels: np.ndarray, num_agents: int, num_classes: int, rng: np.random.Generator, *, quantity_skew: float | None
) -> list[np.ndarray]:
    """Uniformly random split; sizes are equal, or Dir(quantity_skew)-proportional (min 1 each) when set."""
    require(
        quantity_skew is None or (isinstance(quantity_skew, int | float) and quantity_skew > 0),
        "partition.quantity_skew",
        quantity_skew,
        "must be null (equal sizes) or a positive Dirichlet concentration",
    )
    order = rng.permutation(len(labels))
    if quantity_skew is None:
        sizes = _even_split(len(labels), num_agents, turn=0)
    else:
        shares = rng.dirichlet(np.full(num_agents, float(quantity_skew)))
        sizes = 1 + _proportional_counts(len(labels) - num_agents, shares)
    return np.split(order, np.cumsum(sizes)[:-1])


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray, num_agents: int, num_classes: int, rng: np.random.Generator, *, shards_per_agent: int
) -> list[np.ndarray]:
    """McMahan et al. (2017): sort by label, cut into equal shards, give each agent random shards.

    A shard spans at most two classes, so an agent sees at most 2 * shards_per_agent classes.
    The N mod (K * shards_per_agent) samples that do not fill a shard are dropped at random
    before sorting, so no class loses its tail.
    """
    require(
        isinstance(shards_per_agent, int) and shards_per_agent >= 1,
        "partition.shards_per_agent",
        shards_per_agent,
        "must be a positive integer",
    )
    num_shards = num_agents * shards_per_agent
    require(
        num_shards <= len(labels),
        "partition.shards_per_agent",
        shards_per_agent,
        f"num_agents * shards_per_agent must not exceed the {len(labels)} samples",
    )
    shard_size = len(labels) // num_shards
    kept = rng.permutation(len(labels))[: num_shards * shard_size]
    by_label = kept[np.argsort(labels[kept], kind="stable")].reshape(num_shards, shard_size)
    owned = rng.permutation(num_shards).reshape(num_agents, shards_per_agent)
    return [by_label[agent_shards].ravel() for agent_shards in owned]


@PARTITIONERS.register("label_skew")
def label_skew(
    labels: np.ndarray,
    num_agents: int,
    num_classes: int,
    rng: np.random.Generator,
    *,
    skew: float,
    classes_per_agent: int,
    samples_per_agent: int | None,
) -> list[np.ndarray]:
    """Dominant-class skew (MHD paper): a fraction `skew` of each agent's samples from its own classes.

    Agent i's dominant classes are (i * m + j) mod C for j < m = classes_per_agent, so
    dominance is spread evenly over the classes. Of its n samples, round(skew * n) come from its
    dominant classes (split evenly) and the rest uniformly from all C classes (split evenly,
    dominant ones included), so its dominant-class share is skew + (1 - skew) * m / C; skew=1
    means dominant classes only, skew=0 is iid. Counts are exact and equal for every agent; when
    samples_per_agent is null it is the largest n for which no class pool runs out.
    """
    require(isinstance(skew, int | float) and 0 <= skew <= 1, "partition.skew", skew, "must lie in [0, 1]")
    require(
        isinstance(classes_per_agent, int) and 1 <= classes_per_agent <= num_classes,
        "partition.classes_per_agent",
        classes_per_agent,
        f"must be an integer in [1, {num_classes}] (the number of classes)",
    )
    require(
        samples_per_agent is None or (isinstance(samples_per_agent, int) and samples_per_agent >= 1),
        "partition.samples_per_agent",
        samples_per_agent,
        "must be null (as many as fit) or a positive integer",
    )
    class_sizes = np.bincount(labels, minlength=num_classes)

    def counts_for(per_agent: int) -> np.ndarray:
        return _label_skew_counts(per_agent, num_agents, num_classes, classes_per_agent, float(skew))

    def fits(per_agent: int) -> bool:
        return bool(np.all(counts_for(per_agent).sum(axis=0) <= class_sizes))

    # Every class's demand grows monotonically with the per-agent count, so bisection finds the largest fit.
    largest, too_many = 0, len(labels) // num_agents + 1
    while too_many - largest > 1:
        middle = (largest + too_many) // 2
        largest, too_many = (middle, too_many) if fits(middle) else (largest, middle)
    per_agent = largest if samples_per_agent is None else samples_per_agent
    require(
        1 <= per_agent <= largest,
        "partition.samples_per_agent",
        samples_per_agent,
        f"at most {largest} samples per agent fit these labels with skew={skew}, "
        f"classes_per_agent={classes_per_agent} and {num_agents} agents",
    )
    return _draw_by_counts(labels, counts_for(per_agent), rng)


def _label_skew_counts(
    per_agent: int, num_agents: int, num_classes: int, classes_per_agent: int, skew: float
) -> np.ndarray:
    """[K, C] per-class sample counts for `label_skew`; every row sums to `per_agent`."""
    dominant_total = round(skew * per_agent)
    uniform_total = per_agent - dominant_total
    counts = np.zeros((num_agents, num_classes), dtype=np.int64)
    for agent in range(num_agents):
        dominant = (agent * classes_per_agent + np.arange(classes_per_agent)) % num_classes
        counts[agent, dominant] += _even_split(dominant_total, classes_per_agent, turn=agent)
        counts[agent] += _even_split(uniform_total, num_classes, turn=agent)
    return counts


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_agents: int,
    num_classes: int,
    rng: np.random.Generator,
    *,
    variant: str,
    alpha: float,
    min_samples: int,
) -> list[np.ndarray]:
    """Dirichlet label skew; smaller alpha means more skew. Redraws until every agent has min_samples.

    variant per_class: each class is split among agents by q ~ Dir(alpha * 1_K) (label-major,
    uses every sample, agent sizes vary). variant per_client (Hsu et al. 2019): agent i draws
    class proportions p_i ~ Dir(alpha * prior), prior the global class distribution, and
    receives N // K samples by p_i (equal sizes).
    """
    require(
        variant in DIRICHLET_VARIANTS,
        "partition.variant",
        variant,
        f"must be one of {', '.join(DIRICHLET_VARIANTS)}",
    )
    require(isinstance(alpha, int | float) and alpha > 0, "partition.alpha", alpha, "must be > 0")
    require(
        isinstance(min_samples, int) and 0 <= min_samples <= len(labels) // num_agents,
        "partition.min_samples",
        min_samples,
        f"must be an integer in [0, {len(labels) // num_agents}] (samples / agents)",
    )
    draw_counts = DIRICHLET_VARIANTS[variant]
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        counts = draw_counts(labels, num_agents, num_classes, float(alpha), rng)
        if counts.sum(axis=1).min() >= min_samples:
            return _draw_by_counts(labels, counts, rng)
    raise ConfigError(
        "partition.min_samples",
        min_samples,
        f"no draw in {MAX_DIRICHLET_ATTEMPTS} gave every agent that many samples with alpha={alpha}; "
        "lower partition.min_samples or raise partition.alpha",
    )


def _per_class_counts(
    labels: np.ndarray, num_agents: int, num_classes: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """[K, C] counts: column c splits class c's samples by a fresh Dir(alpha * 1_K) draw."""
    class_sizes = np.bincount(labels, minlength=num_classes)
    counts = np.zeros((num_agents, num_classes), dtype=np.int64)
    for label, size in enumerate(class_sizes):
        counts[:, label] = _proportional_counts(int(size), rng.dirichlet(np.full(num_agents, alpha)))
    return counts


def _per_client_counts(
    labels: np.ndarray, num_agents: int, num_classes: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """[K, C] counts: agent by agent, N // K samples by p_i ~ Dir(alpha * prior), without replacement.

    Drawing by p_i and redrawing what lands on an exhausted class from p_i renormalised over the
    classes left is the same as sampling one by one from the renormalised p_i. An agent whose
    classes are all exhausted takes the rest in proportion to what is left.
    """
    class_sizes = np.bincount(labels, minlength=num_classes)
    present = class_sizes > 0
    prior = class_sizes[present] / len(labels)
    left = class_sizes.copy()
    counts = np.zeros((num_agents, num_classes), dtype=np.int64)
    for agent in range(num_agents):
        proportions = np.zeros(num_classes)
        proportions[present] = rng.dirichlet(alpha * prior)
        needed = len(labels) // num_agents
        while needed > 0:
            weights = np.where(left > 0, proportions, 0.0)
            if weights.sum() == 0:
                weights = left.astype(np.float64)
            taken = np.minimum(rng.multinomial(needed, weights / weights.sum()), left)
            counts[agent] += taken
            left -= taken
            needed -= int(taken.sum())
    return counts


DIRICHLET_VARIANTS: dict[str, Callable[[np.ndarray, int, int, float, np.random.Generator], np.ndarray]] = {
    "per_class": _per_class_counts,
    "per_client": _per_client_counts,
}
"""variant name -> function drawing the [K, C] class-count matrix."""


def _draw_by_counts(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint random index arrays: agent k gets counts[k, c] samples of class c, without replacement."""
    num_agents, num_classes = counts.shape
    by_class = np.argsort(labels, kind="stable")
    class_pools = np.split(by_class, np.cumsum(np.bincount(labels, minlength=num_classes))[:-1])
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_agents)]
    for label, pool in enumerate(class_pools):
        column = counts[:, label]
        chunks = np.split(rng.permutation(pool)[: column.sum()], np.cumsum(column)[:-1])
        for agent, chunk in enumerate(chunks):
            pieces[agent].append(chunk)
    return [np.concatenate(agent_pieces) for agent_pieces in pieces]


def _even_split(total: int, parts: int, turn: int) -> np.ndarray:
    """`total` split into `parts` near-equal integers; the remainder's +1s go round-robin by `turn`.

    Successive turns (agents) place their extra samples on successive parts (classes), so the
    extra demand is spread evenly over classes instead of piling onto the first ones.
    """
    remainder = total % parts
    shares = np.full(parts, total // parts, dtype=np.int64)
    shares[(turn * remainder + np.arange(remainder)) % parts] += 1
    return shares


def _proportional_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Non-negative integers summing to `total`, proportional to `proportions` (rounded cumulatively)."""
    cuts = np.round(np.cumsum(proportions) * total).astype(np.int64)
    cuts[-1] = total
    return np.diff(cuts, prepend=0)
