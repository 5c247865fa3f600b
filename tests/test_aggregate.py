"""Sweep aggregation: runs grouped by what differs, mean ± std over seeds, table and plots written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sim.core.errors import ConfigError
from sim.reporting.aggregate import compare, main, swept_keys
from sim.reporting.rundir import natural_key
from sim.run.main import run
from tests.conftest import TINY, make_config

# A 2 x 2 sweep laid out as Hydra's basic launcher does: SWEEP/<job number>/.
JOBS = [("mhd", 0), ("mhd", 1), ("isolated", 0), ("isolated", 1)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sweep")
    for job, (method, seed) in enumerate(JOBS):
        overrides = [*TINY, "runtime.backend=serial", "logger.report=false", f"method={method}", f"seed={seed}"]
        run(make_config(*overrides), directory / str(job))
    (directory / "multirun.yaml").write_text("hydra: {}\n")  # a sweep's own file, not a run
    return directory


def _final(run_dir: Path, head: str, metric: str) -> float:
    return float(json.loads((run_dir / "summary.json").read_text())["final"]["heads"][head][metric])


def test_runs_are_grouped_by_the_keys_that_differ_and_seeds_are_repetitions(sweep: Path) -> None:
    comparison = compare([sweep])
    assert comparison.keys == ["method.name"]  # seed is not a setting; mhd-only keys do not vary among mhd runs
    assert [group.settings for group in comparison.groups] == [{"method.name": "mhd"}, {"method.name": "isolated"}]
    assert [len(group.runs) for group in comparison.groups] == [2, 2]
    assert comparison.heads == ["main", "aux1", "aux2", "aux3"]
    assert comparison.groups[1].heads == ["main"]
    values = [_final(sweep / job, "aux2", "private_acc") for job in ("0", "1")]
    mean, std = comparison.groups[0].final("aux2", "private_acc")
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))


def test_the_command_writes_the_expected_markdown_csv_and_plots(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "headline"
    main([str(sweep), "--out", str(out)])
    lines = (out / "comparison.md").read_text().splitlines()
    assert lines[0] == (
        "| method.name | seeds | main shared | main private | aux1 shared | aux1 private | aux2 shared "
        "| aux2 private | aux3 shared | aux3 private | MB sent | wall s |"
    )
    mhd, isolated = (line.split(" | ") for line in lines[2:4])
    shared = [_final(sweep / job, "main", "shared_acc") for job in ("0", "1")]
    assert mhd[:3] == ["| mhd", "2", f"{np.mean(shared):.3f} ± {np.std(shared, ddof=1):.3f}"]
    assert isolated[:2] == ["| isolated", "2"] and isolated[4:10] == ["–"] * 6  # isolated agents have one head
    assert isolated[10] == "0.00"  # isolated agents send nothing
    with (out / "comparison.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["method.name"] for row in rows] == ["mhd", "isolated"]
    assert rows[0]["n_seeds"] == "2" and rows[0]["seeds"] == "0 1"
    assert float(rows[0]["main_shared_acc_mean"]) == pytest.approx(np.mean(shared), abs=1e-6)
    assert rows[1]["aux1_shared_acc_mean"] == "" and float(rows[1]["comm_bytes_total_mean"]) == 0
    assert rows[0]["run_dirs"].split() == [str(sweep / "0"), str(sweep / "1")]
    for plot in ("final_accuracy.png", "accuracy_vs_round.png"):
        assert (out / "plots" / plot).read_bytes().startswith(b"\x89PNG")


def test_ignoring_a_key_pools_its_groups(sweep: Path) -> None:
    comparison = compare([sweep], ignore=["method"])
    assert comparison.keys == [] and [len(group.runs) for group in comparison.groups] == [4]
    assert comparison.groups[0].heads == ["main"]  # the heads every pooled run has


def test_a_key_only_some_runs_have_is_swept_only_where_its_values_differ() -> None:
    ring = {"topology.name": "ring", "seed": "0", "logger.name": "console"}
    islands_2 = {"topology.name": "islands", "topology.num_islands": "2", "seed": "1", "logger.name": "wandb"}
    islands_4 = {**islands_2, "topology.num_islands": "4"}
    assert swept_keys([ring, islands_2], ["seed", "logger"]) == ["topology.name"]
    assert swept_keys([ring, islands_2, islands_4], ["seed", "logger"]) == ["topology.name", "topology.num_islands"]


def test_runs_come_in_job_order() -> None:
    paths = [Path("multirun/x/10"), Path("multirun/x/2"), Path("multirun/x/1")]
    assert sorted(paths, key=natural_key) == [Path("multirun/x/1"), Path("multirun/x/2"), Path("multirun/x/10")]


def test_a_directory_without_completed_runs_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="no run directories"):
        compare([tmp_path])
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "aggregate.py: error: RUN_DIR_OR_SWEEP_DIR=" in error
