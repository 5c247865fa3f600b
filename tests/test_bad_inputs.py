"""Every bad input is one line naming the key and the value, exit code 2, and no work done.

Most cases run in-process through the CLI's own path (preflight, then sim.run.main.run, inside
`bad_input_exits`); a handful run the real `mhd-sim` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest
import torch

import sim.backends.runtime
import sim.run.main
from sim.core.errors import ConfigError
from sim.data import idx
from sim.run.cli import EXIT_BAD_INPUT, bad_input_exits
from sim.run.preflight import preflight
from tests.conftest import TINY, make_config

MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def case(*overrides: str, key: str, value: str, id: str, marks: pytest.MarkDecorator | None = None) -> object:
    """Overrides (TMP stands for the test's folder) and the key and value the error line must name."""
    return pytest.param(list(overrides), key, value, id=id, marks=marks or ())


BAD_INPUTS = [
    # Hydra composition and override syntax
    case("topology=rnig", key="topology", value="'rnig'", id="unknown-group-option"),
    case("+experiment=nope", key="experiment", value="'nope'", id="unknown-experiment"),
    case("experiment=headline", key="experiment", value="'headline'", id="experiment-without-plus"),
    case("foo=1", key="foo", value="1", id="unknown-top-level-key"),
    case("data.rooot=/data", key="data.rooot", value="'/data'", id="misspelt-nested-key"),
    case("num_agents=[1", key="num_agents", value="'[1'", id="unparsable-override"),
    case("num_agents:4", key="override", value="'num_agents:4'", id="override-without-equals"),
    case("~num_agents", key="num_agents", value="'~num_agents'", id="deleted-key"),
    case("num_agents=4,8", key="num_agents", value="'4,8'", id="sweep-without-multirun"),
    case("model=1", key="model", value="1", id="value-replaces-group-of-keys"),
    case("backbone.channels=32", key="backbone.channels", value="32", id="value-replaces-list"),
    case("num_agents=${nope}", key="num_agents", value="'${nope}'", id="unresolvable-interpolation"),
    case("--frobnicate", key="flags", value="'--frobnicate'", id="unknown-flag"),
    case("--cfg", "job", "--multirun", key="flags", value="--cfg --multirun", id="two-commands"),
    case("--multirun", "seed=1", key="flags", value="seed=1 follows a flag", id="overrides-around-a-flag"),
    case("hydra.run.dir=TMP/a_file/run", key="hydra.run.dir", value="a_file/run", id="run-dir-under-a-file"),
    # scalar values
    case("num_agents=0", key="num_agents", value="0", id="no-agents"),
    case("num_agents=abc", key="num_agents", value="'abc'", id="num-agents-not-a-number"),
    case("rounds=-1", key="rounds", value="-1", id="negative-rounds"),
    case("eval_every=0", key="eval_every", value="0", id="eval-every-zero"),
    case("seed=-1", key="seed", value="-1", id="negative-seed"),
    case("debug=maybe", key="debug", value="'maybe'", id="debug-not-a-bool"),
    case("model.aux_heads=17", key="model.aux_heads", value="17", id="too-many-aux-heads"),
    case("method.temperature=0", key="method.temperature", value="0", id="zero-temperature"),
    case("method.nu_main=nan", key="method.nu_main", value="nan", id="nan-loss-weight"),
    case("method.teacher_rule=best", key="method.teacher_rule", value="'best'", id="unknown-teacher-rule"),
    case("method.message_codec=int4", key="method.message_codec", value="'int4'", id="unknown-message-codec"),
    case("method.message_codec=topk", "method.message_topk=10", key="method.message_topk", value="10", id="topk-k-10"),
    case("method.message_topk=0", key="method.message_topk", value="0", id="topk-zero"),
    case("train.batch_size=0", key="train.batch_size", value="0", id="zero-batch"),
    case("partition.skew=2", key="partition.skew", value="2", id="skew-above-one"),
    case("topology=islands", "topology.num_islands=9", key="topology.num_islands", value="9", id="too-many-islands"),
    case("topology=ring", "num_agents=2", key="num_agents", value="2", id="ring-of-two"),
    case("+backbone.depth=3", key="backbone.depth", value="3", id="unknown-backbone-option"),
    case("backbone.channels=[0]", key="backbone.channels", value="[0]", id="zero-channels"),
    case("data.name=nope", key="data", value="'nope'", id="unknown-dataset"),
    # optimizer
    case("train.optimizer._target_=torch.optim.Nope", key="train.optimizer._target_", value="Nope", id="optim-import"),
    case("train.optimizer._target_=torch.nn.Linear", key="train.optimizer._target_", value="Linear", id="not-optim"),
    case("+train.optimizer.lrr=0.1", key="train.optimizer.lrr", value="0.1", id="misspelt-optimizer-kwarg"),
    case("train.optimizer.lr=-1", key="train.optimizer", value="-1", id="negative-learning-rate"),
    case("train.optimizer=sgd", key="train.optimizer", value="'sgd'", id="optimizer-not-a-mapping"),
    case("+backbone.optimizer.lrr=0.1", key="backbone.optimizer.lrr", value="0.1", id="misspelt-backbone-kwarg"),
    case("+backbone.optimizer.lr=-1", key="backbone.optimizer", value="-1", id="negative-backbone-learning-rate"),
    case("+backbone.optimizer=sgd", key="backbone.optimizer", value="sgd", id="backbone-optimizer-not-a-mapping"),
    case(
        "backbone=mixed",
        "backbone.members.hypertransformer.optimizer._target_=torch.optim.Nope",
        key="backbone.members.hypertransformer.optimizer._target_",
        value="Nope",
        id="mixed-member-optimizer-import",
    ),
    # runtime and logger
    case("runtime.backend=threads", key="runtime.backend", value="'threads'", id="unknown-backend"),
    case("runtime.torch_threads=0", key="runtime.torch_threads", value="0", id="zero-threads"),
    case("runtime.num_gpus_per_actor=abc", key="runtime.num_gpus_per_actor", value="'abc'", id="gpus-not-a-number"),
    case(
        "runtime.num_gpus_per_actor=1",
        key="runtime.num_gpus_per_actor",
        value="1",
        id="gpu-without-cuda",
        marks=NO_CUDA,
    ),
    case(
        "runtime.backend=ray",
        "runtime.address=127.0.0.1:1",
        key="runtime.address",
        value="127.0.0.1:1",
        id="unreachable",
    ),
    case("runtime.address=nohost", "runtime.backend=ray", key="runtime.address", value="'nohost'", id="address-form"),
    case("runtime.faults=[{point:boom,round:1}]", key="runtime.faults[0].point", value="'boom'", id="unknown-fault"),
    case("runtime.faults=[{point:train,round:-1}]", key="runtime.faults[0].round", value="-1", id="fault-round"),
    case("runtime.faults=[{point:train,when:1}]", key="runtime.faults[0].when", value="1", id="unknown-fault-key"),
    case("runtime.faults=[{point:train}]", key="runtime.faults", value="train", id="fault-without-actors"),
    case("convergence.window=1", key="convergence.window", value="1", id="convergence-window-not-a-fraction"),
    case("convergence.min_gain=0", key="convergence.min_gain", value="0", id="convergence-gain"),
    case("eval_subset_size=0", key="eval_subset_size", value="0", id="empty-eval-subset"),
    case("logger=wandb", "logger.mode=sometimes", key="logger.mode", value="'sometimes'", id="unknown-wandb-mode"),
    # sizes against the data, and dataset files
    case("data.public_batch_size=500", key="data.public_batch_size", value="500", id="public-batch-above-public-set"),
    case("data.public_size=5000", key="data.public_size", value="5000", id="public-set-above-training-set"),
    case("num_agents=2000", key="num_agents", value="2000", id="more-agents-than-samples"),
    case(
        "partition=dirichlet",
        "partition.min_samples=0",
        "partition.alpha=0.01",
        "num_agents=40",
        key="num_agents",
        value="40",
        id="agent-without-samples",
    ),
    case("data=mnist", "data.root=TMP/nothing_here", key="data.root", value="nothing_here", id="missing-dataset-files"),
    case(
        "data=fashion_mnist", "data.root=TMP/fmnist", key="data.root", value="train-images", id="corrupt-dataset-file"
    ),
]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A plain file (a bad parent for a run folder) and Fashion-MNIST files that fail their MD5."""
    (tmp_path / "a_file").write_text("not a folder\n")
    corrupt = tmp_path / "fmnist"
    corrupt.mkdir()
    for name in idx.FASHION_MNIST_MD5:
        (corrupt / name).write_bytes(b"not the official release")
    return tmp_path


def forbidden(*args: object, **kwargs: object) -> NoReturn:
    raise AssertionError("a backend was created for a bad input")


@pytest.mark.parametrize(("overrides", "key", "value"), BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2_before_any_work(
    overrides: list[str],
    key: str,
    value: str,
    workspace: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sim.run.main, "create_backend", forbidden)  # no actor, no agent, no training
    run_dir = workspace / "run"
    args = [*TINY, "runtime.backend=serial", *(o.replace("TMP", str(workspace)) for o in overrides)]
    with pytest.raises(SystemExit) as exited, bad_input_exits(debug=False):
        preflight(args)
        sim.run.main.run(make_config(*args), run_dir)
    assert exited.value.code == EXIT_BAD_INPUT
    stderr = capsys.readouterr().err
    assert_one_line_naming(stderr, key, value)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "metrics.jsonl").exists()


def assert_one_line_naming(stderr: str, key: str, value: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"mhd-sim: error: {key}="), lines[0]
    assert value in lines[0] and "is invalid: " in lines[0] and "Traceback" not in stderr


def test_a_sweep_checks_every_combination_before_the_first_job() -> None:
    configs = preflight(["--multirun", *TINY, "runtime.backend=serial", "seed=0,1", "method=mhd,isolated"])
    assert sorted((cfg.seed, cfg.method.name) for cfg in configs) == [
        (0, "isolated"),
        (0, "mhd"),
        (1, "isolated"),
        (1, "mhd"),
    ]
    with pytest.raises(ConfigError, match="num_agents=2 is invalid: a ring needs at least 3 agents"):
        preflight(["--multirun", *TINY, "runtime.backend=serial", "topology=islands,ring", "num_agents=4,2"])


def test_printing_the_config_checks_composition_but_not_values() -> None:
    assert preflight(["--cfg", "job", "num_agents=0"])[0].num_agents == 0
    with pytest.raises(ConfigError, match="topology='rnig'"):
        preflight(["--cfg", "job", "topology=rnig"])
    assert preflight(["--help", "topology=rnig"]) == []


# --- the real command in a subprocess --------------------------------------------------------


def mhd_sim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MHD_SIM, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=dict(os.environ))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "key", "value"),
    [
        case("topology=rnig", key="topology", value="known options are barabasi_albert", id="unknown-group-option"),
        case("foo=1", key="foo", value="no such key", id="unknown-key"),
        case("num_agents=[1", key="num_agents", value="'[1'", id="unparsable-override"),
        case("num_agents=abc", key="num_agents", value="'abc'", id="not-a-number"),
        case("hydra.run.dir=TMP/a_file/run", key="hydra.run.dir", value="a_file", id="run-dir-under-a-file"),
        case("data=fashion_mnist", "data.root=TMP/fmnist", key="data.root", value="train-images", id="corrupt-file"),
        case("--multirun", "num_agents=4,0", key="num_agents", value="0", id="bad-value-in-a-sweep"),
    ],
)
def test_the_command_prints_one_line_and_exits_2(overrides: list[str], key: str, value: str, workspace: Path) -> None:
    args = [o.replace("TMP", str(workspace)) for o in overrides]
    flags = [arg for arg in args if arg.startswith("--")]  # overrides may not sit on both sides of a flag
    outputs = [f"hydra.run.dir={workspace / 'run'}", f"hydra.sweep.dir={workspace / 'sweep'}"]
    done = mhd_sim(
        *flags, *TINY, "runtime.backend=serial", *outputs, *(a for a in args if a not in flags), cwd=workspace
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert_one_line_naming(done.stderr, key, value)
    assert not [
        path for path in workspace.rglob("summary.json") if json.loads(path.read_text())["status"] == "completed"
    ]


@pytest.mark.slow
def test_debug_shows_the_traceback_instead(tmp_path: Path) -> None:
    for bad in ("num_agents=0", "topology=rnig"):
        done = mhd_sim(*TINY, "runtime.backend=serial", "debug=true", bad, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
        assert done.returncode != 0 and "Traceback" in done.stderr and "ConfigError" in done.stderr


@pytest.mark.parametrize(
    ("overrides", "need"),
    [
        (["num_agents=100000000"], "the smallest possible agent"),  # before the graph of 10^8 nodes is built
        (["data=synthetic", "data.num_train=70000", "num_agents=60000"], "weights, gradients, optimizer state"),
    ],
    ids=["any-agent", "these-models"],
)
def test_a_population_that_cannot_fit_in_memory_is_refused_at_once(
    overrides: list[str], need: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a machine of 16 GiB, whatever this one has."""
    monkeypatch.setattr(sim.backends.runtime, "machine_memory_bytes", lambda: 16 * 2**30)
    monkeypatch.setattr(sim.run.main, "create_backend", forbidden)
    with pytest.raises(SystemExit) as exited, bad_input_exits(debug=False):
        sim.run.main.run(make_config(*TINY, "runtime.backend=serial", *overrides), Path("unused"))
    assert exited.value.code == EXIT_BAD_INPUT
    stderr = capsys.readouterr().err
    assert_one_line_naming(stderr, "num_agents", overrides[-1].split("=")[1])
    assert "on this machine (16.0 GiB of memory)" in stderr and need in stderr
