"""The weight-sharing baselines (fedavg, gossip): exact averages, mixing weights, bytes, learning.

Both share WEIGHTS on purpose (agents/weight_sharing.py); tests/test_privacy.py checks that no
other method ever does.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest
from omegaconf import OmegaConf

from agents import weight_sharing
from agents.model import MultiHeadModel
from sim.backends import create_backend
from sim.backends.serial import SerialBackend
from sim.core.errors import ConfigError
from sim.experiment.assembly import Experiment, build_experiment
from sim.experiment.methods import METHODS
from sim.experiment.mixing import metropolis_hastings, uniform
from sim.experiment.settings import check_config
from sim.reporting.loggers import Sink
from sim.run.checkpoint import CheckpointStore
from sim.run.exchange import EXCHANGES, FedAvgExchange, build_exchange
from sim.run.interrupt import RunInterrupted
from sim.run.loop import CheckpointPolicy, group_plans, run_rounds
from sim.run.main import run
from tests.conftest import TINY, make_config

QUIET = [*TINY, "logger.report=false"]
CONF = Path(__file__).resolve().parents[1] / "conf"

# ---- exact averages, on the serial backend ----------------------------------------------------


def _started(*overrides: str) -> tuple[Experiment, SerialBackend]:
    experiment = build_experiment(make_config(*QUIET, "runtime.backend=serial", *overrides))
    backend, groups = create_backend(experiment)
    assert isinstance(backend, SerialBackend)
    backend.start(group_plans(experiment, groups), experiment.public)
    return experiment, backend


def _weights(backend: SerialBackend) -> dict[int, dict[str, np.ndarray]]:
    """Every agent's floating-point model state (what the baselines average)."""
    agents = {agent_id: agent for group in backend.groups for agent_id, agent in group.agents.items()}
    return {
        agent_id: {name: t.numpy().copy() for name, t in agent.model.state_dict().items() if t.is_floating_point()}
        for agent_id, agent in agents.items()
    }


def test_a_fedavg_round_leaves_every_agent_with_the_shard_weighted_mean() -> None:
    experiment, backend = _started("method=fedavg", "partition=iid", "partition.quantity_skew=1.0")
    sizes = {spec.agent_id: len(spec.private_y) for spec in experiment.specs}
    assert len(set(sizes.values())) > 1  # unequal shards, so the weighting matters
    backend.run_round(0, publish=False)
    before = _weights(backend)
    assert not np.array_equal(before[0]["heads.weight"], before[1]["heads.weight"])
    uploads = backend.mix_weights(0, FedAvgExchange(experiment).mixing)
    after = _weights(backend)
    total = sum(sizes.values())
    for name in before[0]:
        expected = sum(sizes[agent] * before[agent][name].astype(np.float64) for agent in before) / total
        for agent in after:
            np.testing.assert_array_equal(after[agent][name], after[0][name])  # identical everywhere
        np.testing.assert_allclose(after[0][name], expected, rtol=1e-6, atol=1e-7)
    values = sum(array.size for array in before[0].values())
    assert uploads == {agent: values * 4 for agent in sizes}  # float32


def test_fedavg_rows_are_one_average_computed_once_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """FedAvg's rows are all the same, so a worker averages once, not once per agent it hosts."""
    experiment, backend = _started("method=fedavg")
    mixing = FedAvgExchange(experiment).mixing
    assert len(set(mixing.values())) == 1 and len(mixing) == experiment.num_agents
    calls = []
    original = weight_sharing.weighted_average
    monkeypatch.setattr(weight_sharing, "weighted_average", lambda weighted: calls.append(1) or original(weighted))
    backend.run_round(0, publish=False)
    backend.mix_weights(0, mixing)
    assert len(calls) == len(backend.groups)


def test_batch_norm_statistics_are_averaged_and_its_counter_stays_local() -> None:
    experiment, backend = _started("method=fedavg", "backbone=resnet8", "train.local_steps=1")
    backend.run_round(0, publish=False)
    before = _weights(backend)
    assert any(name.endswith("running_var") for name in before[0])
    assert not any(name.endswith("num_batches_tracked") for name in before[0])
    backend.mix_weights(0, FedAvgExchange(experiment).mixing)
    after = _weights(backend)
    for name in (name for name in before[0] if name.endswith(("running_mean", "running_var"))):
        assert not np.array_equal(before[0][name], before[1][name])
        np.testing.assert_array_equal(after[0][name], after[1][name])


def test_every_agent_starts_from_agent_0s_initial_weights() -> None:
    experiment, backend = _started("method=gossip")
    assert not np.array_equal(_weights(backend)[0]["heads.weight"], _weights(backend)[1]["heads.weight"])
    build_exchange(experiment).start(backend)
    weights = _weights(backend)
    for agent in weights:
        for name, array in weights[0].items():
            np.testing.assert_array_equal(weights[agent][name], array)


# ---- mixing weights ---------------------------------------------------------------------------


def _matrix(mixing: Any, size: int) -> np.ndarray:
    matrix = np.zeros((size, size))
    for agent, row in mixing.items():
        assert [sender for sender, _ in row] == sorted(sender for sender, _ in row)
        for sender, weight in row:
            matrix[agent, sender] = weight
    return matrix


def test_metropolis_hastings_weights_are_symmetric_and_doubly_stochastic() -> None:
    star = _matrix(metropolis_hastings(nx.star_graph(4).to_directed()), 5)  # hub 0 (degree 4), leaves degree 1
    assert star[1, 0] == star[0, 1] == 1 / 5 and star[1, 1] == pytest.approx(4 / 5)
    assert star[0, 0] == pytest.approx(1 / 5) and star[1, 2] == 0
    ring = _matrix(metropolis_hastings(nx.cycle_graph(6).to_directed()), 6)
    assert ring[2, 1] == ring[2, 3] == 1 / 3
    for matrix in (star, ring):
        np.testing.assert_allclose(matrix, matrix.T)
        np.testing.assert_allclose(matrix.sum(axis=0), 1)
        np.testing.assert_allclose(matrix.sum(axis=1), 1)


def test_on_a_directed_graph_rows_use_in_neighbours_only() -> None:
    directed_ring = nx.cycle_graph(4, create_using=nx.DiGraph)  # i -> i + 1: agent i hears i - 1
    assert uniform(directed_ring)[0] == ((0, 0.5), (3, 0.5))
    assert metropolis_hastings(directed_ring)[2] == ((1, 0.5), (2, 0.5))


# ---- whole runs: equivalence and bytes --------------------------------------------------------


@pytest.fixture(scope="module")
def summaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    runs = {
        "fedavg": ["method=fedavg"],
        "gossip_ring": ["method=gossip"],
        "gossip_complete_uniform": ["method=gossip", "topology=complete", "method.mixing=uniform"],
    }
    root = tmp_path_factory.mktemp("weight_sharing")
    return {name: run(make_config(*QUIET, "runtime.backend=serial", *args), root / name) for name, args in runs.items()}


def test_gossip_on_a_complete_graph_with_uniform_weights_is_fedavg_with_equal_shards(
    summaries: dict[str, dict[str, Any]],
) -> None:
    experiment = build_experiment(make_config(*QUIET))
    assert len(set(experiment.class_counts.sum(axis=1))) == 1  # equal shards
    assert summaries["gossip_complete_uniform"]["final"] == summaries["fedavg"]["final"]
    assert summaries["gossip_ring"]["final"] != summaries["fedavg"]["final"]


def test_bytes_are_parameters_times_4_bytes_times_links(summaries: dict[str, dict[str, Any]]) -> None:
    spec = build_experiment(make_config(*QUIET, "method=fedavg")).specs[0]
    values = sum(t.numel() for t in MultiHeadModel(spec.model).state_dict().values() if t.is_floating_point())
    agents, rounds = 4, 3
    links = {"fedavg": 2 * agents, "gossip_ring": 2 * agents, "gossip_complete_uniform": agents * (agents - 1)}
    for name, summary in summaries.items():
        assert summary["shares_weights"] is True
        assert summary["comm_bytes_per_edge_per_round"] == values * 4
        assert summary["comm_bytes_per_round"] == values * 4 * links[name]
        assert summary["comm_bytes_total"] == values * 4 * links[name] * rounds


# ---- config ---------------------------------------------------------------------------------


def test_every_method_names_a_registered_exchange() -> None:
    for name in METHODS:
        assert check_config(make_config(*QUIET, f"method={name}")).method.exchange in EXCHANGES


def test_bad_values_are_one_line_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"^method.mixing='best' is invalid: known names are metropolis_hastings, uniform$"
    ):
        check_config(make_config(*QUIET, "method=gossip", "method.mixing=best"))
    mixed = build_experiment(make_config(*QUIET, "method=fedavg", "backbone=mixed"))
    with pytest.raises(ConfigError, match=r"^backbone=.* one architecture for every agent: method=fedavg averages"):
        build_exchange(mixed)


# ---- slow: learning, serial == Ray, checkpoint/resume -----------------------------------------


@pytest.mark.slow
def test_fedavg_and_gossip_learn_on_label_skewed_digits(tmp_path: Path) -> None:
    """8 agents, 90% of each shard from 2 classes, 8 rounds: isolated ~0.48, fedavg ~0.88, gossip ~0.62.

    (At 4 rounds the fan_in init lets isolated agents reach 0.36, too close to fedavg's 0.46 to tell.)
    """
    shared = {}
    quiet = ["logger.progress=false", "logger.report=false", "runtime.torch_threads=1", "runtime.backend=serial"]
    for method in ("isolated", "fedavg", "gossip"):
        cfg = make_config(f"method={method}", "rounds=8", "eval_every=8", "checkpoint_every=0", *quiet)
        shared[method] = run(cfg, tmp_path / method)["final"]["heads"]["main"]["shared_acc"]
    assert shared["fedavg"] > shared["isolated"] + 0.15, shared
    assert shared["gossip"] > shared["isolated"] + 0.1, shared


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "gossip"])
def test_serial_and_ray_groupings_average_identically(ray_session: None, tmp_path: Path, method: str) -> None:
    def final(name: str, *overrides: str) -> dict[str, Any]:
        summary = run(make_config(*QUIET, f"method={method}", *overrides), tmp_path / name)
        return {key: summary[key] for key in ("final", "comm_bytes_total")}

    serial = final("serial", "runtime.backend=serial")
    assert serial == final("ray-2x2", "runtime.backend=ray", "runtime.agents_per_actor=2")
    assert serial == final(
        "ray-4x1", "runtime.backend=ray", "runtime.agents_per_actor=1", "runtime.num_cpus_per_actor=0.5"
    )


class StopAfter(Sink):
    """Sends SIGINT to this process after round `at`, as a user's Ctrl-C would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def log_round(self, round_idx: int, record: dict[str, float]) -> None:
        if round_idx == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedavg", "gossip"])
def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path: Path, method: str) -> None:
    overrides = [*QUIET, f"method={method}", "rounds=4", "checkpoint_every=2", "runtime.backend=serial"]
    reference = run(make_config(*overrides), tmp_path / "reference")
    cfg = make_config(*overrides)
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    policy = CheckpointPolicy(2, CheckpointStore(run_dir, keep=2))
    with pytest.raises(RunInterrupted):
        run_rounds(experiment, backend, group_plans(experiment, groups), [StopAfter(0)], run_dir, policy, None)
    resumed = run(make_config(f"resume={run_dir}", "runtime.backend=serial", "logger.report=false"), Path("unused"))
    assert resumed["final"] == reference["final"]
    assert resumed["comm_bytes_total"] == reference["comm_bytes_total"]
