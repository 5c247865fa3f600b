"""Evaluation: a stratified subset of the test set during training, the whole test set at the end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.agent import Agent
from sim.experiment.assembly import build_experiment, evaluation_rows
from sim.run.main import run
from tests.conftest import PLAIN_CPU, TINY, make_config

RUN = [*TINY, "rounds=4", "eval_every=1", "runtime.backend=serial", "logger.report=false"]


def test_the_evaluation_subset_keeps_every_class_share_and_is_seeded() -> None:
    labels = np.repeat(np.arange(10), [100, 200, 50, 150, 100, 100, 100, 100, 50, 50])  # 1,000 samples, skewed
    rows = evaluation_rows(labels, 200, seed=3)
    assert len(rows) == 200 and len(set(rows)) == 200 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=10), np.bincount(labels, minlength=10) // 5)
    np.testing.assert_array_equal(rows, evaluation_rows(labels, 200, seed=3))
    assert not np.array_equal(rows, evaluation_rows(labels, 200, seed=4))


@pytest.mark.parametrize("size", [None, 1000, 5000])
def test_no_subset_or_one_as_large_as_the_test_set_is_the_whole_test_set(size: int | None) -> None:
    labels = np.arange(1000) % 10
    np.testing.assert_array_equal(evaluation_rows(labels, size, seed=0), np.arange(1000))


def test_training_evaluates_the_subset_and_the_final_numbers_are_on_the_whole_test_set(tmp_path: Path) -> None:
    summary = run(make_config(*RUN, "eval_subset_size=100"), tmp_path / "subset")
    whole = run(make_config(*RUN, "eval_subset_size=null"), tmp_path / "whole")
    records = [json.loads(line) for line in (tmp_path / "subset" / "metrics.jsonl").read_text().splitlines()]
    test_size = whole["final"]["test_samples"]
    assert [record["test_samples"] for record in records] == [100, 100, 100, test_size]
    assert summary["final"] == whole["final"]  # evaluation never changes training; the final one is on all samples
    assert (
        records[0]["heads"] != json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[0])["heads"]
    )
    assert summary["evaluation"] == {
        "during_training_test_samples": 100,
        "during_training": "stratified seeded subset",
        "final_test_samples": test_size,
        "final": "whole test set",
    }


def test_an_nhwc_evaluation_copy_leaves_training_bit_identical_and_counts_equal(tmp_path: Path) -> None:
    """runtime.eval_channels_last evaluates through an NHWC copy: training and the final counts as without it."""
    nhwc = run(make_config(*RUN, "runtime.eval_channels_last=true"), tmp_path / "nhwc")
    nchw = run(make_config(*RUN, "runtime.eval_channels_last=false"), tmp_path / "nchw")
    rounds = [(tmp_path / name / "rounds.jsonl").read_text().splitlines() for name in ("nhwc", "nchw")]
    strip = [[{k: v for k, v in json.loads(line).items() if "time" not in k} for line in lines] for lines in rounds]
    assert strip[0] == strip[1]  # every loss of every round: the model that trains never saw the copy
    assert nhwc["final"] == nchw["final"]


def test_the_nhwc_evaluation_copy_is_used_and_agrees_with_the_model() -> None:
    experiment = build_experiment(make_config(*TINY))
    agent = Agent(experiment.specs[0], experiment.public, replace(PLAIN_CPU, eval_channels_last=True))
    forward, memory_format = agent._evaluation_forward()
    assert memory_format == torch.channels_last and forward is not agent.forward
    x = torch.as_tensor(experiment.public.test_x[:64])
    with torch.inference_mode():
        torch.testing.assert_close(forward(x.contiguous(memory_format=torch.channels_last))[0], agent.forward(x)[0])
    assert all(parameter.is_contiguous() for parameter in agent.model.parameters())
    counts, plain = (a.evaluate(full=True) for a in (agent, Agent(experiment.specs[0], experiment.public, PLAIN_CPU)))
    np.testing.assert_array_equal(counts.correct, plain.correct)
