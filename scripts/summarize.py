"""Table of a sweep's results: one row per configuration, mean ± std over seeds.

    python scripts/summarize.py multirun/2026-11-22/10-00-00 [more sweep dirs] [--out table.md]

Reads every `*/summary.json` with its `.hydra/overrides.yaml` under the given directories,
groups runs by their overrides minus `seed`, and prints a markdown table of per-head shared
and private accuracy, communication and wall time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

IGNORED_OVERRIDES = ("seed=", "hydra.", "logger.", "runtime.", "data.root=")


def load_runs(directories: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Completed summaries grouped by the overrides that define the configuration."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for directory in directories:
        for summary_path in sorted(directory.glob("**/summary.json")):
            summary = json.loads(summary_path.read_text())
            if summary.get("status") != "completed":
                continue
            overrides = yaml.safe_load((summary_path.parent / ".hydra" / "overrides.yaml").read_text()) or []
            key = " ".join(o for o in overrides if not o.startswith(IGNORED_OVERRIDES)) or "(defaults)"
            groups[key].append(summary)
    return groups


def _mean_std(values: list[float]) -> str:
    array = np.array(values)
    return f"{array.mean():.3f} ± {array.std():.3f}" if len(array) > 1 else f"{array.mean():.3f}"


def table(groups: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| configuration | seeds | main shared | main private | last head | last shared | last private "
        "| MB sent | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in groups.items():
        heads = [run["final"]["heads"] for run in runs]
        last = list(heads[0])[-1]
        cells = [
            key,
            str(len(runs)),
            _mean_std([h["main"]["shared_acc"] for h in heads]),
            _mean_std([h["main"]["private_acc"] for h in heads]),
            last,
            _mean_std([h[last]["shared_acc"] for h in heads]),
            _mean_std([h[last]["private_acc"] for h in heads]),
            f"{np.mean([run['comm_bytes_total'] for run in runs]) / 1e6:.2f}",
            f"{np.mean([run['wall_time_s'] for run in runs]):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    text = table(load_runs(args.directories))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
