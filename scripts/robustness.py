"""Robustness grid: MHD against isolated and central on settings nobody tuned it on.

    python scripts/robustness.py --design                              # print the 24 cells and their balance
    python scripts/robustness.py --half tuning                         # run every tuning cell (resumes)
    python scripts/robustness.py --half validation --data-root-mnist PATH/TO/mnist \\
        --data-root-fashion-mnist PATH/TO/fashion-mnist
    python scripts/robustness.py --cells 0,3,7 --seeds 0 1 --out robustness -- rounds=60
    python scripts/robustness.py --table                               # only rebuild the table from what exists
    python scripts/robustness.py --half tuning --methods mhd --out variant -- method.nu_main=0.25   # a variant

The full product of the four factors (3 datasets x 6 partitions x 4 graphs x 3 population sizes
= 216 settings, each run three times: MHD, isolated, central) does not fit a 2-core machine. The
grid is a covering subset of 24 cells, chosen by `design()`:

* every (partition, graph) pair appears exactly once (6 x 4 = 24 cells), so those two factors
  are crossed completely;
* dataset, K and the tuning/validation half are then assigned to the 24 cells so that every
  level of every factor appears equally often (dataset 8, K 8, half 12 each) and every pair of
  levels of two factors as evenly as 24 cells allow (e.g. every (dataset, graph) pair twice,
  every (dataset, K) pair 2 or 3 times, every (partition, K) pair once or twice, every half
  holds 2 cells of each partition, 3 of each graph, 4 of each dataset and of each K).

No orthogonal array of strength 2 exists for this mix in 24 runs (6 x 3 levels would need a
multiple of 18), so the assignment minimises the sum over all pairs of factors of the squared
deviation of every level pair's count from its ideal (a near-orthogonal design), by a local
search from a fixed seed: the design is the same on every machine and every run. The tuning
half is the one on which defaults may be chosen; the validation half runs once, with the final
defaults.

Each cell runs `mhd`, `isolated` and `central` with the shipped defaults of conf/ plus the
cell's four settings (and any overrides given after `--`), one run at a time, in-process, each
into OUT/runs/cNN/METHOD/seedS/. A run whose summary.json says "completed" is not run again,
so an interrupted grid continues where it stopped. The table (OUT/robustness.md and
OUT/robustness.json) is rebuilt from every completed run after each one.

The target, per cell where isolated training leaves room (isolated shared accuracy < 0.75): the
best MHD head's shared accuracy >= isolated's + 0.15, and the MHD main head's private accuracy
>= isolated's - 0.01 (means over the seeds that ran).

MNIST and Fashion-MNIST are read from `--data-root-mnist` / `--data-root-fashion-mnist`, or from
the folder named by the MHD_SIM_DATA environment variable (holding `mnist/` and
`fashion-mnist/`). Cells whose data folder is not given are skipped and listed as not run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

DATASETS = ("digits", "mnist", "fashion_mnist")
PARTITIONS = ("label_skew_0.5", "label_skew_0.9", "label_skew_1.0", "dirichlet_0.1", "dirichlet_0.5", "per_client_0.3")
GRAPHS = ("ring", "watts_strogatz", "erdos_renyi", "complete")
POPULATIONS = (8, 16, 32)
HALVES = ("tuning", "validation")
FACTORS: dict[str, tuple[Any, ...]] = {
    "dataset": DATASETS,
    "partition": PARTITIONS,
    "graph": GRAPHS,
    "num_agents": POPULATIONS,
    "half": HALVES,
}

PARTITION_OVERRIDES: dict[str, list[str]] = {
    "label_skew_0.5": ["partition=label_skew", "partition.skew=0.5"],
    "label_skew_0.9": ["partition=label_skew", "partition.skew=0.9"],
    "label_skew_1.0": ["partition=label_skew", "partition.skew=1.0"],
    "dirichlet_0.1": ["partition=dirichlet", "partition.variant=per_class", "partition.alpha=0.1"],
    "dirichlet_0.5": ["partition=dirichlet", "partition.variant=per_class", "partition.alpha=0.5"],
    "per_client_0.3": ["partition=dirichlet", "partition.variant=per_client", "partition.alpha=0.3"],
}
DATA_FOLDERS = {"mnist": "mnist", "fashion_mnist": "fashion-mnist"}  # under MHD_SIM_DATA
DATA_ENV = "MHD_SIM_DATA"
METHODS = ("mhd", "isolated", "central")
ROOM = 0.75  # the target applies where isolated shared accuracy is below this
SHARED_GAIN = 0.15  # best MHD head shared >= isolated shared + this
PRIVATE_SLACK = 0.01  # MHD main private >= isolated private - this
DESIGN_SEED = 0
SEARCH_RESTARTS = 20
SEARCH_SWEEPS = 200


class Cell(NamedTuple):
    index: int
    dataset: str
    partition: str
    graph: str
    num_agents: int
    half: str

    @property
    def name(self) -> str:
        return f"c{self.index:02d}"

    def label(self) -> str:
        return f"{self.dataset} {self.partition} {self.graph} K={self.num_agents}"


# ---- the design ------------------------------------------------------------------------------


def imbalance(rows: Sequence[dict[str, Any]]) -> float:
    """Sum over factors and pairs of factors of the squared deviation of level counts from the ideal.

    Zero only for an orthogonal array; what `design` minimises.
    """
    total = 0.0
    names = list(FACTORS)
    for name in names:
        counts = Counter(row[name] for row in rows)
        ideal = len(rows) / len(FACTORS[name])
        total += sum((counts[level] - ideal) ** 2 for level in FACTORS[name])
    for a, b in itertools.combinations(names, 2):
        counts = Counter((row[a], row[b]) for row in rows)
        ideal = len(rows) / (len(FACTORS[a]) * len(FACTORS[b]))
        total += sum((counts[pair] - ideal) ** 2 for pair in itertools.product(FACTORS[a], FACTORS[b]))
    return total


@functools.cache
def design(seed: int = DESIGN_SEED) -> tuple[Cell, ...]:
    """The 24 cells: partition x graph crossed, dataset, K and half assigned by a seeded local search.

    Each restart deals every free factor's levels out equally (8 datasets each, ...) in a random
    order over the 24 (partition, graph) cells, then swaps the values of one free factor between
    two cells whenever that lowers `imbalance` (a swap keeps every level's count), until no swap
    helps; the best restart is kept (ties: the first).
    """
    rng = random.Random(seed)
    free = ("dataset", "num_agents", "half")
    base = [{"partition": p, "graph": g} for p in PARTITIONS for g in GRAPHS]
    best: list[dict[str, Any]] | None = None
    best_score = float("inf")
    for _ in range(SEARCH_RESTARTS):
        rows = [dict(cell) for cell in base]
        for name in free:
            levels = [FACTORS[name][i % len(FACTORS[name])] for i in range(len(rows))]
            rng.shuffle(levels)
            for row, level in zip(rows, levels, strict=True):
                row[name] = level
        score = imbalance(rows)
        for _ in range(SEARCH_SWEEPS):
            improved = False
            for name, (i, j) in itertools.product(free, itertools.combinations(range(len(rows)), 2)):
                if rows[i][name] == rows[j][name]:
                    continue
                rows[i][name], rows[j][name] = rows[j][name], rows[i][name]
                trial = imbalance(rows)
                if trial < score - 1e-9:
                    score, improved = trial, True
                else:
                    rows[i][name], rows[j][name] = rows[j][name], rows[i][name]
            if not improved:
                break
        if score < best_score - 1e-9:
            best, best_score = [dict(row) for row in rows], score
        if as_even_as_possible(rows):
            break
    assert best is not None
    return tuple(Cell(index, **row) for index, row in enumerate(best))


def as_even_as_possible(rows: Sequence[dict[str, Any]]) -> bool:
    """Every level, and every pair of levels of two factors, appears floor or ceil of its ideal count.

    No design of this size can be more even, so the search stops at the first that is.
    """
    names = list(FACTORS)
    groups = [(name,) for name in names] + list(itertools.combinations(names, 2))
    for group in groups:
        counts = Counter(tuple(row[name] for name in group) for row in rows)
        levels = list(itertools.product(*(FACTORS[name] for name in group)))
        ideal = len(rows) / len(levels)
        if any(not math.floor(ideal) <= counts[level] <= math.ceil(ideal) for level in levels):
            return False
    return True


def pair_counts(cells: Iterable[Cell], a: str, b: str) -> Counter[tuple[Any, Any]]:
    """How often each pair of levels of factors `a` and `b` appears."""
    return Counter((getattr(cell, a), getattr(cell, b)) for cell in cells)


def describe_design(cells: Sequence[Cell]) -> str:
    """The cells and, per pair of factors, the range of level-pair counts (a balance report)."""
    lines = ["| cell | half | dataset | partition | graph | K |", "|---|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.half} | {c.dataset} | {c.partition} | {c.graph} | {c.num_agents} |" for c in cells]
    lines.append("")
    for name in FACTORS:
        counts = Counter(getattr(cell, name) for cell in cells)
        lines.append(f"{name}: " + ", ".join(f"{level}={counts[level]}" for level in FACTORS[name]))
    for a, b in itertools.combinations(FACTORS, 2):
        counts = pair_counts(cells, a, b)
        values = [counts[pair] for pair in itertools.product(FACTORS[a], FACTORS[b])]
        lines.append(f"{a} x {b}: every pair {min(values)}-{max(values)} times")
    return "\n".join(lines)


# ---- running ---------------------------------------------------------------------------------


def data_roots(mnist: str | None, fashion_mnist: str | None) -> dict[str, str]:
    """Dataset name -> data.root: the flags first, then MHD_SIM_DATA/<folder>; digits needs none."""
    given = {"mnist": mnist, "fashion_mnist": fashion_mnist}
    parent = os.environ.get(DATA_ENV)
    roots = {}
    for dataset, folder in DATA_FOLDERS.items():
        root = given[dataset] or (str(Path(parent) / folder) if parent else None)
        if root is not None:
            roots[dataset] = root
    return roots


def cell_overrides(cell: Cell, method: str, seed: int, roots: dict[str, str]) -> list[str]:
    """The Hydra overrides of one run of a cell: the cell's four settings on the shipped defaults."""
    overrides = [f"data={cell.dataset}"]
    if cell.dataset in DATA_FOLDERS:
        overrides.append(f"data.root={roots[cell.dataset]}")
    return [
        *overrides,
        *PARTITION_OVERRIDES[cell.partition],
        f"topology={cell.graph}",
        f"num_agents={cell.num_agents}",
        f"method={method}",
        f"seed={seed}",
    ]


def run_dir(out: Path, cell: Cell, method: str, seed: int) -> Path:
    return out / "runs" / cell.name / method / f"seed{seed}"


def completed_summary(path: Path) -> dict[str, Any] | None:
    """The run's summary.json when it completed, else None (missing, failed or interrupted)."""
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    return summary if summary.get("status") == "completed" else None


def run_one(overrides: list[str], path: Path) -> dict[str, Any]:
    """One simulation in this process (the caller runs them one at a time)."""
    from sim.run.main import run
    from sim.run.preflight import compose_config

    cfg = compose_config(overrides)
    if path.exists():  # an earlier attempt that did not complete: start it afresh
        for stale in ("summary.json", "metrics.jsonl", "rounds.jsonl"):
            (path / stale).unlink(missing_ok=True)
    return run(cfg, path)


# ---- the table -------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def cell_row(cell: Cell, summaries: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One table row from the completed summaries of a cell, per method (means over seeds).

    The best head is the MHD head with the highest mean shared accuracy over seeds. Missing
    methods leave their columns None and the target unchecked.
    """
    row: dict[str, Any] = {**cell._asdict(), "cell": cell.name}
    mhd = summaries.get("mhd", [])
    if mhd:
        heads = mhd[0]["final"]["heads"]
        shared = {head: _mean([s["final"]["heads"][head]["shared_acc"] for s in mhd]) for head in heads}
        best = max(shared, key=lambda head: shared[head])
        row.update(
            mhd_seeds=[int(s["seed"]) for s in mhd],
            mhd_main_shared=shared["main"],
            mhd_main_private=_mean([s["final"]["heads"]["main"]["private_acc"] for s in mhd]),
            mhd_best_head=best,
            mhd_best_shared=shared[best],
            mhd_best_private=_mean([s["final"]["heads"][best]["private_acc"] for s in mhd]),
            still_rising=any(bool(s.get("convergence", {}).get("still_rising")) for s in mhd),
            mhd_wall_s=_mean([s["wall_time_s"] for s in mhd]),
        )
    for method in ("isolated", "central"):
        runs = summaries.get(method, [])
        if runs:
            row[f"{method}_shared"] = _mean([s["final"]["heads"]["main"]["shared_acc"] for s in runs])
            row[f"{method}_private"] = _mean([s["final"]["heads"]["main"]["private_acc"] for s in runs])
            row[f"{method}_wall_s"] = _mean([s["wall_time_s"] for s in runs])
            row[f"{method}_seeds"] = [int(s["seed"]) for s in runs]
    row.update(target_check(row))
    return row


def target_check(row: dict[str, Any]) -> dict[str, Any]:
    """Whether the cell has room (isolated shared < ROOM) and, if so, whether MHD met the target."""
    needed = ("mhd_best_shared", "mhd_main_private", "isolated_shared", "isolated_private")
    if any(row.get(key) is None for key in needed):
        return {"target": "not run"}
    if row["isolated_shared"] >= ROOM:
        return {"target": "no room"}
    shared_ok = row["mhd_best_shared"] >= row["isolated_shared"] + SHARED_GAIN - 1e-9
    private_ok = row["mhd_main_private"] >= row["isolated_private"] - PRIVATE_SLACK - 1e-9
    misses = [name for name, ok in (("shared", shared_ok), ("private", private_ok)) if not ok]
    return {"target": "met" if not misses else "missed: " + ", ".join(misses)}


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if key.endswith("_wall_s") else f"{value:.3f}"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


COLUMNS = (
    ("cell", "cell"),
    ("half", "half"),
    ("dataset", "dataset"),
    ("partition", "partition"),
    ("graph", "graph"),
    ("num_agents", "K"),
    ("mhd_main_shared", "MHD main shared"),
    ("mhd_main_private", "MHD main private"),
    ("mhd_best_head", "best head"),
    ("mhd_best_shared", "best shared"),
    ("mhd_best_private", "best private"),
    ("isolated_shared", "isolated shared"),
    ("isolated_private", "isolated private"),
    ("central_shared", "central shared"),
    ("still_rising", "MHD still rising"),
    ("mhd_seeds", "seeds"),
    ("mhd_wall_s", "MHD s"),
    ("isolated_wall_s", "isolated s"),
    ("central_wall_s", "central s"),
    ("target", "target"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row.get(key), key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def collect(out: Path, cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """A row per cell from every completed run under OUT/runs (any seeds)."""
    rows = []
    for cell in cells:
        summaries: dict[str, list[dict[str, Any]]] = {}
        for method in METHODS:
            for path in sorted((out / "runs" / cell.name / method).glob("seed*")):
                summary = completed_summary(path)
                if summary is not None:
                    summary["seed"] = int(path.name.removeprefix("seed"))
                    summaries.setdefault(method, []).append(summary)
        rows.append(cell_row(cell, summaries))
    return rows


def write_table(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.md").write_text(markdown_table(rows))
    (out / "robustness.json").write_text(json.dumps(list(rows), indent=1) + "\n")


# ---- command line ----------------------------------------------------------------------------


def select(cells: Sequence[Cell], indices: str | None, half: str | None, datasets: Sequence[str] | None) -> list[Cell]:
    chosen = list(cells)
    if indices:
        wanted = {int(part) for part in indices.split(",")}
        chosen = [cell for cell in chosen if cell.index in wanted]
    if half:
        chosen = [cell for cell in chosen if cell.half == half]
    if datasets:
        chosen = [cell for cell in chosen if cell.dataset in datasets]
    return chosen


def run_grid(
    cells: Sequence[Cell],
    seeds: Sequence[int],
    out: Path,
    roots: dict[str, str],
    extra: Sequence[str],
    methods: Sequence[str] = METHODS,
) -> list[str]:
    """Every missing run of `cells`, one at a time; returns the runs skipped for want of data."""
    skipped = []
    all_cells = design()
    for cell, seed, method in itertools.product(cells, seeds, methods):
        if cell.dataset in DATA_FOLDERS and cell.dataset not in roots:
            skipped.append(f"{cell.name} ({cell.dataset}: no data root)")
            continue
        path = run_dir(out, cell, method, seed)
        if completed_summary(path) is not None:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {cell.name} {cell.label()} {method} seed {seed}", flush=True)
        run_one([*cell_overrides(cell, method, seed, roots), *extra], path)
        write_table(out, collect(out, all_cells))
    return sorted(set(skipped))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", action="store_true", help="print the cells and their balance, run nothing")
    parser.add_argument("--table", action="store_true", help="rebuild the table from completed runs, run nothing")
    parser.add_argument("--cells", help="comma-separated cell indices (default: all)")
    parser.add_argument("--half", choices=HALVES)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="e.g. only mhd for a variant"
    )
    parser.add_argument("--out", type=Path, default=Path("robustness"))
    parser.add_argument("--data-root-mnist")
    parser.add_argument("--data-root-fashion-mnist")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for every run, after --")
    args = parser.parse_args(argv)
    extra = args.extra
    cells = design()
    if args.design:
        print(describe_design(cells))
        return
    chosen = select(cells, args.cells, args.half, args.datasets)
    skipped: list[str] = []
    if not args.table:
        roots = data_roots(args.data_root_mnist, args.data_root_fashion_mnist)
        skipped = run_grid(chosen, args.seeds, args.out, roots, ["runtime.backend=serial", *extra], args.methods)
    rows = collect(args.out, cells)
    write_table(args.out, rows)
    print(markdown_table([row for row in rows if row["cell"] in {cell.name for cell in chosen}]))
    for line in skipped:
        print(f"not run: {line}")


if __name__ == "__main__":
    main()
