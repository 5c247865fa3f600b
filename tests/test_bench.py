"""scripts/bench.py runs every mode end to end and writes the JSON its readers rely on (no timing checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sim.backends.serial import SerialBackend
from tests.conftest import load_script

# Three agents (a ring needs 3) on 8x8 images: the two Ray start-ups (~10 s each on 2 cores) dominate.
TINY_BENCH = [
    "--preset=k8",
    "num_agents=3",
    "backbone=small_cnn",
    "data.image_shape=[1,8,8]",
    "data.public_size=100",
    "data.public_batch_size=32",
    "data.num_test=50",
    "train.local_steps=1",
    "train.batch_size=8",
    "train.distill_batch_size=8",
    "runtime.num_cpus=2",  # also the CPUs of the session's shared Ray, if another test started it
    "--samples-per-agent=20",
    "--rounds=1",
    "--burn-in=1",
    "--modes=raw,serial,ray,ray_one_per_actor",
]

MODE_KEYS = {
    "overrides",
    "round_cpu_s",
    "round_cpu_s_mean",
    "build_s",
    "startup_s",
    "ray_started_here",
    "round_s",
    "round_s_mean",
    "samples_per_round",
    "samples_per_s",
    "peak_rss_mib",
    "peak_pss_mib",
    "pss_vs_raw",
    "driver_peak_reset",
    "placement",
    "round_vs_raw",
    "startup_vs_raw",
}


@pytest.mark.slow
def test_bench_runs_every_mode_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        returned = load_script("bench").main([*TINY_BENCH, f"--out={out}"])
    finally:
        torch.set_num_threads(threads)  # the raw mode sets it process-wide
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert set(report) == {
        "preset", "overrides", "burn_in", "rounds", "machine", "sizes", "samples_formula", "notes", "modes"
    }  # fmt: skip
    assert {"cpu_count", "platform", "torch", "ray"} <= set(report["machine"])
    assert "data.num_train=160" in report["overrides"]  # 20 per agent x 3 agents + the 100 public samples
    assert list(report["modes"]) == ["raw", "serial", "ray", "ray_one_per_actor"]
    for mode, result in report["modes"].items():
        assert set(result) == MODE_KEYS, mode
        assert set(result["peak_rss_mib"]) == {"driver", "workers", "total"}
        assert set(result["peak_pss_mib"]) == {"driver", "workers", "driver_and_workers", "ray_services"}
        assert 0 < result["peak_pss_mib"]["driver"] <= result["peak_pss_mib"]["driver_and_workers"]
        assert result["samples_per_round"] == 3 * 1 * (8 + 8)  # K x local_steps x (batch + distill batch)
        assert len(result["round_cpu_s"]) == 1 and result["round_cpu_s_mean"] > 0  # a round that trains uses CPU
    assert report["modes"]["raw"]["round_vs_raw"] == 1.0
    assert len(report["modes"]["ray_one_per_actor"]["peak_rss_mib"]["workers"]) == 3  # one actor per agent
    assert "runtime.agents_per_actor=1" in report["modes"]["ray_one_per_actor"]["overrides"]


def test_bench_eval_times_every_batch_size_and_writes_its_report(tmp_path: Path) -> None:
    """scripts/bench_eval.py: one median per batch size and preset, the fastest named, the command kept."""
    bench_eval = load_script("bench_eval")
    out = tmp_path / "bench_eval.json"
    argv = ["--presets=mnist_small_cnn", "--batch-sizes=16,64", "--repeats=2", f"--out={out}", "data.num_test=64"]
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.argv", ["bench_eval.py", *argv])
            bench_eval.main()
    finally:
        torch.set_num_threads(threads)  # the script pins one thread; later tests keep theirs
    report = json.loads(out.read_text())
    result = report["presets"]["mnist_small_cnn"]
    assert result["test_images"] == 64
    assert set(result["batch_sizes"]) == {"16", "64"}
    for timing in result["batch_sizes"].values():
        assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"]
    medians = {int(size): timing["median_s"] for size, timing in result["batch_sizes"].items()}
    assert result["fastest"] == min(medians, key=medians.__getitem__)
    assert report["command"].startswith("python scripts/bench_eval.py --presets=mnist_small_cnn")
    assert report["threads"] == 1


def test_bench_routes_a_dynamic_network_by_its_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With dynamic overrides the benchmark's rounds take the schedule's plan, as the round loop does."""
    plans: list[object] = []
    original = SerialBackend.run_round

    def recording(self: SerialBackend, round_idx: int, publish: bool, plan: object = None) -> object:
        plans.append(plan)
        return original(self, round_idx, publish, plan)  # type: ignore[arg-type]

    monkeypatch.setattr(SerialBackend, "run_round", recording)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    dynamic = ["participation.rule=bernoulli", "participation.q=0.5", "--modes=serial", f"--out={out}"]
    try:
        load_script("bench").main([*TINY_BENCH[:-1], *dynamic])
    finally:
        torch.set_num_threads(threads)
    serial = json.loads(out.read_text())["modes"]["serial"]
    assert serial["placement"]["network"] == "dynamic"
    assert serial["round_cpu_s_mean"] > 0  # the driver's CPU seconds (the agents train in this process)
    assert plans and all(plan is not None for plan in plans)  # every round routed by its plan
