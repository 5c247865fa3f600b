"""scripts/bench_peers.py runs the systems that need nothing optional and writes the JSON its readers rely on.

No timing checks: the numbers are only checked to exist.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_PEERS = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"

# Three clients (mhd_mhd's ring needs 3), one local step of 8, two rounds, small public and test sets.
TINY = [
    "--ks=3",
    "--repeats=1",
    "--local-steps=1",
    "--batch-size=8",
    "--samples-per-client=20",
    "--rounds=2",
    "--num-test=50",
    "--public-size=100",
    "--public-batch-size=32",
    "--sample-interval=0.5",
]

SYSTEM_KEYS = {
    "status",
    "repeats",
    "failed_repeats",
    "wall_s",
    "peak_pss_mib",
    "wall_s_all",
    "peak_pss_mib_all",
    "accuracy",
}


def _load() -> ModuleType:
    """scripts/ is not a package, so the script is loaded from its file."""
    spec = importlib.util.spec_from_file_location("bench_peers_under_test", BENCH_PEERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_tiny_cnn_has_small_cnn_parameter_count() -> None:
    """The raw and Flower model is mhd-sim's small_cnn with one head (28,426 parameters at 1x8x8, 10 classes)."""
    from agents.model import ModelConfig, MultiHeadModel

    bench = _load()
    workload = bench.Workload(clients=3, local_steps=1, batch_size=8, samples_per_client=20, rounds=1)
    theirs = MultiHeadModel(
        ModelConfig(
            "small_cnn", {"channels": [32, 64], "embedding_dim": 128, "init": "fan_out"}, (1, 8, 8), 10, aux_heads=0
        )
    )
    count = sum(parameter.numel() for parameter in bench.TinyCNN(workload).parameters())
    assert count == sum(parameter.numel() for parameter in theirs.parameters()) == 28_426


@pytest.mark.slow
def test_bench_peers_runs_raw_and_mhd_sim_and_reports_flower_missing(tmp_path: Path) -> None:
    out = tmp_path / "bench_peers.json"
    flower_absent = importlib.util.find_spec("flwr") is None
    returned = _load().main([*TINY, f"--flower-python={sys.executable}", f"--out={out}"])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert set(report) == {
        "command", "machine", "mhd_sim", "load", "repeats", "raw_threads", "flower", "settings", "targets",
        "workload_differences", "results", "runs",
    }  # fmt: skip
    assert report["targets"] == {"8": 0.8, "32": 0.8, "200": 0.33}
    assert report["settings"]["3"]["train_samples_per_round"] == 3 * 1 * 8
    assert report["workload_differences"]
    result = report["results"]["3"]
    assert list(result["systems"]) == ["flower", "raw", "mhd_fedavg", "mhd_mhd"]
    for system in ("raw", "mhd_fedavg", "mhd_mhd"):
        numbers = result["systems"][system]
        assert set(numbers) == SYSTEM_KEYS, system
        assert numbers["status"] == "ok", [run.get("log_tail") for run in report["runs"] if run["system"] == system]
        assert numbers["wall_s"] > 0 and numbers["peak_pss_mib"] > 0
        assert numbers["accuracy"] is not None
    assert set(result["ratios"]) == {
        "mhd_fedavg_vs_flower", "mhd_fedavg_vs_raw", "mhd_mhd_vs_flower", "mhd_mhd_vs_raw"
    }  # fmt: skip
    assert result["ratios"]["mhd_fedavg_vs_raw"]["wall"] > 0
    assert result["target"]["mhd_fedavg"] == "no target at this K"
    # Ray's daemons and workers count: a Ray run has more than its driver process
    mhd_run = next(run for run in report["runs"] if run["system"] == "mhd_fedavg")
    assert mhd_run["max_processes"] > 1 and mhd_run["killed_leftovers"] == []
    if flower_absent:  # reported, never silently skipped
        assert report["flower"]["status"] == "not installed"
        assert result["systems"]["flower"]["status"] == "not installed"
        assert result["ratios"]["mhd_fedavg_vs_flower"] == {"wall": None, "pss": None}
        assert not any(run["system"] == "flower" for run in report["runs"])
