"""The convergence signal: a run that stops while accuracy still climbs says so, a flat one does not."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from sim.experiment.convergence import ConvergenceRule, convergence
from sim.run.main import run
from tests.conftest import TINY, make_config

RULE = ConvergenceRule(window=0.2, min_gain=0.02)


def _history(*accuracies: tuple[int, float, float]) -> list[dict[str, float]]:
    return [{"round": r, "shared_acc": shared, "private_acc": private} for r, shared, private in accuracies]


def test_a_gain_over_the_last_fifth_of_the_rounds_is_still_rising_and_suggests_more_rounds() -> None:
    history = _history((10, 0.50, 0.90), (20, 0.60, 0.91), (25, 0.64, 0.91), (30, 0.70, 0.92))
    signal = convergence(history, rounds=30, rule=RULE)
    assert signal["still_rising"] is True
    assert signal["window_rounds"] == [20, 30]  # the newest evaluation at or before round 24
    assert signal["gain"] == pytest.approx({"shared_acc": 0.10, "private_acc": 0.01})
    assert "shared +10.0 points" in signal["note"] and "private" not in signal["note"] and "rounds=60" in signal["note"]


def test_gains_within_the_noise_are_flat() -> None:
    history = _history((10, 0.50, 0.90), (20, 0.69, 0.91), (30, 0.70, 0.92))
    signal = convergence(history, rounds=30, rule=RULE)
    assert signal["still_rising"] is False and signal["note"].startswith("flat over rounds 20-30")


def test_a_run_with_one_evaluation_cannot_tell() -> None:
    signal = convergence(_history((30, 0.7, 0.9)), rounds=30, rule=RULE)
    assert signal["still_rising"] is None and "eval_every" in signal["note"]


def test_the_summary_and_the_console_carry_the_signal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run(make_config(*TINY, "rounds=5", "eval_every=1", "runtime.backend=serial"), tmp_path / "run")
    signal = summary["convergence"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    main = [record["heads"]["main"] for record in records]
    assert signal["window_rounds"] == [4, 5]
    assert signal["gain"]["shared_acc"] == pytest.approx(main[-1]["shared_acc"] - main[-2]["shared_acc"])
    assert f"convergence: {signal['note']}" in capsys.readouterr().out
    assert html.escape(signal["note"]) in (tmp_path / "run" / "report.html").read_text()  # "<=" is "&lt;=" there
