"""`mhd-sim-report`: a report page with plots for a run, or for every run of a sweep plus its comparison.

    mhd-sim-report RUN_DIR                                  # RUN_DIR/report.html + RUN_DIR/plots/*.png
    mhd-sim-report SWEEP_DIR                                # every run's report, and in SWEEP_DIR:
                                                            #   report.html, comparison.md/.csv, plots/
    mhd-sim-report SWEEP_DIR [SWEEP_DIR ...] --out DIR      # several sweeps compared in DIR

A run writes its own report when it completes (`logger.report`); this command is for runs
from before, and for sweeps. The page is static HTML that references PNGs by relative path,
so a run directory can be copied, zipped or opened offline and still shows everything.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sim.core.errors import ConfigError
from sim.reporting import plots
from sim.reporting.aggregate import (
    Comparison,
    compare,
    describe_skipped,
    one_line_errors,
    parser,
    table,
    write_comparison,
)
from sim.reporting.loggers import privacy_line
from sim.reporting.rundir import Run, is_run_dir, load_run, read_partition

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
.facts td:first-child { font-weight: 600; }
"""
SPREAD = ("", "_min", "_max")  # the mean, min and max over agents in summary.json's head rows


@dataclass(frozen=True)
class RunFigure:
    file: str  # under plots/
    caption: str
    draw: Callable[[Run], Figure]
    applies: Callable[[Run], bool] = lambda run: True  # drawn only for the runs it applies to
    # The same figure from files a run writes before its first round, for `render_early`; None: needs the results.
    early: Callable[[Path], Figure] | None = None


def _figures(run: Run) -> list[RunFigure]:
    return [figure for figure in RUN_FIGURES if figure.applies(run)]


def _main_shared(run: Run) -> dict[int, float]:
    return {agent: heads["main"]["shared_acc"] for agent, heads in run.final_per_agent().items()}


RUN_FIGURES = (
    RunFigure(
        "accuracy.png",
        "Shared and private accuracy of every head vs round (mean over agents; band: min to max).",
        lambda run: plots.accuracy_curves(run.evaluations),
    ),
    RunFigure(
        "private_vs_shared.png",
        "Final accuracy per agent: above the diagonal an agent is better on its own class mix than on all classes.",
        lambda run: plots.private_vs_shared(run.final_per_agent()),
    ),
    RunFigure(
        "graph.png",
        "Who learns from whom, agents coloured by their final main-head shared accuracy.",
        lambda run: plots.communication_graph(run.graph, _main_shared(run)),
    ),
    RunFigure(
        "partition.png",
        "Private samples per agent and class (partition.csv).",
        lambda run: plots.partition_heatmap(run.class_counts),
        early=lambda directory: plots.partition_heatmap(read_partition(directory / "partition.csv")),
    ),
    RunFigure(
        "communication.png",
        "Bytes of predictions put on the graph's edges, and wall time, per round.",
        lambda run: plots.communication_per_round(run.rounds),
    ),
    RunFigure(
        "network.png",
        "A dynamic network (network.jsonl): active agents, messages sent per active agent and their mean "
        "delay per round; how often each sender reached each receiver.",
        lambda run: plots.network_over_time(run.network, len(run.class_counts)),
        lambda run: bool(run.network),
    ),
)


def render_early(run_dir: Path) -> dict[str, bytes]:
    """PNGs of the figures that need only what a run writes before its first round (the partition).

    A run draws them in a thread while its rounds run (sim.run.main), and hands them to
    `write_run_report`, which then has less to draw after the summary (docs/performance.md,
    Start-up). They stay in memory: plots/ appears only with a completed run's report.
    """
    return {figure.file: plots.png(figure.early(run_dir)) for figure in RUN_FIGURES if figure.early is not None}


def write_run_report(run_dir: Path, rendered: Mapping[str, bytes] | None = None) -> Path:
    """RUN_DIR/report.html and RUN_DIR/plots/*.png for a completed run; returns the page's path.

    `rendered` holds figures already drawn by `render_early`, by file name; the rest are drawn here.
    """
    run = load_run(run_dir)
    if not run.completed:
        status = f"{run.summary.get('status')}: {run.summary.get('error', 'see summary.json')}"
        raise ConfigError("RUN_DIR", str(run_dir), f"a completed run (this one is {status})")
    rendered = rendered or {}
    for figure in _figures(run):
        path = run_dir / "plots" / figure.file
        if figure.file in rendered:
            plots.write_png(rendered[figure.file], path)
        else:
            plots.save(figure.draw(run), path)
    page = run_dir / "report.html"
    page.write_text(run_page(run))
    return page


def run_page(run: Run) -> str:
    summary, config = run.summary, run.config
    title = f"{summary['method']} on {summary['dataset']}: {summary['num_agents']} agents, {summary['rounds']} rounds"
    facts = {
        "run directory": str(run.directory),
        "topology / partition": f"{_name(config, 'topology')} / {_name(config, 'partition')}",
        "backbone": _name(config, "backbone"),
        "seed": summary["seed"],
        "wall time": f"{summary['wall_time_s']:.1f} s (set-up {summary['setup_time_s']:.1f} s, "
        f"{summary['round_time_s_mean']:.2f} s per round)",
        "communication": f"{summary['comm_bytes_total'] / 1e6:.2f} MB in total, "
        f"{summary['comm_bytes_per_edge_per_round'] / 1e3:.1f} kB per edge per round, "
        f"{summary['num_edges']} edges",
        "runtime": ", ".join(f"{key} {value}" for key, value in summary.get("runtime", {}).items()),
        "recovery": ", ".join(f"{key} {value}" for key, value in summary.get("recovery", {}).items()),
        "evaluation": evaluation_note(summary),
        "convergence": summary.get("convergence", {}).get("note", "not recorded (a run of an older version)"),
        "privacy": privacy_line(summary["privacy"]) if "privacy" in summary else "none (privacy=none)",
    }
    if "network" in summary:  # a dynamic network (docs/dynamic.md)
        facts["network"] = ", ".join(f"{key} {value}" for key, value in summary["network"].items())
    head_rows = [
        [head, *(f"{row[f'{metric}{suffix}']:.3f}" for metric in ("shared_acc", "private_acc") for suffix in SPREAD)]
        for head, row in summary["final"]["heads"].items()
    ]
    agent_rows = [
        [str(agent), head, f"{acc['shared_acc']:.3f}", f"{acc['private_acc']:.3f}"]
        for agent, heads in run.final_per_agent().items()
        for head, acc in heads.items()
    ]
    config_text = (run.directory / "config.yaml").read_text()
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _table(["", ""], [[key, str(value)] for key, value in facts.items()], css="facts"),
        f"<h2>Final accuracy per head (round {summary['final']['round']}, over agents)</h2>",
        _table(["head", "shared mean", "min", "max", "private mean", "min", "max"], head_rows),
        "<h2>Plots</h2>",
        *(_figure(f"plots/{figure.file}", figure.caption) for figure in _figures(run)),
        *privacy_section(summary),
        "<h2>Final accuracy per agent</h2>",
        f"<details><summary>{len(agent_rows)} rows</summary>",
        _table(["agent", "head", "shared", "private"], agent_rows),
        "</details>",
        "<h2>Config</h2>",
        f"<pre>{html.escape(config_text)}</pre>",
    ]
    return _page(title, body)


def privacy_section(summary: dict[str, Any]) -> list[str]:
    """A private run: the guarantee and each agent's epsilon (docs/privacy.md); nothing otherwise."""
    privacy = summary.get("privacy")
    if privacy is None:
        return []
    epsilon = privacy["epsilon"] or {}
    if privacy["mechanism"] != "dp_sgd":  # an output mechanism: the composed epsilon of each agent's messages
        rows = [[agent, "-" if value is None else f"{value:.3g}"] for agent, value in epsilon.items()]
        return [
            "<h2>Privacy</h2>",
            f"<p>{html.escape(privacy['guarantee'])}; {html.escape(privacy['composition'])}, delta = "
            f"{privacy['delta']:g}; epsilon per message {privacy['epsilon_per_message']:.3g}.</p>",
            _table(["agent", "epsilon over its messages"], rows),
        ]
    stopped = set(privacy["stopped_sharing"])
    rows = [
        [
            agent,
            "-" if value is None else f"{value:.3f}",
            str(privacy["budget_rounds"][agent]),
            str(int(agent) in stopped),
        ]
        for agent, value in epsilon.items()
    ]
    return [
        "<h2>Privacy</h2>",
        f"<p>{html.escape(privacy['guarantee'])}; delta = {privacy['delta']:g}, accountant {privacy['accountant']}, "
        f"sampling {privacy['sampling']}, clip norm {privacy['clip_norm']}, noise multiplier "
        f"{html.escape(str(privacy['noise_multiplier']))}.</p>",
        _table(["agent", "epsilon", "rounds within budget", "stopped sharing"], rows),
    ]


def write_sweep_report(directories: Sequence[Path], out: Path, ignore: Sequence[str] = ()) -> Path:
    """Every completed run's report, the comparison of `directories`, and OUT/report.html."""
    comparison = compare(directories, ignore)
    for group in comparison.groups:
        for run in group.runs:
            write_run_report(run.directory)
    write_comparison(comparison, out)
    page = out / "report.html"
    page.write_text(sweep_page(comparison, directories, out))
    return page


def sweep_page(comparison: Comparison, directories: Sequence[Path], out: Path) -> str:
    runs = sum(len(group.runs) for group in comparison.groups)
    title = f"Sweep: {runs} runs in {len(comparison.groups)} groups"
    header, rows = table(comparison)
    links = [
        f'<li><a href="{html.escape(_relative(run.directory / "report.html", out))}">'
        f"{html.escape(str(run.directory))}</a>: {html.escape(group.label)}, seed {run.summary['seed']}</li>"
        for group in comparison.groups
        for run in group.runs
    ]
    skipped = [f"<li>{html.escape(line)}</li>" for line in describe_skipped(comparison)]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>From {html.escape(', '.join(map(str, directories)))}. Grouped by "
        f"{html.escape(', '.join(comparison.keys) or 'nothing (one configuration)')}; "
        "the runs of a group differ only in their seed.</p>",
        "<h2>Comparison (comparison.md, comparison.csv)</h2>",
        _table(header, rows),
        "<p>Accuracy: final, mean over agents; ± is the sample std over seeds.</p>",
        _figure("plots/final_accuracy.png", "Final accuracy per group and head; whiskers: std over seeds."),
        _figure("plots/accuracy_vs_round.png", "Accuracy per head vs round, mean over seeds (band: ± std)."),
        "<h2>Runs</h2>",
        f"<ul>{''.join(links)}</ul>",
        *([f"<h2>Skipped (not completed)</h2><ul>{''.join(skipped)}</ul>"] if skipped else []),
    ]
    return _page(title, body)


def _name(config: dict[str, Any], group: str) -> str:
    return str(config.get(group, {}).get("name", "?"))


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def evaluation_note(summary: dict[str, Any]) -> str:
    """Which test samples the numbers are on: final ones on all, curves on a subset (older runs: all)."""
    facts = summary.get("evaluation")
    if facts is None:
        return "whole test set"
    return (
        f"final: {facts['final']} ({facts['final_test_samples']} samples); curves before the last round: "
        f"{facts['during_training']} ({facts['during_training_test_samples']} samples)"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    opening = f'<table class="{css}">' if css else "<table>"
    return opening + (f"<tr>{head}</tr>" if head else "") + body + "</table>"


def _figure(source: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(source)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """The `mhd-sim-report` console script."""
    arguments = parser("mhd-sim-report")
    arguments.add_argument("--out", type=Path, help="where a sweep's comparison goes (default: the one SWEEP_DIR)")
    args = arguments.parse_args(argv)
    with one_line_errors("mhd-sim-report"):
        if len(args.paths) == 1 and is_run_dir(args.paths[0]):
            print(write_run_report(args.paths[0]))
            return
        if args.out is None and len(args.paths) > 1:
            raise ConfigError("--out", None, "a folder for the comparison of several directories")
        print(write_sweep_report(args.paths, args.out or args.paths[0], args.ignore))
