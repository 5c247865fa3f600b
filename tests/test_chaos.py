"""scripts/chaos.py: its fault plans, and a chaos run end to end (deaths counted, numbers identical)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SCRIPTS, load_script

CHAOS = SCRIPTS / "chaos.py"


@pytest.mark.parametrize("seed", range(20))
def test_a_plan_has_the_deaths_asked_for_each_at_its_own_round(seed: int) -> None:
    chaos = load_script("chaos")
    plan = chaos.draw_plan(rounds=30, eval_every=5, checkpoint_every=3, kills=5, seed=seed)
    assert len(plan) >= 5
    by_round: dict[int, list[str]] = {}
    for fault in plan:
        by_round.setdefault(fault["round"], []).append(fault["point"])
    for round_idx, points in by_round.items():
        assert points in (["train"], ["evaluate"], ["save"], ["train", "restore"]), points
        if points == ["evaluate"]:
            assert (round_idx + 1) % 5 == 0 or round_idx == 29
        if points == ["save"]:
            assert (round_idx + 1) % 3 == 0  # the checkpoint written after that round
    rounds = sorted(by_round)
    assert all(later - earlier >= 2 for earlier, later in zip(rounds, rounds[1:], strict=False))


def test_a_run_too_short_for_the_deaths_asked_is_refused() -> None:
    with pytest.raises(SystemExit, match="room for only"):
        load_script("chaos").draw_plan(rounds=4, eval_every=5, checkpoint_every=2, kills=5, seed=0)


@pytest.mark.slow
def test_a_chaos_run_survives_every_death_with_identical_numbers(tmp_path: Path) -> None:
    overrides = ["num_agents=4", "rounds=10", "eval_every=2", "checkpoint_every=2", "train.local_steps=2"]
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, str(CHAOS), *overrides, "logger.progress=false", "runtime.agents_per_actor=2",
         "--kills=3", f"--out={out}", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and report["planned_deaths"] >= 3
    assert report["recovery"]["actor_failures"] == report["planned_deaths"]
    assert sum(report["restarts_per_actor"]) == report["planned_deaths"]
