"""Dynamic networks (docs/dynamic.md): re-drawn graphs, churn, delays, and what they must not break.

Every property here is checked on the serial backend in seconds; one slow test runs the same
dynamic run on Ray actors.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from agents.agent import Agent
from agents.inbox import RoundPlan
from agents.messages import Prediction
from sim.backends import create_backend
from sim.backends.serial import SerialBackend
from sim.core.errors import ConfigError
from sim.experiment.assembly import Experiment, build_experiment
from sim.experiment.settings import check_config
from sim.reporting.report import write_run_report
from sim.run.checkpoint import CheckpointStore
from sim.run.exchange import build_exchange
from sim.run.interrupt import RunInterrupted
from sim.run.loop import CheckpointPolicy, group_plans, run_rounds
from sim.run.main import run
from tests.conftest import TINY, make_config
from tests.test_reliability import SignalAt
from topologies import build_topology

QUIET = [*TINY, "logger.report=false", "runtime.backend=serial"]
CHURN = ["participation.rule=bernoulli", "participation.q=0.6", "delay.rule=uniform", "delay.rounds=2"]
DYNAMIC = [*CHURN, "topology=k_out", "topology.p_fail=0.2", "rounds=5", "eval_every=5"]


def _experiment(*overrides: str) -> Experiment:
    return build_experiment(make_config(*QUIET, *overrides))


def _run_groups(experiment: Experiment, groups: list[list[int]], run_dir: Path) -> dict[str, Any]:
    """A whole run on the serial backend with the agents split into `groups` (as actors would be)."""
    backend, _ = create_backend(experiment)
    policy = CheckpointPolicy(0, CheckpointStore(run_dir, 1))
    run_dir.mkdir(parents=True)
    return run_rounds(experiment, backend, group_plans(experiment, groups), [], run_dir, policy, None)


def _trained_agents(backend: SerialBackend) -> dict[int, Agent]:
    return {agent_id: agent for group in backend.groups for agent_id, agent in group.agents.items()}


def _parameters(agent: Agent) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in agent.model.state_dict().items()}


# ---- the schedule --------------------------------------------------------------------------------


def test_the_schedule_is_a_pure_function_of_seed_and_round() -> None:
    plans = [_experiment(*DYNAMIC).settings.schedule.plan(r) for r in range(5)]
    fresh = _experiment(*DYNAMIC).settings.schedule
    assert [fresh.plan(r) for r in reversed(range(5))] == plans[::-1]  # any order of asking
    other_seed = _experiment(*DYNAMIC, "seed=1").settings.schedule
    assert [other_seed.plan(r) for r in range(5)] != plans


def test_a_resampled_graph_differs_between_draws_and_is_fixed_by_the_seed() -> None:
    schedule = _experiment(
        "num_agents=8", "topology=erdos_renyi", "topology.resample_every=2", "rounds=6"
    ).settings.schedule
    graphs = [sorted(schedule.graph(r).edges()) for r in range(6)]
    assert graphs[0] == graphs[1] and graphs[2] == graphs[3]  # one draw per 2 rounds
    assert graphs[0] != graphs[2] != graphs[4]
    assert graphs[0] == sorted(schedule.base_graph.edges())  # draw 0 is the static graph
    again = _experiment(
        "num_agents=8", "topology=erdos_renyi", "topology.resample_every=2", "rounds=6"
    ).settings.schedule
    assert [sorted(again.graph(r).edges()) for r in range(6)] == graphs


def test_edge_failures_remove_a_p_fail_share_of_edges() -> None:
    schedule = _experiment("num_agents=8", "topology=complete", "topology.p_fail=0.25", "rounds=40").settings.schedule
    live = [schedule.graph(r).number_of_edges() for r in range(40)]
    assert len(set(live)) > 1
    assert abs(np.mean(live) / 56 - 0.75) < 0.05


def test_new_topologies_have_their_shape() -> None:
    matching = build_topology("random_matching", 7, 0, {"require_connected": False})
    assert sorted(dict(matching.out_degree()).values()) == [0, 1, 1, 1, 1, 1, 1]
    assert all(matching.has_edge(v, u) for u, v in matching.edges())
    k_out = build_topology("k_out", 9, 0, {"k": 3, "require_connected": False})
    assert set(dict(k_out.out_degree()).values()) == {3} and nx.number_of_selfloops(k_out) == 0
    directed = build_topology("directed_erdos_renyi", 30, 0, {"p": 0.3, "require_connected": False})
    assert any(not directed.has_edge(v, u) for u, v in directed.edges())


def test_participation_rules() -> None:
    fraction = _experiment("num_agents=8", "participation.rule=fraction", "participation.q=0.5").settings.schedule
    assert all(len(fraction.active(r)) == 4 for r in range(3))
    assert len({fraction.active(r) for r in range(3)}) > 1
    bernoulli = _experiment("num_agents=8", "participation.rule=bernoulli", "participation.q=0.5", "rounds=50")
    share = np.mean([len(bernoulli.settings.schedule.active(r)) / 8 for r in range(50)])
    assert 0.4 < share < 0.6


def test_an_availability_trace_is_followed(tmp_path: Path) -> None:
    csv = tmp_path / "trace.csv"
    csv.write_text("0,1,2,3\n1,1,0,1\n0,1,1,1\n1,1,1,0\n")
    schedule = _experiment("participation.rule=trace", f"participation.trace={csv}").settings.schedule
    assert [sorted(schedule.active(r)) for r in range(3)] == [[0, 1, 3], [1, 2, 3], [0, 1, 2]]
    as_json = tmp_path / "trace.json"
    as_json.write_text(json.dumps({"0": [1, 0, 1], "1": [1, 1, 1], "2": [0, 1, 1], "3": [1, 1, 0]}))
    again = _experiment("participation.rule=trace", f"participation.trace={as_json}").settings.schedule
    assert [again.active(r) for r in range(3)] == [schedule.active(r) for r in range(3)]


def test_inactive_agents_are_never_published_to_or_from() -> None:
    schedule = _experiment(*DYNAMIC, "rounds=12").settings.schedule
    for r in range(12):
        plan = schedule.plan(r)
        assert plan.publishers <= plan.active
        sent = {(u, v) for u, v, _ in schedule.sends(r)}  # on the round's own (re-drawn, failing) graph
        assert sent == {(u, v) for u, v in schedule.graph(r).edges() if u in plan.active}
        for receiver, deliveries in plan.deliveries.items():
            for delivery in deliveries:
                assert receiver in schedule.active(delivery.arrives)  # it is there when the message arrives
                assert delivery.sender in schedule.active(r - 1)  # the sender was there to send it


def test_comm_every_exchanges_only_every_nth_round() -> None:
    experiment = _experiment("comm_every=2", "rounds=6")
    exchange = build_exchange(experiment)
    assert [exchange.publishes(r) for r in range(6)] == [False, True, False, True, False, False]  # not after the last
    assert [len(experiment.settings.schedule.sends(r)) for r in range(6)] == [0, 8, 0, 8, 0, 8]  # the ring's 8 edges
    assert [bool(experiment.settings.schedule.plan(r).deliveries) for r in range(6)] == [
        False,
        False,
        True,
        False,
        True,
        False,
    ]
    fedavg = build_exchange(_experiment("method=fedavg", "comm_every=3", "rounds=6"))
    assert fedavg.link_rounds() == 2 * 4 * 2  # rounds 2 and 5: every agent uploads and downloads


# ---- agents under a plan -------------------------------------------------------------------------


def test_an_inactive_agent_does_not_train_publish_or_receive() -> None:
    experiment = _experiment("topology=complete")
    backend, groups = create_backend(experiment)
    assert isinstance(backend, SerialBackend)
    backend.start(group_plans(experiment, groups), experiment.public)
    everyone = frozenset(range(4))
    backend.run_round(0, True, RoundPlan.static({v: [u for u in range(4) if u != v] for v in range(4)}, 0))
    agents = _trained_agents(backend)
    before = _parameters(agents[2])
    generator = agents[2].generator.get_state().clone()
    inbox = dict(agents[2].inbox.held)
    plan = RoundPlan.static({v: [u for u in range(4) if u != v] for v in range(4)}, 1)
    plan = RoundPlan(everyone - {2}, everyone - {2}, plan.deliveries)  # agent 2 offline, though sent to
    metrics = backend.run_round(1, True, plan)
    assert 2 not in metrics and set(metrics) == {0, 1, 3}
    after = _parameters(agents[2])
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(agents[2].generator.get_state(), generator)
    assert agents[2].inbox.held == inbox and not agents[2].inbox.pending  # received nothing
    assert 2 not in backend.bundles[0]  # published nothing
    assert all(agents[v].inbox.held[u].batch_id == 1 for v in (0, 1, 3) for u in (0, 1, 3) if u != v)
    assert agents[0].inbox.held[2].batch_id == 1  # 2's message from round 0 arrived; nothing newer


@pytest.mark.parametrize("include_self", [False, True])
def test_a_delayed_message_is_used_exactly_delay_rounds_later_on_its_own_public_batch(
    monkeypatch: pytest.MonkeyPatch, include_self: bool
) -> None:
    """Under include_self the agent's own message on the late message's batch competes with it."""
    experiment = _experiment("delay.rounds=2", "rounds=6", "topology=complete", f"method.include_self={include_self}")
    seen: list[tuple[int, int, list[tuple[int, int]], tuple[int, ...]]] = []
    pools: list[bool] = []  # per distilling step: whether it drew from public batch r - 2
    expected: dict[int, torch.Tensor | None] = {}
    round_targets, step_batch = Agent.round_targets, Agent.step_batch

    def spy(agent: Agent, round_idx: int, inbox: list[Prediction]) -> Any:
        teachers = round_targets(agent, round_idx, inbox)
        seen.append((agent.agent_id, round_idx, sorted((m.sender, m.batch_id) for m in inbox), teachers.batches))
        expected[agent.agent_id] = agent.public_batch(teachers.batches[0]) if teachers.batches else None
        return teachers

    def step_spy(agent: Agent, public_batch: torch.Tensor | None) -> Any:
        if public_batch is not None:  # the steps draw from that message's own public batch
            pools.append(torch.equal(public_batch, expected[agent.agent_id]))
        return step_batch(agent, public_batch)

    monkeypatch.setattr(Agent, "step_batch", step_spy)
    monkeypatch.setattr(Agent, "round_targets", spy)
    backend, groups = create_backend(experiment)
    backend.start(group_plans(experiment, groups), experiment.public)
    for r in range(6):
        backend.run_round(r, r < 5, experiment.settings.schedule.plan(r))
    for agent_id, round_idx, inbox, batches in seen:
        others = [u for u in range(4) if u != agent_id]
        if round_idx < 3:  # sent at the end of round 0 at the earliest, 2 rounds late: round 3
            assert inbox == []
            assert batches == ((round_idx,) if include_self and round_idx > 0 else ())  # only its own message
        else:  # made at the end of round r - 3, on public batch r - 2: exactly 2 rounds late
            assert inbox == [(u, round_idx - 2) for u in others]
            assert batches == (round_idx - 2,)  # with include_self, its own message on that batch
    distilling_rounds = 5 if include_self else 3
    assert len(pools) == distilling_rounds * 4 * 2 and all(pools)  # 4 agents, 2 steps each


def test_the_newest_message_per_sender_wins_and_max_staleness_drops_old_ones() -> None:
    experiment = _experiment("topology=complete")
    backend, groups = create_backend(experiment)
    backend.start(group_plans(experiment, groups), experiment.public)
    agent = _trained_agents(backend)[0]
    old, new = agent.predict(3), agent.predict(5)
    newer, older = (Prediction(1, m.batch_id, m.codec, m.num_classes, dict(m.payload)) for m in (new, old))
    agent.inbox.receive(newer, arrives=5)  # batch 5 on time ...
    agent.inbox.receive(older, arrives=6)  # ... overtakes batch 3, which was sent earlier but arrives later
    agent.inbox.open(4)
    assert agent.inbox.held == {} and len(agent.inbox.pending) == 2
    agent.inbox.open(5)
    assert agent.inbox.held[1] is newer
    agent.inbox.open(6)
    assert agent.inbox.held[1] is newer and agent.inbox.pending == []  # the older one is dropped
    assert agent.inbox.usable(7, max_staleness=1) == []
    assert agent.inbox.usable(7, max_staleness=2) == [newer]


# ---- whole runs ---------------------------------------------------------------------------------


def test_a_dynamic_run_does_not_depend_on_how_agents_are_grouped(tmp_path: Path) -> None:
    experiment = _experiment(*DYNAMIC)
    one = _run_groups(experiment, [[0, 1, 2, 3]], tmp_path / "one")
    assert one["network"]["active_fraction_mean"] < 1 and one["network"]["staleness_max"] > 0
    assert one["final"] == _run_groups(_experiment(*DYNAMIC), [[0], [1], [2], [3]], tmp_path / "four")["final"]
    assert one["final"] == _run_groups(_experiment(*DYNAMIC), [[3, 1], [0, 2]], tmp_path / "two")["final"]


def test_the_dynamic_path_at_lock_step_gives_the_static_numbers(tmp_path: Path) -> None:
    """A schedule that is dynamic in form (fraction q=1: everyone, every round) routes like lock-step."""
    static = run(make_config(*QUIET), tmp_path / "static")
    dynamic = run(make_config(*QUIET, "participation.rule=fraction", "participation.q=1.0"), tmp_path / "dynamic")
    assert dynamic["network"]["staleness_max"] == 0 and dynamic["network"]["active_fraction_mean"] == 1
    assert dynamic["final"] == static["final"]
    assert dynamic["comm_bytes_total"] == static["comm_bytes_total"]


def test_staleness_and_the_network_are_logged(tmp_path: Path) -> None:
    summary = run(make_config(*QUIET, "delay.rounds=1", "rounds=4", "eval_every=2"), tmp_path / "run")
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert ["staleness/mean" in record for record in rounds] == [False, False, True, True]
    assert all(record["staleness/mean"] == record["staleness/max"] == 1 for record in rounds[2:])
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert evaluations[-1]["staleness/mean"] == 1
    assert summary["network"]["staleness_mean"] == summary["network"]["staleness_max"] == 1
    network = [json.loads(line) for line in (tmp_path / "run" / "network.jsonl").read_text().splitlines()]
    assert [line["round"] for line in network] == [1, 2, 3, 4]
    assert network[0]["links"][0] == [0, 1, 1]  # ring: 0 -> 1, one round late
    assert network[-1]["links"] == []  # nothing is published after the last round
    write_run_report(tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "network.png").is_file()
    assert "network.png" in (tmp_path / "run" / "report.html").read_text()


def test_resume_with_churn_and_delays_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    overrides = [*DYNAMIC, "rounds=6", "eval_every=2", "checkpoint_every=2"]
    reference = run(make_config(*QUIET, *overrides), tmp_path / "reference")
    cfg = make_config(*QUIET, *overrides)
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    policy = CheckpointPolicy(2, CheckpointStore(run_dir, 3))
    with pytest.raises(RunInterrupted):
        sinks = [SignalAt(2, signal.SIGINT)]
        run_rounds(experiment, backend, group_plans(experiment, groups), sinks, run_dir, policy, None)
    resumed = run(make_config(f"resume={run_dir}", "runtime.backend=serial", "logger.report=false"), Path("unused"))
    assert resumed["final"] == reference["final"]
    assert resumed["network"] == reference["network"]
    assert resumed["comm_bytes_total"] == reference["comm_bytes_total"]


def test_fedavg_averages_only_the_active_agents_and_the_others_keep_their_weights() -> None:
    experiment = _experiment("method=fedavg", "participation.rule=fraction", "participation.q=0.5")
    backend, groups = create_backend(experiment)
    assert isinstance(backend, SerialBackend)
    backend.start(group_plans(experiment, groups), experiment.public)
    exchange = build_exchange(experiment)
    exchange.start(backend)
    agents = _trained_agents(backend)
    plan = experiment.settings.schedule.plan(0)
    active, offline = sorted(plan.active), sorted(set(range(4)) - plan.active)
    assert len(active) == 2
    start = {agent_id: _parameters(agent) for agent_id, agent in agents.items()}
    backend.run_round(0, False, plan)
    trained = {agent_id: _parameters(agent) for agent_id, agent in agents.items()}
    sent = exchange.after_training(backend, 0, {})
    sizes = {agent_id: len(agents[agent_id].spec.private_y) for agent_id in active}
    for name, tensor in start[0].items():
        if not tensor.is_floating_point():
            continue
        expected = sum(sizes[a] * trained[a][name].double() for a in active) / sum(sizes.values())
        for agent_id in active:
            torch.testing.assert_close(agents[agent_id].model.state_dict()[name].double(), expected)
        for agent_id in offline:  # neither trained nor averaged
            assert torch.equal(agents[agent_id].model.state_dict()[name], start[agent_id][name])
    assert sent == 2 * sum(4 * t.numel() for t in start[0].values() if t.is_floating_point()) * len(active)


def test_gossip_mixes_only_active_agents_on_the_rounds_graph(tmp_path: Path) -> None:
    summary = run(make_config(*QUIET, "method=gossip", "topology=random_matching", *CHURN[:2]), tmp_path / "run")
    network = [json.loads(line) for line in (tmp_path / "run" / "network.jsonl").read_text().splitlines()]
    for line in network:
        assert all(u in line["active"] and v in line["active"] for u, v, _ in line["links"])
        assert len(line["links"]) <= 4  # a matching of 4 agents: at most 2 pairs, both ways
    assert summary["status"] == "completed"


# ---- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["participation.rule=bernoulli", "participation.q=0"], "participation.q"),
        (["participation.q=1.5"], "participation.q"),
        (["participation.rule=sometimes"], "participation.rule"),
        (["delay.rounds=-1"], "delay.rounds"),
        (["delay.per=node"], "delay.per"),
        (["delay.max_staleness=-2"], "delay.max_staleness"),
        (["topology.p_fail=1.0"], "topology.p_fail"),
        (["topology.p_fail=-0.1"], "topology.p_fail"),
        (["topology.resample_every=0"], "topology.resample_every"),
        (["comm_every=0"], "comm_every"),
        (["method=fedavg", "delay.rounds=1"], "delay.rounds"),
        (["method=central", "participation.rule=bernoulli", "participation.q=0.5"], "method"),
        (["participation.rule=trace"], "participation.trace"),
    ],
)
def test_bad_values_are_one_line_config_errors_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        check_config(make_config(*QUIET, *overrides))
    assert error.value.key == key
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0,1,2,7\n1,1,1,1\n1,1,1,1\n1,1,1,1\n", "agents \\[7\\]"),
        ("0,1,2\n1,1,1\n1,1,1\n1,1,1\n", "agents \\[3\\]"),
        ("0,1,2,3\n1,1,1,1\n1,1,1,1\n", "2 rounds, but the run has rounds=3"),
        ("0,1,2,3\n1,1,1,1\n1,2,1,1\n1,1,1,1\n", "only 0"),
        ("0,1,2,3\n1,1,1,x\n1,1,1,1\n1,1,1,1\n", "unreadable"),
    ],
)
def test_a_bad_trace_is_refused_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(text)
    with pytest.raises(ConfigError, match=f"participation.trace=.*trace.csv.*{problem}"):
        check_config(make_config(*QUIET, "participation.rule=trace", f"participation.trace={trace}"))


@pytest.mark.slow
def test_serial_and_ray_give_the_same_dynamic_run(ray_session: None, tmp_path: Path) -> None:
    serial = run(make_config(*QUIET, *DYNAMIC), tmp_path / "serial")
    ray_run = run(make_config(*QUIET, *DYNAMIC, "runtime.backend=ray", "runtime.agents_per_actor=2"), tmp_path / "ray")
    assert ray_run["final"] == serial["final"]
    assert ray_run["network"] == serial["network"]


@pytest.mark.slow
def test_a_lost_worker_replays_a_dynamic_run_to_the_same_numbers(ray_session: None, tmp_path: Path) -> None:
    """The rolled-back rounds see the same network again: the schedule is a function of the round."""
    overrides = [*QUIET, *DYNAMIC, "rounds=6", "checkpoint_every=2"]
    reference = run(make_config(*overrides), tmp_path / "serial")
    faults = "runtime.faults=[{point:train,round:3,actor:1}]"
    ray_args = ["runtime.backend=ray", "runtime.agents_per_actor=2", faults]
    recovered = run(make_config(*overrides, *ray_args), tmp_path / "ray")
    assert recovered["recovery"] == {"actor_failures": 1, "rounds_replayed": 1}
    assert recovered["final"] == reference["final"]
    assert recovered["network"] == reference["network"]


@pytest.mark.parametrize("method", ["isolated", "mhd"])
def test_the_graph_a_run_writes_reloads_as_the_same_graph(tmp_path: Path, method: str) -> None:
    """graph.edgelist lists agents without edges too, so even an isolated run's file reloads."""
    run(make_config(*QUIET, f"method={method}", "rounds=1", "eval_every=1"), tmp_path / "run")
    written = tmp_path / "run" / "graph.edgelist"
    reloaded = build_topology("from_file", 4, 0, {"path": str(written), "require_connected": False})
    expected = _experiment(f"method={method}").graph
    assert list(reloaded) == [0, 1, 2, 3]
    assert sorted(reloaded.edges()) == sorted(expected.edges())
