"""Chaos run: kill agent actors again and again, and check that the run ends as if nothing happened.

    python scripts/chaos.py [OVERRIDE ...] [--kills 5] [--chaos-seed 0] [--out chaos.json] [--workdir DIR]

Runs `mhd-sim OVERRIDES` twice from the shell, on the Ray backend: once undisturbed, once with
`runtime.faults` holding at least `--kills` worker deaths at random moments (a random point of
the round loop: training, evaluation, mid-checkpoint, or a second death during the restore that
follows a first one; a random round; an actor drawn from the run's seed). Then checks that

- the disturbed run completed and counts every death in `recovery.actor_failures`;
- its final per-agent, per-head accuracies equal the undisturbed run's, bit for bit.

Prints and writes JSON (the fault plan, both runs' wall times, the recovery counters, the
verdict); exits 1 if a check fails. Deaths are spaced at least two rounds apart, so that each
fires at its own point whatever the rollbacks replay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sim.run.preflight import compose_config

MHD_SIM = str(Path(sys.executable).with_name("mhd-sim"))
MIN_GAP_ROUNDS = 2


def candidate_events(rounds: int, eval_every: int, checkpoint_every: int) -> list[tuple[str, int]]:
    """(kind, round) pairs at which a fault fires exactly then.

    Kind `restore` is two deaths: one in training, then one in the restore that follows it.
    """
    events = [("train", r) for r in range(1, rounds)] + [("restore", r) for r in range(1, rounds)]
    events += [("evaluate", r) for r in range(1, rounds) if (r + 1) % eval_every == 0 or r == rounds - 1]
    events += [("save", r) for r in range(1, rounds) if (r + 1) % checkpoint_every == 0]
    return events


def draw_plan(rounds: int, eval_every: int, checkpoint_every: int, kills: int, seed: int) -> list[dict[str, Any]]:
    """runtime.faults entries with at least `kills` deaths, at rounds MIN_GAP_ROUNDS apart."""
    rng = np.random.default_rng(seed)
    events = candidate_events(rounds, eval_every, checkpoint_every)
    chosen: list[tuple[str, int]] = []
    for index in rng.permutation(len(events)):
        kind, round_idx = events[index]
        if all(abs(round_idx - taken) >= MIN_GAP_ROUNDS for _, taken in chosen):
            chosen.append((kind, round_idx))
        if deaths(chosen) >= kills:
            break
    if deaths(chosen) < kills:
        raise SystemExit(f"chaos: {rounds} rounds leave room for only {deaths(chosen)} deaths; run more rounds")
    plan = []
    for kind, round_idx in sorted(chosen, key=lambda event: event[1]):
        plan.append({"point": "train" if kind == "restore" else kind, "round": round_idx, "actor": None})
        if kind == "restore":
            plan.append({"point": "restore", "round": round_idx, "actor": None})
    return plan


def deaths(events: list[tuple[str, int]]) -> int:
    return sum(2 if kind == "restore" else 1 for kind, _ in events)


def as_override(plan: list[dict[str, Any]]) -> str:
    entries = ",".join(f"{{point:{f['point']},round:{f['round']},actor:null}}" for f in plan)
    return f"runtime.faults=[{entries}]"


def mhd_sim(overrides: list[str], run_dir: Path) -> tuple[dict[str, Any], float]:
    """One `mhd-sim` process; its summary.json and its wall time."""
    tick = time.perf_counter()
    done = subprocess.run([MHD_SIM, *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall_s = time.perf_counter() - tick
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
    return json.loads((run_dir / "summary.json").read_text()), wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for mhd-sim")
    parser.add_argument("--kills", type=int, default=5, help="worker deaths to inject, at least")
    parser.add_argument("--chaos-seed", type=int, default=0, help="seed of the fault plan (the run keeps its own)")
    parser.add_argument("--out", type=Path, default=Path("chaos.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="where both runs write (default: a temp dir)")
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    checkpoint_every = int(cfg.checkpoint_every) or 1
    plan = draw_plan(int(cfg.rounds), int(cfg.eval_every), checkpoint_every, args.kills, args.chaos_seed)
    planned_deaths = len(plan)
    common = [*args.overrides, "runtime.backend=ray", f"checkpoint_every={checkpoint_every}", "logger.report=false"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos_"))
    print(f"chaos: {planned_deaths} deaths planned: {json.dumps(plan)}", flush=True)
    reference, reference_s = mhd_sim(common, workdir / "undisturbed")
    disturbed_overrides = [*common, as_override(plan), f"runtime.max_actor_restarts={planned_deaths}"]
    disturbed, disturbed_s = mhd_sim(disturbed_overrides, workdir / "chaos")
    recovery = disturbed.get("recovery", {})
    checks = {
        "completed": disturbed.get("status") == "completed",
        "every_death_counted": recovery.get("actor_failures") == planned_deaths,
        "final_identical": "final" in disturbed and disturbed["final"] == reference.get("final"),
    }
    result = {
        "overrides": args.overrides,
        "chaos_seed": args.chaos_seed,
        "faults": plan,
        "planned_deaths": planned_deaths,
        "recovery": recovery,
        "restarts_per_actor": disturbed.get("runtime", {}).get("restarts"),
        "undisturbed_wall_s": reference_s,
        "chaos_wall_s": disturbed_s,
        "final_main_shared": disturbed.get("final", {}).get("heads", {}).get("main"),
        "checks": checks,
        "passed": all(checks.values()),
        "run_dirs": [str(workdir / "undisturbed"), str(workdir / "chaos")],
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
