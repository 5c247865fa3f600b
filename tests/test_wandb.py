"""The wandb sink, offline and for real (no mocks): what it writes is read back from the run's .wandb file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.run.main import run
from tests.conftest import TINY, make_config

MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of chunked records
HEADER = 7  # file header (":W&B", magic, version) and chunk header (crc32c, length, type) alike
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """Every protobuf Record of a .wandb file, reassembled from its chunks."""
    from wandb.proto.wandb_internal_pb2 import Record  # type: ignore[attr-defined]  # generated, untyped

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        if BLOCK - offset % BLOCK < HEADER:  # a block's tail too short for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        length = int.from_bytes(data[offset + 4 : offset + 6], "little")
        kind = data[offset + 6]
        pending += data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind in (FULL, LAST):
            yield Record.FromString(pending)
            pending = b""
        elif kind not in (FIRST, MIDDLE):
            break  # zero padding at the end of the file


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The run record, config keys, history rows and final summary of the one offline run."""
    import wandb

    wandb.teardown()  # run.finish() returns before wandb's service has written the file; this waits for it
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    found: dict[str, Any] = {"history": [], "summary": {}, "config": set(), "run": None, "exit": None}
    for record in wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["run"] = record.run
            found["config"] |= {item.key for item in record.run.config.update}
        elif kind == "config":
            found["config"] |= {item.key for item in record.config.update}
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            found["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(found["summary"], item)
        elif kind == "exit":
            found["exit"] = record.exit.exit_code
    return found


def _put(target: dict[str, Any], item: Any) -> None:
    """Store one history/summary item; media arrive as nested keys (["setup/graph", "_type"])."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb with no network, no login and nothing written outside tmp_path."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


@pytest.mark.slow
def test_offline_run_logs_rounds_accuracies_tables_images_and_summary(tmp_path: Path, offline_wandb: None) -> None:
    overrides = ["logger=wandb", "logger.mode=offline", "logger.group=study-a", "logger.report=false", "eval_every=1"]
    summary = run(make_config(*TINY, "runtime.backend=serial", *overrides), tmp_path / "run")
    found = read_offline_run(tmp_path / "run")

    assert found["run"].run_group == "study-a" and found["run"].job_type == "mhd"
    assert {"num_agents", "method", "topology", "partition", "train"} <= found["config"]
    rows = found["history"]
    assert {"setup/graph", "setup/partition"} <= set(rows[0]) and rows[0]["round"] == 0
    per_round = [row for row in rows if "loss/ce" in row]
    assert [row["round"] for row in per_round] == [1, 2, 3]
    heads = ("main", "aux1", "aux2", "aux3")
    expected = {"loss/ce", "loss/total", "comm/bytes", "time/round_s", "per_agent"}
    expected |= {f"{m}/{h}{s}" for m in ("shared_acc", "private_acc") for h in heads for s in ("", "_min", "_max")}
    for row in per_round:
        assert expected <= set(row), expected - set(row)
    for row in per_round[1:]:  # round 1 has no teachers yet: no distillation terms
        assert {"loss/kl_main", "loss/kl_aux1", "loss/kl_aux3"} <= set(row)
    assert per_round[0]["comm/bytes"] > 0 and per_round[-1]["comm/bytes"] == 0  # the last round publishes nothing
    assert per_round[-1]["shared_acc/main"] == pytest.approx(summary["final"]["heads"]["main"]["shared_acc"])
    assert per_round[0]["per_agent"]["_type"] == "table-file" and per_round[0]["per_agent"]["nrows"] == 4 * 4
    assert {"final/graph", "final/private_vs_shared"} <= set(rows[-1])

    final = found["summary"]
    assert final["final/heads/aux3/private_acc_max"] == pytest.approx(
        summary["final"]["heads"]["aux3"]["private_acc_max"]
    )
    assert final["comm_bytes_total"] == summary["comm_bytes_total"] and final["status"] == "completed"
    assert found["exit"] == 0
    (files,) = (tmp_path / "run" / "wandb").glob("offline-run-*/files")
    images = {image.parent.name + "/" + image.name.rsplit("_", 2)[0] for image in files.glob("media/images/**/*.png")}
    assert images == {"setup/graph", "setup/partition", "final/graph", "final/private_vs_shared"}
    last_table = json.loads((files / rows[-2]["per_agent"]["path"]).read_text())
    assert last_table["columns"] == ["round", "agent", "head", "shared_acc", "private_acc"]
    by_agent_head = {(agent, head): shared for _, agent, head, shared, _ in last_table["data"]}
    assert by_agent_head[(2, "aux1")] == pytest.approx(summary["final"]["per_agent"]["2"]["aux1"]["shared_acc"])


def test_disabled_mode_runs_and_writes_no_wandb_run(tmp_path: Path, offline_wandb: None) -> None:
    overrides = ["logger=wandb", "logger.mode=disabled", "logger.report=false"]
    summary = run(make_config(*TINY, "runtime.backend=serial", *overrides), tmp_path / "run")
    assert summary["status"] == "completed"
    assert not list((tmp_path / "run").glob("wandb/*run-*"))


@pytest.mark.slow
def test_a_multirun_groups_its_runs_by_sweep_directory_and_names_them_by_overrides(
    tmp_path: Path, offline_wandb: None
) -> None:
    sweep = tmp_path / "sweep"
    args = [*TINY, "runtime.backend=serial", "logger=wandb", "logger.mode=offline", "logger.report=false"]
    done = subprocess.run(
        [MHD_SIM, "--multirun", *args, "seed=0,1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    runs = [read_offline_run(sweep / job)["run"] for job in ("0", "1")]
    assert {run.run_group for run in runs} == {str(sweep)}
    assert [run.display_name for run in runs] == ["seed=0", "seed=1"]


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_logs_no_round_twice(tmp_path: Path, offline_wandb: None) -> None:
    """Stopped after a few rounds, its newest checkpoint then torn: the resume replays rounds wandb already holds."""
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "rounds=20",
        "eval_every=1",
        "checkpoint_every=4",
        "checkpoint_keep=3",
        "runtime.backend=serial",
    ]
    logger = ["logger=wandb", "logger.mode=offline", "logger.report=false"]  # resume= takes the logger it is given
    overrides += logger
    process = subprocess.Popen(
        [MHD_SIM, *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    newest = sorted((run_dir / "checkpoints").glob("round_*"))[-1] / "agent_00000.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # resume falls back to an older checkpoint and replays
    resumed = subprocess.run(
        [MHD_SIM, f"resume={run_dir}", *logger, f"hydra.run.dir={tmp_path / 'resume-call'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping damaged checkpoint" in resumed.stderr

    import wandb

    wandb.teardown()
    pieces = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(pieces) == 2  # the first process's, and the resumed one's
    runs, rounds = [], []
    for piece in pieces:
        for record in wandb_records(piece):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append(record.run)
            elif kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _put(row, item)
                if "loss/ce" in row:
                    rounds.append(row["round"])
    assert len({run.run_id for run in runs}) == 1 and len({run.display_name for run in runs}) == 1
    assert rounds == list(range(1, 21))  # every round once, in order: none replayed, none lost
