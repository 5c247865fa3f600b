"""The round loop: numbered steps over a Backend, never touching Ray or payloads.

    1. place agents on workers and start them (resident for the whole run); on resume,
       restore them from a checkpoint, else start the method's exchange (the weight-sharing
       baselines' common initial weights) and write the round-0 checkpoint
    2. for each round: train + publish on the backend, then the method's exchange step
       (sim/run/exchange.py: count the routed predictions, or average weights); record losses,
       bytes, time
    3. every eval_every rounds: evaluate on the evaluation subset of the test set; after the
       last round on the whole test set (the summary's numbers); compute per-head accuracy
    4. every checkpoint_every rounds, or on SIGINT/SIGTERM: checkpoint (then stop on a signal)
    5. a worker died: roll the whole population back to the last checkpoint and replay;
       a worker that dies during that restore is restored again, one that cannot be brought
       back stops the run (RecoveryFailedError) with every checkpoint kept for `resume=`
    6. write summary.json; the sinks print the table / finish the wandb run

Rolling everyone back (rather than replaying only the lost agents) keeps the population
consistent with no extra bookkeeping, and since every stream is seeded the replayed rounds
give exactly the numbers the lost ones would have.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agents.messages import EvalCounts
from sim.backends.base import Backend, GroupPlan, RecoveryFailedError, WorkerLostError
from sim.backends.faults import FaultSchedule
from sim.backends.storage import StorageDir
from sim.core.atomic import write_then_rename
from sim.experiment.assembly import Experiment
from sim.experiment.convergence import convergence, history_point
from sim.reporting.loggers import Sink
from sim.reporting.metrics import AgentHeadAccuracy, agent_accuracies, head_summary, mean_losses
from sim.run.checkpoint import Checkpoint, CheckpointStore, LoopState
from sim.run.exchange import Exchange, build_exchange
from sim.run.interrupt import RunInterrupted, StopRequests


@dataclass(frozen=True)
class CheckpointPolicy:
    every: int  # rounds between checkpoints; 0: only on a signal
    store: CheckpointStore
    probe: Callable[[Backend], None] | None = None  # every worker reaches the store (sim/run/storage.py); None: no need


def group_plans(experiment: Experiment, groups: list[list[int]]) -> list[GroupPlan]:
    """Attach to each group its specs and the groups that host its agents' in-neighbours."""
    if experiment.settings.method.central:
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
    return experiment.settings.method.distill is not None and experiment.settings.method.distill.include_self


def run_rounds(
    experiment: Experiment,
    backend: Backend,
    plans: list[GroupPlan],
    sinks: list[Sink],
    run_dir: Path,
    checkpoints: CheckpointPolicy,
    resume_from: Checkpoint | None,
) -> dict[str, Any]:
    """Steps 1-6 above; returns the summary that was written to run_dir/summary.json."""
    started = time.perf_counter()
    exchange = build_exchange(experiment)  # before any worker: it may reject the config
    faults = FaultSchedule(experiment.runtime.faults, len(plans), experiment.settings.seed)  # a test tool; usually none
    recovery = Recovery(
        backend, checkpoints.store, faults, len(plans) * (experiment.runtime.max_actor_restarts + 1) + 1
    )
    if experiment.settings.method.shares_weights:
        notice = f"method={experiment.settings.method_name} shares WEIGHTS: a baseline, not privacy-preserving"
        print(f"mhd-sim: {notice}", file=sys.stderr)
    for notice in [] if experiment.privacy is None else experiment.privacy.notices():
        print(f"mhd-sim: {notice}", file=sys.stderr)
    backend.start(plans, experiment.public)  # 1
    if checkpoints.probe is not None:  # before any training or restore: every worker reaches the storage
        checkpoints.probe(backend)
    state = LoopState()
    if resume_from is not None:
        restarts = recovery.restore(resume_from, resume_from.state.next_round)
        state = replace(resume_from.state, actor_failures=resume_from.state.actor_failures + restarts)
        for sink in sinks:
            sink.rewind(state.next_round)
    else:
        try:  # before the first checkpoint there is nothing to roll back to
            exchange.start(backend)
            if checkpoints.every > 0:
                faults.arm(backend, "save", 0)
                checkpoints.store.save(backend, state)
        except WorkerLostError:
            raise RecoveryFailedError(
                "an agent worker died before the first checkpoint was written: start the run again"
            ) from None
    setup_s = time.perf_counter() - started
    with StopRequests() as stop:
        while state.next_round < experiment.settings.rounds:
            try:
                state = run_round(experiment, backend, sinks, state, exchange, faults)  # 2, 3
                due = checkpoints.every > 0 and state.next_round % checkpoints.every == 0
                if due or stop.signum is not None:  # 4
                    faults.arm(backend, "save", state.next_round - 1)
                    saved = checkpoints.store.save(backend, state)
            except WorkerLostError:  # 5
                state = recovery.roll_back(sinks, state)
                continue
            if stop.signum is not None:
                stopped = RunInterrupted(stop.signum, str(saved), str(run_dir))
                write_json(run_dir / "summary.json", interrupted_summary(experiment, state, saved, stopped))
                raise stopped
    summary = final_summary(experiment, backend, exchange, state, time.perf_counter() - started, setup_s)  # 6
    write_json(run_dir / "summary.json", summary)
    for sink in sinks:
        sink.finish(summary)
    return summary


def run_round(
    experiment: Experiment,
    backend: Backend,
    sinks: list[Sink],
    state: LoopState,
    exchange: Exchange,
    faults: FaultSchedule,
) -> LoopState:
    """One round (and its evaluation when due); the state advances only if all of it succeeded."""
    round_idx = state.next_round
    schedule = experiment.settings.schedule
    tick = time.perf_counter()
    faults.arm(backend, "train", round_idx)
    plan = None if schedule.static else schedule.plan(round_idx)  # None: lock-step on the fixed graph
    metrics = backend.run_round(round_idx, exchange.publishes(round_idx), plan)
    sent = exchange.after_training(backend, round_idx, metrics)
    elapsed = time.perf_counter() - tick
    record = {"round": round_idx, **mean_losses(metrics), "comm/bytes": sent, "time/round_s": elapsed}
    used = inbox_use(metrics)
    record.update(used.record())
    links = [] if plan is None else exchange.links(round_idx)  # once: the record and every sink read it
    if plan is not None:
        record["network/active"] = len(plan.active)
        record["network/links"] = len(links)
    evaluated, eval_s = None, 0.0
    if (round_idx + 1) % experiment.settings.eval_every == 0 or round_idx == experiment.settings.rounds - 1:
        faults.arm(backend, "evaluate", round_idx)
        if experiment.privacy is not None:  # each agent's epsilon so far (docs/privacy.md)
            record.update(experiment.privacy.record(metrics))
        full = round_idx == experiment.settings.rounds - 1  # the final numbers: every test sample
        tick = time.perf_counter()
        counts = backend.evaluate(full)
        record["time/eval_s"] = eval_s = time.perf_counter() - tick
        evaluated = evaluation_record(experiment, counts, round_idx, record, full)
    for sink in sinks:
        sink.log_round(round_idx, record)
        if plan is not None:
            sink.log_network(round_idx, network_record(round_idx, plan.active, links))
        if evaluated is not None:
            sink.log_eval(round_idx, evaluated)
    return replace(
        state,
        next_round=round_idx + 1,
        messages_used=state.messages_used + used.messages,
        staleness_sum=state.staleness_sum + used.staleness_sum,
        staleness_max=max(state.staleness_max, used.staleness_max),
        agent_rounds_active=state.agent_rounds_active + (experiment.num_agents if plan is None else len(plan.active)),
        comm_bytes_total=state.comm_bytes_total + sent,
        round_times_s=[*state.round_times_s, elapsed],
        eval_time_s=state.eval_time_s + eval_s,
        eval_history=[*state.eval_history, history_point(evaluated)] if evaluated else state.eval_history,
        last_eval=evaluated or state.last_eval,
    )


@dataclass(frozen=True)
class InboxUse:
    """How many messages the agents distilled from in a round, and how old they were (in rounds)."""

    messages: int
    staleness_sum: float
    staleness_max: float

    def record(self) -> dict[str, float]:
        """staleness/mean and /max for rounds.jsonl and metrics.jsonl; nothing when no message was used."""
        if not self.messages:
            return {}
        return {"staleness/mean": self.staleness_sum / self.messages, "staleness/max": self.staleness_max}


def inbox_use(metrics: Mapping[int, Mapping[str, float]]) -> InboxUse:
    """Sum the agents' inbox/* numbers (agents/group.py:staleness) over the round."""
    reports = [agent for agent in metrics.values() if "inbox/messages" in agent]
    return InboxUse(
        messages=int(sum(agent["inbox/messages"] for agent in reports)),
        staleness_sum=sum(agent["inbox/staleness_sum"] for agent in reports),
        staleness_max=max((agent["inbox/staleness_max"] for agent in reports), default=0.0),
    )


def network_record(round_idx: int, active: frozenset[int], links: list[tuple[int, int, int]]) -> dict[str, Any]:
    """One line of network.jsonl: the round's active agents and its messages as [sender, receiver, delay]."""
    return {"round": round_idx + 1, "active": sorted(active), "links": [list(link) for link in links]}


@dataclass(frozen=True)
class Recovery:
    """Brings lost workers back: restores every agent from a checkpoint, however often workers die meanwhile."""

    backend: Backend
    store: CheckpointStore
    faults: FaultSchedule
    max_attempts: int  # restores in a row before giving up: one per restart Ray may still grant, plus one

    def roll_back(self, sinks: list[Sink], state: LoopState) -> LoopState:
        """Restore every agent from the newest checkpoint; the rounds since then are replayed."""
        checkpoint = self.store.latest(before_round=state.next_round)
        if checkpoint is None:
            raise RecoveryFailedError(
                f"an agent worker died during round {state.next_round} and there is no checkpoint to restore "
                "(set checkpoint_every > 0)"
            )
        print(
            f"mhd-sim: an agent worker died during round {state.next_round}; restoring every agent from "
            f"{checkpoint.directory.name} and replaying {state.next_round - checkpoint.state.next_round} rounds",
            file=sys.stderr,
        )
        restarts = self.restore(checkpoint, state.next_round)
        for sink in sinks:
            sink.rewind(checkpoint.state.next_round)
        return replace(
            checkpoint.state,
            actor_failures=state.actor_failures + restarts,
            rounds_replayed=state.rounds_replayed + state.next_round - checkpoint.state.next_round,
        )

    def restore(self, checkpoint: Checkpoint, round_idx: int) -> int:
        """Restore every agent from `checkpoint`, again after each worker that dies meanwhile; restarts seen.

        A worker that Ray will not restart makes the backend raise RecoveryFailedError; so does
        a restore that keeps failing `max_attempts` times.
        """
        restarts_before = self.backend.worker_restarts
        for _ in range(self.max_attempts):
            self.faults.arm(self.backend, "restore", round_idx)
            try:
                self.backend.restore(checkpoint.directory)
                return self.backend.worker_restarts - restarts_before
            except WorkerLostError as error:
                print(
                    f"mhd-sim: {error} during the restore; restoring {checkpoint.directory.name} again", file=sys.stderr
                )
        raise RecoveryFailedError(f"restoring {checkpoint.directory} failed {self.max_attempts} times in a row")


def evaluation_record(
    experiment: Experiment, counts: dict[int, EvalCounts], round_idx: int, round_record: dict[str, float], full: bool
) -> dict[str, Any]:
    """Per-agent and per-head accuracy after `round_idx` (1-based `round` in the record)."""
    if experiment.settings.method.central:  # one model stands for every agent, each with its own mix
        counts = {agent_id: counts[0] for agent_id in range(experiment.num_agents)}
    per_agent = agent_accuracies(counts, experiment.class_counts)
    return {
        "round": round_idx + 1,
        "test_samples": int(next(iter(counts.values())).seen.sum()),  # the subset's size, or the whole test set's
        "heads": head_summary(per_agent),
        "per_agent": {str(agent_id): heads for agent_id, heads in per_agent.items()},
        **{key: value for key, value in round_record.items() if key != "round"},
    }


def _run_facts(experiment: Experiment) -> dict[str, Any]:
    return {
        "method": experiment.settings.method_name,
        "dataset": experiment.dataset,
        "num_agents": experiment.num_agents,
        "rounds": experiment.settings.rounds,
        "seed": experiment.settings.seed,
        "num_edges": experiment.graph.number_of_edges(),
        "shares_weights": experiment.settings.method.shares_weights,  # fedavg, gossip: baselines, not private
    }


def final_summary(
    experiment: Experiment, backend: Backend, exchange: Exchange, state: LoopState, wall_s: float, setup_s: float
) -> dict[str, Any]:
    last = state.last_eval
    return {
        "status": "completed",
        **_run_facts(experiment),
        "wall_time_s": wall_s,
        "setup_time_s": setup_s,
        "round_time_s_mean": sum(state.round_times_s) / max(len(state.round_times_s), 1),
        "eval_time_s_total": state.eval_time_s,  # every evaluation's wall time (not in round_time_s)
        "comm_bytes_total": state.comm_bytes_total,
        "comm_bytes_per_round": state.comm_bytes_total / experiment.settings.rounds,
        "comm_bytes_per_edge_per_round": per_edge_per_round(exchange, state.comm_bytes_total),
        "recovery": {"actor_failures": state.actor_failures, "rounds_replayed": state.rounds_replayed},
        **network_summary(experiment, state),
        "runtime": backend.describe(),
        "evaluation": evaluation_facts(experiment),
        "convergence": convergence(state.eval_history, experiment.settings.rounds, experiment.settings.convergence),
        # test_samples is None in a run resumed from a checkpoint of an older version
        "final": {key: last.get(key) for key in ("round", "test_samples", "heads", "per_agent")},
        **by_backbone(experiment, last["per_agent"]),
        **({} if experiment.privacy is None else experiment.privacy.summary(last)),
    }


def network_summary(experiment: Experiment, state: LoopState) -> dict[str, Any]:
    """For a dynamic network (docs/dynamic.md): its settings, how many agents took part, how stale messages were."""
    schedule = experiment.settings.schedule
    if schedule.static:
        return {}
    return {
        "network": {
            **schedule.dynamics.describe(),
            "active_fraction_mean": state.agent_rounds_active / (experiment.num_agents * max(state.next_round, 1)),
            "messages_used": state.messages_used,
            "staleness_mean": state.staleness_sum / state.messages_used if state.messages_used else None,
            "staleness_max": state.staleness_max if state.messages_used else None,
        }
    }


def evaluation_facts(experiment: Experiment) -> dict[str, Any]:
    """What each evaluation measured: a subset of the test set during training, all of it at the end."""
    public = experiment.public
    return {
        "during_training_test_samples": len(public.eval_rows),
        "during_training": "stratified seeded subset" if public.evaluates_subset else "whole test set",
        "final_test_samples": len(public.test_y),
        "final": "whole test set",
    }


def by_backbone(experiment: Experiment, per_agent: dict[str, Any]) -> dict[str, Any]:
    """For a mixed population: each agent's backbone and the per-head summary of each backbone."""
    names = {spec.agent_id: spec.model.backbone for spec in experiment.specs}
    if experiment.settings.method.central or len(set(names.values())) < 2:
        return {}
    groups: dict[str, AgentHeadAccuracy] = {}
    for agent_id, heads in per_agent.items():
        groups.setdefault(names[int(agent_id)], {})[int(agent_id)] = heads
    return {
        "backbones": [names[agent_id] for agent_id in sorted(names)],
        "by_backbone": {name: head_summary(group) for name, group in sorted(groups.items())},
    }


def per_edge_per_round(exchange: Exchange, comm_bytes_total: int) -> float:
    """One message's bytes: the total over the links that carried one (Exchange.link_rounds)."""
    link_rounds = exchange.link_rounds()
    return comm_bytes_total / link_rounds if link_rounds else 0.0


def interrupted_summary(
    experiment: Experiment, state: LoopState, checkpoint: StorageDir, stopped: RunInterrupted
) -> dict[str, Any]:
    return {
        "status": "interrupted",
        **_run_facts(experiment),
        "rounds_completed": state.next_round,
        "checkpoint": str(checkpoint),
        "resume_command": stopped.resume_command,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    with write_then_rename(path) as partial:
        partial.write_text(json.dumps(payload, indent=2) + "\n")
