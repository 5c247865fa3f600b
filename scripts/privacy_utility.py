"""Privacy-utility study: final main-head accuracy of several settings of one base config, in a table.

    python scripts/privacy_utility.py --set none privacy=none --set "eps 8" privacy=dp_sgd \\
        privacy.noise_multiplier=null privacy.target_epsilon=8 -- num_agents=4
    python scripts/privacy_utility.py --epsilons 1 2 4 8 --out curve.json --plot curve.png -- num_agents=4

Each setting is one serial run (`mhd-sim` with the base overrides after `--`, then the setting's
own), one after another. The table has every setting's largest epsilon (DP-SGD, at the config's
delta; output mechanisms report theirs in summary.json), the final main head's shared and private
accuracy (mean over agents, whole test set) and the aux heads' mean shared accuracy, and the
wall time. A run that diverges is a row that says so: too much noise for the optimizer is a
result, not a crash. The JSON keeps each run's summary facts. `--plot` draws the curve: shared
and private accuracy against the largest epsilon of each DP-SGD run, with the no-privacy run as
horizontal lines (settings without an epsilon, such as output mechanisms, are left out of it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agents.agent import TrainingDivergedError
from sim.run.main import run
from sim.run.preflight import compose_config


class Setting(NamedTuple):
    label: str
    overrides: list[str]


def epsilon_settings(epsilons: Sequence[float]) -> list[Setting]:
    """No privacy, then DP-SGD calibrated to each target epsilon (the curve)."""
    dp = ["privacy=dp_sgd", "privacy.noise_multiplier=null"]
    return [Setting("none", ["privacy=none"])] + [
        Setting(f"dp_sgd eps={eps:g}", [*dp, f"privacy.target_epsilon={eps}"]) for eps in epsilons
    ]


def run_setting(setting: Setting, base: Sequence[str]) -> dict[str, Any]:
    """One run; its accuracies, epsilon and wall time, or why it diverged."""
    cfg = compose_config([*base, *setting.overrides])
    start = time.perf_counter()
    row: dict[str, Any] = {"setting": setting.label, "overrides": setting.overrides}
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            summary = run(cfg, Path(run_dir))
        except TrainingDivergedError as error:
            row["diverged"] = str(error)
            row["wall_s"] = time.perf_counter() - start
            return row
    heads = summary["final"]["heads"]
    aux = [head["shared_acc"] for name, head in heads.items() if name != "main"]
    privacy = summary.get("privacy", {})
    epsilons = [value for value in (privacy.get("epsilon") or {}).values() if value is not None]
    row.update(
        shared=heads["main"]["shared_acc"],
        private=heads["main"]["private_acc"],
        aux_shared=sum(aux) / len(aux) if aux else None,
        epsilon_max=max(epsilons) if epsilons else None,
        privacy=privacy,
        wall_s=time.perf_counter() - start,
    )
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'setting':<28} {'eps':>7} {'shared':>7} {'private':>7} {'aux':>7} {'wall_s':>7}"]
    for row in rows:
        if "diverged" in row:
            lines.append(f"{row['setting']:<28} diverged: {row['diverged']}")
            continue
        cells = [
            "-" if row[key] is None else f"{row[key]:.{digits}f}"
            for key, digits in (("epsilon_max", 2), ("shared", 3), ("private", 3), ("aux_shared", 3))
        ]
        lines.append(f"{row['setting']:<28} " + " ".join(f"{cell:>7}" for cell in cells) + f" {row['wall_s']:>7.0f}")
    return "\n".join(lines)


def plot_curve(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy against epsilon (log scale) for the runs that report one; `none` as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted((row for row in rows if row.get("epsilon_max") is not None), key=lambda row: row["epsilon_max"])
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for key, colour in (("shared", "tab:blue"), ("private", "tab:orange")):
        axis.plot([row["epsilon_max"] for row in curve], [row[key] for row in curve], "o-", color=colour, label=key)
        for row in rows:
            if row["setting"] == "none" and "diverged" not in row:
                axis.axhline(row[key], color=colour, linestyle="--", linewidth=1, label=f"{key}, no privacy")
    if curve:  # a log axis needs a positive epsilon to show
        axis.set_xscale("log")
        axis.set_xticks([row["epsilon_max"] for row in curve], [f"{row['epsilon_max']:.3g}" for row in curve])
        axis.minorticks_off()
    axis.set_xlabel("epsilon (largest over agents, at the configured delta)")
    axis.set_ylabel("main-head accuracy (mean over agents)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar=("LABEL", "OVERRIDE"))
    parser.add_argument("--epsilons", type=float, nargs="*", default=[], help="none, then DP-SGD at each")
    parser.add_argument("--out", type=Path, default=Path("privacy_utility.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG of accuracy against epsilon")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every setting, e.g. num_agents=4")
    args = parser.parse_args(argv)
    base = ["logger.progress=false", "logger.report=false", "runtime.backend=serial", *args.overrides]
    plan = [Setting(label, list(overrides)) for label, *overrides in args.set]
    plan += epsilon_settings(args.epsilons) if args.epsilons else []
    rows = []
    for setting in plan:
        print(f"running {setting.label} ...", file=sys.stderr, flush=True)
        rows.append(run_setting(setting, base))
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    args.out.write_text(json.dumps({"overrides": base, "results": rows}, indent=2, default=str) + "\n")
    print(table(rows))
    print(f"written: {args.out}")
    if args.plot is not None:
        plot_curve(rows, args.plot)
        print(f"written: {args.plot}")


if __name__ == "__main__":
    main()
