"""The figures of a run and of a sweep, as matplotlib Figures built from plain data.

The same functions feed report.html (saved as PNG) and wandb (as pixels), so a picture in a
dashboard and in a report never disagree. Figures are made with `matplotlib.figure.Figure`,
not pyplot: no global state, no display backend, safe to call from a headless run.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
HEAD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
ACCURACY_LABELS = {
    "shared_acc": "shared accuracy (global test set)",
    "private_acc": "private accuracy (own class mix)",
}
LABELLED_AGENTS_MAX = 64  # above this the graph drops node labels and the heatmap its numbers


def head_colour(index: int) -> str:
    return HEAD_COLOURS[index % len(HEAD_COLOURS)]


def save(figure: Figure, path: Path) -> Path:
    """Write `figure` as PNG (parents created) and return `path`."""
    return write_png(png(figure), path)


def png(figure: Figure) -> bytes:
    """`figure` as PNG bytes.

    Every figure lays itself out (`layout="constrained"`), so it is saved as it stands:
    `bbox_inches="tight"` would lay it out and draw it a second time, and made writing a run's
    report ~1.8x slower (1.5 s against 0.85 s for its five figures; docs/performance.md).
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def write_png(data: bytes, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pixels(figure: Figure) -> np.ndarray:
    """[H, W, 3] uint8 rendering of `figure` (what wandb.Image takes)."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def accuracy_curves(evaluations: Sequence[Mapping[str, Any]], title: str = "Accuracy per head") -> Figure:
    """Shared and private accuracy of every head vs round: mean over agents, min-max band."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    rounds = [record["round"] for record in evaluations]
    heads = list(evaluations[-1]["heads"]) if evaluations else []
    for ax, metric in zip(axes, ACCURACY_LABELS, strict=True):
        for index, head in enumerate(heads):
            rows = [record["heads"][head] for record in evaluations]
            mean = [row[metric] for row in rows]
            ax.fill_between(
                rounds,
                [row[f"{metric}_min"] for row in rows],
                [row[f"{metric}_max"] for row in rows],
                color=head_colour(index),
                alpha=0.08,
                linewidth=0,
            )
            ax.plot(rounds, mean, marker="o", markersize=3, color=head_colour(index), label=head)
        _accuracy_axis(ax, ACCURACY_LABELS[metric])
        _round_axis(ax)
    axes[1].legend(title="head", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(f"{title} (line: mean over agents, band: min to max)")
    return figure


def private_vs_shared(per_agent: Mapping[int, Mapping[str, Mapping[str, float]]]) -> Figure:
    """Final shared vs private accuracy, one point per agent and head, main-head points numbered."""
    figure = Figure(figsize=(5.6, 5.2), layout="constrained")
    ax = figure.subplots()
    heads = list(next(iter(per_agent.values()))) if per_agent else []
    values = [row[metric] for agent in per_agent.values() for row in agent.values() for metric in ACCURACY_LABELS]
    low = max(0.0, min(values, default=0.0) - 0.05)  # zoom on the data: the agents often sit in one corner
    for index, head in enumerate(heads):
        shared = [per_agent[agent][head]["shared_acc"] for agent in per_agent]
        private = [per_agent[agent][head]["private_acc"] for agent in per_agent]
        ax.scatter(shared, private, s=36, color=head_colour(index), alpha=0.8, label=head, edgecolors="white")
        if index == 0 and len(per_agent) <= LABELLED_AGENTS_MAX:
            for agent, x, y in zip(per_agent, shared, private, strict=True):
                ax.annotate(str(agent), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="private = shared")
    _accuracy_axis(ax, ACCURACY_LABELS["private_acc"])
    ax.set_xlim(low, 1.01)
    ax.set_ylim(low, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel(ACCURACY_LABELS["shared_acc"])
    ax.legend(title="head", loc="lower right", fontsize=8)
    ax.set_title("Final accuracy per agent (numbers: agent ids)")
    return figure


def communication_graph(graph: nx.DiGraph, accuracy: Mapping[int, float] | None = None, title: str = "") -> Figure:
    """The graph, nodes coloured by `accuracy` (e.g. final main-head shared accuracy) when given."""
    figure = Figure(figsize=(6, 5.4), layout="constrained")
    ax = figure.subplots()
    layout = nx.spring_layout(graph, seed=0) if graph.number_of_nodes() else {}
    labelled = graph.number_of_nodes() <= LABELLED_AGENTS_MAX
    node_size = 300 if labelled else 20
    symmetric = all(graph.has_edge(v, u) for u, v in graph.edges)
    if symmetric:  # an undirected graph, stored with both directions: draw each edge once
        nx.draw_networkx_edges(graph.to_undirected(), layout, ax=ax, alpha=0.35, arrows=False, node_size=node_size)
    else:
        nx.draw_networkx_edges(graph, layout, ax=ax, alpha=0.35, arrows=True, node_size=node_size)
    nodes = list(graph.nodes)
    colours: dict[str, Any] = {"node_color": "#9ecae1"}
    if accuracy is not None:
        colours = {
            "node_color": [accuracy.get(node, np.nan) for node in nodes],
            "cmap": "viridis",
            "vmin": 0,
            "vmax": 1,
        }
    drawn = nx.draw_networkx_nodes(
        graph,
        layout,
        nodelist=nodes,
        **colours,
        node_size=node_size,
        edgecolors="black",
        linewidths=0.5,
        ax=ax,
    )
    if labelled:
        nx.draw_networkx_labels(graph, layout, font_size=8, font_color="white" if accuracy else "black", ax=ax)
    if accuracy is not None:
        figure.colorbar(drawn, ax=ax, label="final main-head shared accuracy", shrink=0.8)
    edges = "undirected" if symmetric else "directed: v learns from u"
    ax.set_title(title or f"Communication graph ({graph.number_of_nodes()} agents, {edges})")
    ax.set_axis_off()
    return figure


def partition_heatmap(class_counts: np.ndarray) -> Figure:
    """Private samples per agent (rows) and class (columns): the data heterogeneity at a glance."""
    agents, classes = class_counts.shape
    figure = Figure(figsize=(max(5.0, 0.45 * classes + 2.5), max(3.0, min(0.35 * agents + 1.5, 12.0))))
    figure.set_layout_engine("constrained")
    ax = figure.subplots()
    image = ax.imshow(class_counts, aspect="auto", cmap="Blues", interpolation="nearest")
    if agents <= LABELLED_AGENTS_MAX and classes <= 20:
        threshold = class_counts.max() / 2 if class_counts.size else 0
        for (row, col), count in np.ndenumerate(class_counts):
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
        ax.set_yticks(range(agents))
    ax.set_xticks(range(classes))
    ax.set_xlabel("class")
    ax.set_ylabel("agent")
    figure.colorbar(image, ax=ax, label="private samples")
    ax.set_title("Partition: private samples per agent and class")
    return figure


def communication_per_round(rounds: Sequence[Mapping[str, Any]]) -> Figure:
    """Bytes put on edges in each round (bars) and the wall time of each round."""
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    bytes_ax, time_ax = figure.subplots(1, 2)
    numbers = [record["round"] for record in rounds]
    sent = np.array([record.get("comm/bytes", 0) for record in rounds], dtype=float)
    scale, unit = (1e6, "MB") if sent.max(initial=0) >= 1e6 else (1e3, "kB")
    bytes_ax.bar(numbers, sent / scale, color="#4c72b0")
    bytes_ax.set_ylabel(f"{unit} sent (all edges)")
    bytes_ax.set_title(f"Communication per round (total {sent.sum() / 1e6:.2f} MB)")
    time_ax.plot(numbers, [record.get("time/round_s", np.nan) for record in rounds], marker="o", markersize=3)
    time_ax.set_ylabel("seconds")
    time_ax.set_ylim(bottom=0)
    time_ax.set_title("Wall time per round")
    for ax in (bytes_ax, time_ax):
        _round_axis(ax)
    return figure


def network_over_time(network: Sequence[Mapping[str, Any]], num_agents: int) -> Figure:
    """A dynamic network per round (active agents, messages per active agent, mean delay) and pair counts.

    `network` is network.jsonl: per round "active" agents and "links" as [sender, receiver, delay].
    """
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    rounds_ax, pairs_ax = figure.subplots(1, 2)
    numbers = [record["round"] for record in network]
    active = np.array([len(record["active"]) for record in network], dtype=float)
    links = [record["links"] for record in network]
    received = np.array([len(found) for found in links], dtype=float) / np.maximum(active, 1)
    delay = [np.mean([link[2] for link in found]) if found else np.nan for found in links]
    rounds_ax.plot(numbers, active, marker="o", markersize=3, label="active agents")
    rounds_ax.plot(numbers, received, marker="s", markersize=3, label="messages sent per active agent")
    rounds_ax.plot(numbers, delay, marker="^", markersize=3, label="mean delay (rounds)")
    rounds_ax.set_ylim(bottom=0)
    rounds_ax.legend(fontsize=8)
    rounds_ax.set_title("Network per round")
    _round_axis(rounds_ax)
    counts = np.zeros((num_agents, num_agents), dtype=np.int64)
    for found in links:
        for sender, receiver, _ in found:
            counts[sender, receiver] += 1
    image = pairs_ax.imshow(counts, cmap="Blues", interpolation="nearest")
    pairs_ax.set_xlabel("receiver")
    pairs_ax.set_ylabel("sender")
    figure.colorbar(image, ax=pairs_ax, label="rounds with a message")
    pairs_ax.set_title("How often each pair talked")
    return figure


@dataclass(frozen=True)
class GroupSeries:
    """One sweep group as the sweep figures need it: per head, mean and std over seeds."""

    label: str
    seeds: int
    final: Mapping[str, Mapping[str, tuple[float, float]]]  # head -> metric -> (mean, std)
    rounds: Sequence[int]
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]  # head -> metric -> (mean, std) per round


def final_accuracy_bars(groups: Sequence[GroupSeries], heads: Sequence[str]) -> Figure:
    """Final shared and private accuracy per group and head; error bars: std over seeds.

    `heads` fixes each head's colour across groups (main, aux1, ...: every group's heads).
    """
    height = max(3.0, 0.3 * sum(len(group.final) for group in groups) + 0.4 * len(groups) + 1.2)
    figure = Figure(figsize=(12, height), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    bar = 0.8 / max(len(heads), 1)
    for ax, metric in zip(axes, ACCURACY_LABELS, strict=True):
        for position, group in enumerate(groups):
            for index, head in enumerate(group.final):  # a group's own heads, centred on its label
                mean, std = group.final[head][metric]
                ax.barh(
                    position + (index - (len(group.final) - 1) / 2) * bar,
                    mean,
                    height=bar,
                    xerr=0.0 if np.isnan(std) else std,
                    color=head_colour(heads.index(head)),
                    label=head if position == _first_group_with(groups, head) else None,
                    capsize=2,
                )
        ax.set_xlim(0, 1)
        ax.set_xlabel(ACCURACY_LABELS[metric])
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(groups)), [f"{group.label} (n={group.seeds})" for group in groups], fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(title="head", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    figure.suptitle("Final accuracy per group (mean over agents; bars: mean over seeds, whiskers: std)")
    return figure


def _first_group_with(groups: Sequence[GroupSeries], head: str) -> int:
    return next(index for index, group in enumerate(groups) if head in group.final)


def group_accuracy_curves(groups: Sequence[GroupSeries]) -> Figure:
    """One panel per group: every head's accuracy vs round, mean over seeds (shared solid, private dashed)."""
    columns = min(3, max(len(groups), 1))
    rows = -(-len(groups) // columns) if groups else 1
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, group in zip(axes, groups, strict=False):
        for index, head in enumerate(group.curves):
            for metric, style in (("shared_acc", "-"), ("private_acc", "--")):
                mean, std = group.curves[head][metric]
                ax.plot(
                    group.rounds,
                    mean,
                    linestyle=style,
                    marker="o",
                    markersize=3,
                    color=head_colour(index),
                    label=f"{head} {metric.removesuffix('_acc')}",
                )
                ax.fill_between(group.rounds, mean - std, mean + std, color=head_colour(index), alpha=0.1, linewidth=0)
        ax.set_title(f"{group.label} (n={group.seeds})", fontsize=9)
        _accuracy_axis(ax, "accuracy")
        _round_axis(ax)
    for ax in axes[len(groups) :]:
        ax.set_axis_off()
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda found: len(found[1]))
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 8), fontsize=8)
    figure.suptitle("Accuracy per head vs round (mean over agents and seeds; solid: shared, dashed: private)")
    return figure


def _accuracy_axis(ax: Any, label: str) -> None:
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def _round_axis(ax: Any) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
