"""Sweep comparison: group runs by the settings that differ, summarise each group over seeds.

    python scripts/aggregate.py multirun/2026-11-22/10-00-00 [more dirs] --out docs/results/headline

The inputs are run directories or directories holding them (Hydra multirun folders, several
sweeps at once). The swept keys are the keys of the resolved config (config.yaml) whose
values differ between the completed runs, leaving out `seed` and the keys that do not change
results (NOT_SETTINGS, plus --ignore). Runs that agree on every swept key form one group and
their seeds are its repetitions. Grouping by config rather than by command-line overrides
means runs launched differently (an experiment file, separate sweeps) still compare by what
they ran. Writes into OUT:

    comparison.md    the table: per head, final shared/private accuracy as mean ± std over seeds
    comparison.csv   the same with separate mean/std columns, seeds and run directories
    plots/final_accuracy.png, plots/accuracy_vs_round.png

Std is the sample standard deviation over seeds (ddof=1); a group of one seed shows none.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.reporting import plots
from sim.reporting.rundir import Run, find_runs, load_run

NOT_SETTINGS = ("seed", "logger", "debug", "resume", "checkpoint_every", "checkpoint_keep", "data.root")
METRICS = ("shared_acc", "private_acc")
ABSENT = "–"  # a swept key that a group's config does not have (e.g. topology.num_islands of a ring)
MarkdownTable = tuple[list[str], list[list[str]]]


@dataclass(frozen=True)
class Group:
    """Runs that differ only in their seed (and in keys that do not change results)."""

    settings: dict[str, str]  # swept key -> the group's value, as text
    runs: list[Run]

    @property
    def label(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.settings.items()) or "all runs"

    @property
    def heads(self) -> list[str]:
        """The heads every run of the group has (runs pooled by --ignore may differ)."""
        heads = [set(run.summary["final"]["heads"]) for run in self.runs]
        return [head for head in self.runs[0].summary["final"]["heads"] if all(head in h for h in heads)]

    def final(self, head: str, metric: str) -> tuple[float, float]:
        """(mean, std) over seeds of the final `metric` of `head` (mean over agents per run)."""
        return mean_std([run.summary["final"]["heads"][head][metric] for run in self.runs])

    def mean_of(self, key: str) -> float:
        return float(np.mean([run.summary[key] for run in self.runs]))


@dataclass(frozen=True)
class Comparison:
    keys: list[str]  # the swept keys, in config order
    groups: list[Group]  # in sweep order (the first run of each group)
    skipped: list[Run]  # runs that did not complete: failed or interrupted

    @property
    def heads(self) -> list[str]:
        """Every group's heads, the longest head list first (main, aux1, aux2, ...)."""
        heads: list[str] = []
        for group in sorted(self.groups, key=lambda g: -len(g.heads)):
            heads += [head for head in group.heads if head not in heads]
        return heads


def compare(directories: Sequence[Path], ignore: Iterable[str] = ()) -> Comparison:
    """Load every run under `directories` and group the completed ones by their swept keys."""
    runs = [load_run(path) for path in find_runs(directories)]
    completed = [run for run in runs if run.completed]
    if not completed:
        found = f"{len(runs)} runs, none completed" if runs else "no run directories"
        raise ConfigError("RUN_DIR_OR_SWEEP_DIR", " ".join(map(str, directories)), f"completed runs ({found})")
    ignored = (*NOT_SETTINGS, *ignore)
    keys = swept_keys([flat_config(run) for run in completed], ignored)
    return Comparison(keys, group_runs(completed, keys), [run for run in runs if not run.completed])


def flat_config(run: Run) -> dict[str, str]:
    """The run's config as `a.b.c -> value as text` (lists and values as JSON, like YAML reads)."""
    flat: dict[str, str] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, str) else json.dumps(node)

    visit(run.config, "")
    return flat


def swept_keys(configs: Sequence[dict[str, str]], ignored: Sequence[str]) -> list[str]:
    """Keys with two or more distinct values among the runs that have them, in config order."""
    keys: list[str] = []
    for config in configs:
        keys += [key for key in config if key not in keys]
    return [
        key
        for key in keys
        if not _ignored(key, ignored) and len({config[key] for config in configs if key in config}) > 1
    ]


def _ignored(key: str, ignored: Sequence[str]) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in ignored)


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        config = flat_config(run)
        groups.setdefault(tuple(config.get(key, ABSENT) for key in keys), []).append(run)
    return [Group(dict(zip(keys, values, strict=True)), members) for values, members in groups.items()]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1); std is NaN for a single value (one seed says nothing about spread)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _pm(stat: tuple[float, float]) -> str:
    mean, std = stat
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def table(comparison: Comparison) -> MarkdownTable:
    """Header and rows of the comparison table, as text cells (shared by markdown and HTML)."""
    heads = comparison.heads
    header = [*(comparison.keys or ["configuration"]), "seeds"]
    header += [f"{head} {metric.removesuffix('_acc')}" for head in heads for metric in METRICS]
    header += ["MB sent", "wall s"]
    rows = []
    for group in comparison.groups:
        row = [*(group.settings.values() if comparison.keys else [group.label]), str(len(group.runs))]
        row += [_pm(group.final(h, m)) if h in group.heads else ABSENT for h in heads for m in METRICS]
        row += [f"{group.mean_of('comm_bytes_total') / 1e6:.2f}", f"{group.mean_of('wall_time_s'):.0f}"]
        rows.append(row)
    return header, rows


def markdown(comparison: Comparison) -> str:
    header, rows = table(comparison)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", "Accuracy: final, mean over agents; ± is the sample std over seeds. MB and seconds: mean over seeds."]
    return "\n".join(lines) + "\n"


def write_csv(comparison: Comparison, path: Path) -> None:
    """One row per group: settings, seeds, per-head mean/std, time, bytes and run directories."""
    heads = comparison.heads
    columns = [*comparison.keys, "n_seeds", "seeds"]
    columns += [f"{h}_{m}_{s}" for h in heads for m in METRICS for s in ("mean", "std")]
    columns += ["wall_time_s_mean", "comm_bytes_total_mean", "comm_bytes_per_round_mean", "run_dirs"]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for group in comparison.groups:
            row: list[Any] = [*group.settings.values(), len(group.runs), " ".join(_seeds(group))]
            for head in heads:
                for metric in METRICS:
                    stats = group.final(head, metric) if head in group.heads else (math.nan, math.nan)
                    row += ["" if math.isnan(value) else f"{value:.6f}" for value in stats]
            row.append(f"{group.mean_of('wall_time_s'):.2f}")
            row += [f"{group.mean_of(key):.0f}" for key in ("comm_bytes_total", "comm_bytes_per_round")]
            row.append(" ".join(str(run.directory) for run in group.runs))
            writer.writerow(row)


def _seeds(group: Group) -> list[str]:
    return [str(run.summary.get("seed", run.config.get("seed"))) for run in group.runs]


def series(group: Group) -> plots.GroupSeries:
    """The group's final numbers and curves (evaluation rounds every seed has) for the sweep plots."""
    common = set.intersection(*({record["round"] for record in run.evaluations} for run in group.runs))
    rounds = sorted(common)
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for head in group.heads:
        curves[head] = {}
        for metric in METRICS:
            values = np.array(
                [[r["heads"][head][metric] for r in run.evaluations if r["round"] in common] for run in group.runs]
            )  # [seeds, rounds]
            std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(rounds))
            curves[head][metric] = (values.mean(axis=0), std)
    final = {head: {metric: group.final(head, metric) for metric in METRICS} for head in group.heads}
    return plots.GroupSeries(group.label, len(group.runs), final, rounds, curves)


def write_comparison(comparison: Comparison, out: Path) -> list[Path]:
    """comparison.md, comparison.csv and the two sweep plots into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(markdown(comparison))
    write_csv(comparison, out / "comparison.csv")
    groups = [series(group) for group in comparison.groups]
    return [
        out / "comparison.md",
        out / "comparison.csv",
        plots.save(plots.final_accuracy_bars(groups, comparison.heads), out / "plots" / "final_accuracy.png"),
        plots.save(plots.group_accuracy_curves(groups), out / "plots" / "accuracy_vs_round.png"),
    ]


def describe_skipped(comparison: Comparison) -> list[str]:
    return [f"{run.directory}: {run.summary.get('status', 'unknown')}" for run in comparison.skipped]


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Bad paths end the command with one line on stderr and exit code 2, as in `mhd-sim`."""
    try:
        yield
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


def parser(prog: str) -> argparse.ArgumentParser:
    """The arguments shared by scripts/aggregate.py and mhd-sim-report."""
    parsed = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0] if __doc__ else None)
    parsed.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR_OR_SWEEP_DIR")
    parsed.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="a config key (or prefix, e.g. runtime) whose differences do not split groups; repeatable",
    )
    return parsed


def main(argv: Sequence[str] | None = None) -> None:
    """scripts/aggregate.py: the comparison table and plots of one or more sweeps into --out."""
    arguments = parser("aggregate.py")
    arguments.add_argument("--out", type=Path, required=True, help="folder for comparison.md/.csv and plots/")
    args = arguments.parse_args(argv)
    with one_line_errors("aggregate.py"):
        comparison = compare(args.paths, args.ignore)
    for line in describe_skipped(comparison):
        print(f"skipped (not completed): {line}", file=sys.stderr)
    for path in write_comparison(comparison, args.out):
        print(path)
    print(markdown(comparison))
