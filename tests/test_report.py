"""Run and sweep reports: written at the end of a run and by `mhd-sim-report`, images real, HTML linked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sim.core.errors import ConfigError
from sim.reporting.loggers import JsonlSink
from sim.reporting.report import RUN_FIGURES, main, render_early, write_run_report
from sim.run.main import check_names, run
from tests.conftest import TINY, make_config

MHD_SIM_REPORT = str(Path(sys.executable).with_name("mhd-sim-report"))
MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))
PNG = b"\x89PNG\r\n\x1a\n"

# What every run's report draws; a dynamic network's runs add network.png (tests/test_dynamic.py).
STATIC_FIGURES = {f"plots/{figure.file}" for figure in RUN_FIGURES if figure.file != "network.png"}


def _assert_page_shows_its_images(page: Path, expected: set[str]) -> None:
    """`page` references exactly `expected` images by relative path, each a non-empty PNG."""
    sources = set(re.findall(r'<img src="([^"]+)"', page.read_text()))
    assert sources == expected
    for source in sources:
        image = page.parent / source
        assert image.stat().st_size > 10_000 and image.read_bytes().startswith(PNG)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "run"
    run(make_config(*TINY, "runtime.backend=serial", "eval_every=1"), run_dir)
    return run_dir


def test_a_finished_run_writes_its_report(finished_run: Path) -> None:
    _assert_page_shows_its_images(finished_run / "report.html", STATIC_FIGURES)
    page = (finished_run / "report.html").read_text()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert f"{summary['final']['heads']['aux3']['private_acc_max']:.3f}" in page
    assert f"{summary['comm_bytes_total'] / 1e6:.2f} MB in total" in page
    assert "teacher_rule: most_confident" in page  # the config
    rounds = [json.loads(line)["round"] for line in (finished_run / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]


def test_a_figure_drawn_while_the_rounds_run_is_the_one_the_report_would_draw(finished_run: Path) -> None:
    """render_early reads partition.csv; the report draws the same figure from the completed run."""
    early = render_early(finished_run)
    assert set(early) == {"partition.png"}
    write_run_report(finished_run)
    assert (finished_run / "plots" / "partition.png").read_bytes() == early["partition.png"]


def test_the_command_reports_an_old_run_without_rounds_jsonl(finished_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "partition.csv", "graph.edgelist"):
        (old / name).write_bytes((finished_run / name).read_bytes())
    main([str(old)])
    _assert_page_shows_its_images(old / "report.html", STATIC_FIGURES)


def test_a_run_that_did_not_complete_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "error": "TrainingDivergedError: nan"}))
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "a completed run (this one is failed: TrainingDivergedError: nan)" in error


def test_logger_report_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="logger.report='maybe' is invalid: true or false"):
        check_names(make_config("logger.report=maybe"))


def test_a_rollback_rewinds_rounds_jsonl_with_metrics_jsonl(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    for round_idx in range(4):
        sink.log_round(round_idx, {"round": round_idx, "comm/bytes": 10})
        if round_idx % 2 == 1:
            sink.log_eval(round_idx, {"round": round_idx + 1})
    sink.rewind(2)  # back to the checkpoint after round 2: rounds 3 and 4 will be run again
    sink.log_round(2, {"round": 2, "comm/bytes": 10})
    sink.close()
    rounds = [json.loads(line)["round"] for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    evaluations = [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3] and evaluations == [2]


@pytest.mark.slow
def test_a_multirun_gets_a_sweep_report_and_one_per_run(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    args = [*TINY, "runtime.backend=serial", "logger.report=false", "method=mhd,isolated"]
    environment = dict(os.environ)
    done = subprocess.run(
        [MHD_SIM, "--multirun", *args, f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    assert not (sweep / "0" / "report.html").exists()  # logger.report=false
    done = subprocess.run([MHD_SIM_REPORT, str(sweep)], capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(sweep / "report.html")
    _assert_page_shows_its_images(sweep / "report.html", {"plots/final_accuracy.png", "plots/accuracy_vs_round.png"})
    page = (sweep / "report.html").read_text()
    assert 'href="0/report.html"' in page and 'href="1/report.html"' in page
    assert "<td>isolated</td>" in page and (sweep / "comparison.md").is_file() and (sweep / "comparison.csv").is_file()
    for job in ("0", "1"):
        _assert_page_shows_its_images(sweep / job / "report.html", STATIC_FIGURES)
