"""The round loop: numbered steps over a Backend, never touching Ray or payloads.

1. place agents on workers and start them (resident for the whole run)
2. for each round: train + publish on the backend; record losses, bytes, time
3. every eval_every rounds (and after the last): evaluate, compute per-head accuracy
4. write summary.json; the sinks print the table / finish the wandb run
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agents.messages import EvalCounts
from sim.backends import Backend, GroupPlan
from sim.experiment import Experiment
from sim.loggers import Sink
from sim.metrics import agent_accuracies, head_summary, mean_losses, round_bytes


def group_plans(experiment: Experiment, groups: list[list[int]]) -> list[GroupPlan]:
    """Attach to each group its specs and the groups that host its agents' in-neighbours."""
    if experiment.method.central:
        return [GroupPlan([experiment.specs[0]], [], False)]
    group_of = {agent_id: index for index, members in enumerate(groups) for agent_id in members}
    graph = experiment.graph
    plans = []
    for members in groups:
        sources = sorted({group_of[u] for v in members for u in graph.predecessors(v)})
        publishes = any(graph.out_degree(v) > 0 for v in members) or _include_self(experiment)
        plans.append(GroupPlan([experiment.specs[v] for v in members], sources, publishes))
    return plans


def _include_self(experiment: Experiment) -> bool:
    return experiment.method.distill is not None and experiment.method.distill.include_self


def run_rounds(
    experiment: Experiment, backend: Backend, plans: list[GroupPlan], sinks: list[Sink], run_dir: Path
) -> dict[str, Any]:
    """Steps 1-4 above; returns the summary that was written to run_dir/summary.json."""
    started = time.perf_counter()
    backend.start(plans, experiment.public)  # 1
    setup_s = time.perf_counter() - started
    out_degree = dict(experiment.graph.out_degree())
    comm_total = 0
    round_times: list[float] = []
    last_eval: dict[str, Any] = {}
    for round_idx in range(experiment.rounds):  # 2
        tick = time.perf_counter()
        publish = experiment.method.exchanges and round_idx < experiment.rounds - 1
        metrics = backend.run_round(round_idx, publish)
        round_times.append(time.perf_counter() - tick)
        sent = round_bytes(metrics, out_degree)
        comm_total += sent
        record = {"round": round_idx, **mean_losses(metrics), "comm/bytes": sent, "time/round_s": round_times[-1]}
        for sink in sinks:
            sink.log_round(round_idx, record)
        if (round_idx + 1) % experiment.eval_every == 0 or round_idx == experiment.rounds - 1:  # 3
            last_eval = evaluation_record(experiment, backend.evaluate(), round_idx, record)
            for sink in sinks:
                sink.log_eval(round_idx, last_eval)
    summary = {  # 4
        "status": "completed",
        "method": experiment.method_name,
        "dataset": experiment.dataset,
        "num_agents": experiment.num_agents,
        "rounds": experiment.rounds,
        "seed": experiment.seed,
        "num_edges": experiment.graph.number_of_edges(),
        "wall_time_s": time.perf_counter() - started,
        "setup_time_s": setup_s,
        "round_time_s_mean": sum(round_times) / len(round_times),
        "comm_bytes_total": comm_total,
        "comm_bytes_per_round": comm_total / experiment.rounds,
        "runtime": backend.describe(),
        "final": {"round": last_eval["round"], "heads": last_eval["heads"], "per_agent": last_eval["per_agent"]},
    }
    write_json(run_dir / "summary.json", summary)
    for sink in sinks:
        sink.finish(summary)
    return summary


def evaluation_record(
    experiment: Experiment, counts: dict[int, EvalCounts], round_idx: int, round_record: dict[str, float]
) -> dict[str, Any]:
    """Per-agent and per-head accuracy after `round_idx` (1-based `round` in the record)."""
    if experiment.method.central:  # one model stands for every agent, each with its own mix
        counts = {agent_id: counts[0] for agent_id in range(experiment.num_agents)}
    per_agent = agent_accuracies(counts, experiment.class_counts)
    return {
        "round": round_idx + 1,
        "heads": head_summary(per_agent),
        "per_agent": {str(agent_id): heads for agent_id, heads in per_agent.items()},
        **{key: value for key, value in round_record.items() if key != "round"},
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)
