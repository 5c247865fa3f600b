"""scripts/privacy_utility.py: one row per setting with its accuracies and epsilon, the table, and the curve's plot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TINY, load_script


def test_a_setting_runs_end_to_end_and_lands_in_the_json_and_the_plot(tmp_path: Path) -> None:
    utility = load_script("privacy_utility")
    out, plot = tmp_path / "curve.json", tmp_path / "curve.png"
    utility.main(["--set", "none", "privacy=none", "--out", str(out), "--plot", str(plot), "--", *TINY])
    (row,) = json.loads(out.read_text())["results"]
    assert row["setting"] == "none" and row["epsilon_max"] is None
    assert 0.0 <= row["shared"] <= 1.0 and 0.0 <= row["private"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_curve_plots_only_runs_with_an_epsilon(tmp_path: Path) -> None:
    utility = load_script("privacy_utility")
    rows = [
        {"setting": "none", "epsilon_max": None, "shared": 0.8, "private": 0.95},
        {"setting": "dp_sgd eps=8", "epsilon_max": 8.0, "shared": 0.6, "private": 0.9},
        {"setting": "dp_sgd eps=1", "epsilon_max": 1.0, "shared": 0.1, "private": 0.4},
        {"setting": "dp_sgd eps=2", "diverged": "loss/ce is nan", "wall_s": 1.0},
    ]
    drawn: list[tuple[list[float], list[float]]] = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot

    def recording_plot(self, xs, ys, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append((list(xs), list(ys)))
        return original(self, xs, ys, *args, **kwargs)

    matplotlib.axes.Axes.plot = recording_plot  # type: ignore[method-assign]
    try:
        utility.plot_curve(rows, tmp_path / "curve.png")
    finally:
        matplotlib.axes.Axes.plot = original  # type: ignore[method-assign]
    assert drawn == [([1.0, 8.0], [0.1, 0.6]), ([1.0, 8.0], [0.4, 0.9])]  # sorted by epsilon, diverged left out
    assert (tmp_path / "curve.png").stat().st_size > 0
