"""Start-up, round time, throughput and memory of one population, run by a plain loop, serially and on Ray.

    python scripts/bench.py --preset k8|k64|k1000 [OVERRIDE ...] [--modes raw,serial,ray,ray_one_per_actor]
                            [--rounds 5] [--burn-in 2] [--samples-per-agent 600] [--cores N] [--out bench.json]

Every mode runs the same composed config: the preset, `data.num_train` sized for K agents, then
your Hydra overrides (e.g. `train.local_steps=2`). Only `runtime.*` differs between modes:

    raw                a plain loop over `agents.agent.Agent` in this process, messages in a dict,
                       torch using every core: the floor, with no simulator machinery at all
    serial             runtime.backend=serial: the simulator's backend and routing, in this process
    ray                runtime.backend=ray with the default placement (one actor per core)
    ray_one_per_actor  runtime.backend=ray, agents_per_actor=1, num_cpus_per_actor=cores/K

Per mode (nanoGPT's bench.py habit: burn in, then measure, then print):
    start-up   nothing to every agent ready: agents built, actors up and, in Ray modes, ray.init;
               each Ray mode gets a fresh local Ray (the backend stops the Ray it started)
    round      mean wall time of --rounds rounds after --burn-in rounds (train + predict + routing)
    round CPU  user + system CPU seconds of the driver and every worker during each measured round
               (/proc/PID/stat): on a busy machine it compares two configurations far better than
               wall time, which other jobs stretch
    samples/s  images forwarded and backwarded in training per second:
                   sum over agents of local_steps * (min(batch_size, shard)
                                                     + min(distill_batch_size, public_batch_size))
                   / round time,
               i.e. K * local_steps * (batch_size + distill_batch_size) / round time in the usual
               case; agents that never distil (no in-neighbour, no include_self, no method.distill)
               count no public samples. Round 0 has no messages, so nobody distils in it and round
               1 is the first to run the larger distillation batches, paying their first-call costs
               (several times a steady round on 2 cores): keep --burn-in >= 2.
    peak RSS   VmHWM of the driver (reset at the start of each mode) and of every actor, and their
               sum. Shared pages (libraries, the object store) count in every process that maps
               them, so the sum is an upper bound; Ray's own daemons (raylet, GCS) are not counted.
    peak PSS   proportional set size (/proc/PID/smaps_rollup): a page shared by n processes counts
               1/n in each, so the sum over processes counts it once. Sampled after start-up and
               after every measured round; the sample with the largest driver + workers sum is
               kept, and the other processes this one started (Ray's daemons, idle workers) are
               reported beside it as `ray_services`.
Ratios are against `raw`. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import ray
import torch
from omegaconf import DictConfig

from agents.agent import Agent
from agents.messages import Prediction
from sim.backends import create_backend
from sim.backends.runtime import execution_config
from sim.core.errors import ConfigError
from sim.experiment.assembly import Experiment, build_experiment
from sim.run.loop import group_plans
from sim.run.preflight import compose_config

MODES = ("raw", "serial", "ray", "ray_one_per_actor")
RAY_MODES = ("ray", "ray_one_per_actor")

# Fashion-MNIST-shaped synthetic data (1x28x28, 10 classes) for the ResNet-8 presets; the K=1000
# preset keeps synthetic's default 8x8 images with the small CNN. data.num_train is added per K.
FMNIST_SHAPED = ["backbone=resnet8", "data=synthetic", "data.image_shape=[1,28,28]", "data.num_classes=10"]
PRESETS = {
    "k8": ["num_agents=8", *FMNIST_SHAPED],
    "k64": ["num_agents=64", *FMNIST_SHAPED],
    "k1000": ["num_agents=1000", "backbone=small_cnn", "data=synthetic"],
}
DEFAULT_MODES = {"k8": MODES, "k64": MODES, "k1000": ("raw", "ray")}
K1000_NOTE = (
    "k1000 runs raw,ray by default: ray_one_per_actor would start 1000 actor processes (each imports "
    "torch and holds its own copy of the public and test sets) on {cores} cores, and serial is the raw "
    "loop plus routing; pass --modes to run them anyway"
)

RAY_RESOURCE_STEP = 1e-4
"""Ray keeps fractional resource requests to 4 decimals, so a CPU share is rounded down to that
step: rounded up, K actors would ask for more than the cluster has and one would never start."""


class Loop(Protocol):
    """What the benchmark needs from a mode once its agents are ready."""

    def run_round(self, round_idx: int, publish: bool) -> object: ...

    def worker_pids(self) -> list[int]: ...

    def describe(self) -> dict[str, object]: ...

    def shutdown(self) -> None: ...


class RawLoop:
    """The floor: agents stepped in turn by a plain loop, the latest messages in a dict.

    Uses the same Agent class, specs and execution options as the backends, so the gap to
    the other modes is the simulator's machinery (groups, routing, actors, object store).
    """

    def __init__(self, experiment: Experiment, threads: int) -> None:
        torch.set_num_threads(threads)
        runtime = experiment.runtime
        execution = execution_config(runtime, threads)
        self.threads = threads
        self.agents = [Agent(spec, experiment.public, execution) for spec in experiment.specs]
        distill = experiment.settings.method.distill
        include_self = distill is not None and distill.include_self
        graph = experiment.graph
        self.publishers = [agent for agent in self.agents if include_self or graph.out_degree(agent.agent_id) > 0]
        self.messages: dict[int, Prediction] = {}

    def run_round(self, round_idx: int, publish: bool) -> None:
        """Every agent trains on the previous round's messages, then the publishers predict."""
        for agent in self.agents:
            inbox = [self.messages[sender] for sender in agent.in_neighbours if sender in self.messages]
            agent.train_round(round_idx, inbox)
        publishers = self.publishers if publish else []
        self.messages = {agent.agent_id: agent.predict(round_idx + 1) for agent in publishers}

    def worker_pids(self) -> list[int]:
        return []

    def describe(self) -> dict[str, object]:
        return {"backend": "raw", "workers": 1, "torch_threads": self.threads}

    def shutdown(self) -> None:
        self.agents, self.publishers, self.messages = [], [], {}


class BackendLoop:
    """The simulator's own path: create_backend, group_plans and Backend.start, as `sim.run.main` does."""

    def __init__(self, experiment: Experiment) -> None:
        self.schedule = experiment.settings.schedule
        self.backend, groups = create_backend(experiment)
        try:
            self.backend.start(group_plans(experiment, groups), experiment.public)
        except BaseException:
            self.backend.shutdown()
            raise

    def run_round(self, round_idx: int, publish: bool) -> None:
        """A dynamic network (docs/dynamic.md) routes by the round's plan, as the round loop does."""
        plan = None if self.schedule.static else self.schedule.plan(round_idx)
        self.backend.run_round(round_idx, publish, plan)

    def worker_pids(self) -> list[int]:
        """Actor processes (Ray); none when the agents run in this process."""
        pids = self.backend.describe().get("pids", [])
        assert isinstance(pids, list)
        return [int(pid) for pid in pids]

    def describe(self) -> dict[str, object]:
        return {**self.backend.describe(), "network": "static" if self.schedule.static else "dynamic"}

    def shutdown(self) -> None:
        self.backend.shutdown()


def common_overrides(preset: str, extras: Sequence[str], samples_per_agent: int) -> list[str]:
    """Preset, then data.num_train sized for the final K (unless given), then the user's overrides.

    K and the public-set size are read from the composed config, so `num_agents=4` among the
    extras also shrinks the generated data.
    """
    overrides = [*PRESETS[preset], *extras]
    cfg = compose_config(overrides)
    given = any(override.split("=", 1)[0].lstrip("+~") == "data.num_train" for override in extras)
    if cfg.data.name != "synthetic" or given:
        return overrides
    num_train = samples_per_agent * int(cfg.num_agents) + int(cfg.data.public_size)
    return [*PRESETS[preset], f"data.num_train={num_train}", *extras]


def cpu_share(cores: int, num_agents: int) -> float:
    """CPUs per actor so that K one-agent actors fit in `cores`, in a form Ray accepts.

    Ray takes whole numbers above 1 and 4-decimal fractions below; both are rounded down.
    """
    if cores >= num_agents:
        return cores // num_agents
    return math.floor(cores / num_agents / RAY_RESOURCE_STEP) * RAY_RESOURCE_STEP


def mode_overrides(mode: str, num_agents: int, cores: int) -> list[str]:
    """The runtime overrides that make `mode`; appended last, so they win over the user's."""
    if mode in ("raw", "serial"):
        return ["runtime.backend=serial"]
    if mode == "ray":
        return ["runtime.backend=ray"]
    share = cpu_share(cores, num_agents)
    return ["runtime.backend=ray", "runtime.agents_per_actor=1", f"runtime.num_cpus_per_actor={share:g}"]


def samples_per_round(experiment: Experiment) -> int:
    """Images forwarded and backwarded in training per round (the formula in the module docstring)."""
    public_batch_size = experiment.public.public_batch_size
    total = 0
    for spec in experiment.specs:
        distils = spec.distill is not None and (bool(spec.in_neighbours) or spec.distill.include_self)
        public = min(spec.train.distill_batch_size, public_batch_size) if distils else 0
        total += spec.train.local_steps * (min(spec.train.batch_size, len(spec.private_y)) + public)
    return total


def peak_rss_mib(pid: int | str) -> float | None:
    """A process's peak resident set (VmHWM) in MiB; None when /proc has no such process (or no /proc)."""
    return proc_mib(f"/proc/{pid}/status", "VmHWM:")


def proc_mib(path: str, field: str) -> float | None:
    """The kB value of the line starting with `field` in a /proc file, in MiB; None if the file or line is missing."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return None


def reset_peak_rss() -> bool:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0), so each mode's driver peak is its own.

    Returns False where that is impossible; the driver peak is then since process start.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def pss_mib(pid: int | str) -> float | None:
    """A process's proportional set size in MiB; None when /proc has no such process (or no smaps_rollup)."""
    return proc_mib(f"/proc/{pid}/smaps_rollup", "Pss:")


def stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after "pid (comm)": state, ppid, ... (the line's field 3 first); None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """Every process below `root` in the process tree (from /proc: pid -> parent pid)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(stat.parent.name)
        if fields is None:
            continue  # the process ended while we looked
        parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def pss_snapshot(worker_pids: list[int]) -> dict[str, float]:
    """PSS now of the driver, the workers, and the other processes this one started (Ray's daemons)."""
    workers = set(worker_pids)
    services = [pid for pid in descendants(os.getpid()) if pid not in workers]
    driver = pss_mib("self") or 0.0
    worker_total = sum(pss_mib(pid) or 0.0 for pid in workers)
    return {
        "driver": driver,
        "workers": worker_total,
        "driver_and_workers": driver + worker_total,
        "ray_services": sum(pss_mib(pid) or 0.0 for pid in services),
    }


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int | str]) -> float:
    """User + system CPU seconds of these processes so far (/proc/PID/stat fields 14-15); a gone process counts 0.

    A round's CPU seconds (driver and workers) depend on other jobs far less than its wall time
    does, so they compare two configurations measured on a busy machine.
    """
    total = 0
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime: the 14th and 15th fields of the whole line
    return total / CLOCK_TICKS


def memory(worker_pids: list[int]) -> dict[str, Any]:
    """Peak RSS of the driver and of each worker process, and their sum (MiB)."""
    driver = peak_rss_mib("self")
    workers = {str(pid): peak_rss_mib(pid) for pid in worker_pids}
    total = sum(value for value in [driver, *workers.values()] if value is not None)
    return {"driver": driver, "workers": workers, "total": total}


def start_loop(mode: str, experiment: Experiment, cores: int) -> Loop:
    if mode == "raw":
        return RawLoop(experiment, experiment.runtime.torch_threads or cores)
    return BackendLoop(experiment)


def measure(mode: str, overrides: list[str], cores: int, burn_in: int, rounds: int) -> dict[str, Any]:
    """One mode from its config: build (not timed as start-up), start, burn in, time rounds, read peaks."""
    cfg = compose_config(overrides)
    tick = time.perf_counter()
    experiment = build_experiment(cfg)
    build_s = time.perf_counter() - tick
    ray_started_here = mode in RAY_MODES and not ray.is_initialized()
    gc.collect()
    driver_peak_reset = reset_peak_rss()
    tick = time.perf_counter()
    loop = start_loop(mode, experiment, cores)
    startup_s = time.perf_counter() - tick
    try:
        publish = experiment.settings.method.exchanges
        pss = [pss_snapshot(loop.worker_pids())]
        for round_idx in range(burn_in):
            loop.run_round(round_idx, publish)
        round_s, round_cpu_s = [], []
        for round_idx in range(burn_in, burn_in + rounds):
            processes: list[int | str] = ["self", *loop.worker_pids()]
            cpu, tick = cpu_seconds(processes), time.perf_counter()
            loop.run_round(round_idx, publish)
            round_s.append(time.perf_counter() - tick)
            round_cpu_s.append(cpu_seconds(processes) - cpu)
            pss.append(pss_snapshot(loop.worker_pids()))
        peak = memory(loop.worker_pids())
        placement = loop.describe()
    finally:
        loop.shutdown()
    mean_round_s = sum(round_s) / len(round_s)
    per_round = samples_per_round(experiment)
    return {
        "overrides": overrides,
        "build_s": build_s,
        "startup_s": startup_s,
        "ray_started_here": ray_started_here,
        "round_s": round_s,
        "round_s_mean": mean_round_s,
        "round_cpu_s": round_cpu_s,
        "round_cpu_s_mean": sum(round_cpu_s) / len(round_cpu_s),
        "samples_per_round": per_round,
        "samples_per_s": per_round / mean_round_s,
        "peak_rss_mib": peak,
        "peak_pss_mib": max(pss, key=lambda sample: sample["driver_and_workers"]),
        "driver_peak_reset": driver_peak_reset,
        "placement": placement,
    }


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Each mode's round time and start-up over raw's (None when raw was not run)."""
    raw = results.get("raw")
    for result in results.values():
        result["round_vs_raw"] = None if raw is None else result["round_s_mean"] / raw["round_s_mean"]
        result["startup_vs_raw"] = None if raw is None else result["startup_s"] / raw["startup_s"]
        raw_pss = None if raw is None else raw["peak_pss_mib"]["driver_and_workers"]
        result["pss_vs_raw"] = None if raw_pss is None else result["peak_pss_mib"]["driver_and_workers"] / raw_pss


def machine_facts(cores: int) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cores_used": cores,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_at_start": torch.get_num_threads(),
        "ray": ray.__version__,
    }


def sizes(cfg: DictConfig) -> dict[str, Any]:
    """The run's shape, for reading the JSON without re-composing its overrides."""
    return {
        "num_agents": int(cfg.num_agents),
        "backbone": str(cfg.backbone.name),
        "data": str(cfg.data.name),
        "image_shape": list(cfg.data.get("image_shape") or []),
        "method": str(cfg.method.name),
        "topology": str(cfg.topology.name),
        "aux_heads": int(cfg.model.aux_heads),
        "local_steps": int(cfg.train.local_steps),
        "batch_size": int(cfg.train.batch_size),
        "distill_batch_size": int(cfg.train.distill_batch_size),
        "public_batch_size": int(cfg.data.public_batch_size),
    }


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def print_table(report: dict[str, Any]) -> None:
    run = report["sizes"]
    print(
        f"bench {report['preset']} | K={run['num_agents']} {run['backbone']} {run['image_shape']} | "
        f"{run['local_steps']} steps x ({run['batch_size']} + {run['distill_batch_size']}) per round | "
        f"{report['burn_in']} burn-in + {report['rounds']} rounds | {report['machine']['cores_used']} cores"
    )
    header = f"{'mode':<18} {'start-up s':>10} {'x raw':>7} {'round s':>9} {'x raw':>7} {'CPU s':>7} {'samples/s':>10} "
    print(header + f"{'RSS MiB: driver':>15} {'workers':>8} {'total':>7} {'PSS MiB':>8} {'x raw':>6} {'+ Ray':>6}")
    for mode, result in report["modes"].items():
        peak, pss = result["peak_rss_mib"], result["peak_pss_mib"]
        workers = sum(value for value in peak["workers"].values() if value is not None)
        print(
            f"{mode:<18} {result['startup_s']:>10.2f} {_ratio(result['startup_vs_raw']):>7} "
            f"{result['round_s_mean']:>9.3f} {_ratio(result['round_vs_raw']):>7} {result['round_cpu_s_mean']:>7.2f} "
            f"{result['samples_per_s']:>10,.0f} "
            f"{_mib(peak['driver']):>15} {workers:>8,.0f} {peak['total']:>7,.0f} "
            f"{pss['driver_and_workers']:>8,.0f} {_ratio(result['pss_vs_raw']):>6} {pss['ray_services']:>6,.0f}"
        )
    for note in report["notes"]:
        print(f"note: {note}")


def notes(args: argparse.Namespace, results: dict[str, dict[str, Any]], cores: int) -> list[str]:
    """What a reader of the numbers must know: skipped modes and a Ray that was not started here."""
    found = []
    if args.preset == "k1000" and args.modes is None:
        found.append(K1000_NOTE.format(cores=cores))
    if any(mode in RAY_MODES and not result["ray_started_here"] for mode, result in results.items()):
        found.append("Ray was already running in this process: Ray modes' start-up excludes ray.init")
    if not all(result["driver_peak_reset"] for result in results.values()):
        found.append("the driver's peak RSS could not be reset per mode: it is the peak since process start")
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied after the preset, as for mhd-sim")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="k8", help="population size and model (k8)")
    parser.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        default=None,
        help=f"comma-separated subset of {','.join(MODES)} (default: all; k1000: raw,ray)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per mode (5)")
    parser.add_argument(
        "--burn-in", type=int, default=2, help="unmeasured rounds before them (2); with 1, round 1's warm-up is timed"
    )
    parser.add_argument(
        "--samples-per-agent", type=int, default=600, help="private samples per agent; sets data.num_train (600)"
    )
    parser.add_argument(
        "--cores", type=int, default=None, help="CPUs the modes share (default: runtime.num_cpus, else all of them)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON output path (bench.json)")
    args = parser.parse_intermixed_args(argv)
    unknown = sorted(set(args.modes or ()) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {','.join(unknown)}; choose from {','.join(MODES)}")
    if args.rounds < 1 or args.burn_in < 1 or args.samples_per_agent < 1:
        parser.error("--rounds, --burn-in and --samples-per-agent must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the chosen modes one after another, prints the table, writes and returns the report."""
    args = parse_args(argv)
    overrides = common_overrides(args.preset, args.overrides, args.samples_per_agent)
    cfg = compose_config(overrides)
    cores = args.cores or cfg.runtime.num_cpus or os.cpu_count() or 1
    facts = machine_facts(cores)
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes or DEFAULT_MODES[args.preset]:
        mode_specific = mode_overrides(mode, int(cfg.num_agents), cores)
        results[mode] = measure(mode, [*overrides, *mode_specific], cores, args.burn_in, args.rounds)
    add_ratios(results)
    report = {
        "preset": args.preset,
        "overrides": overrides,
        "burn_in": args.burn_in,
        "rounds": args.rounds,
        "machine": facts,
        "sizes": sizes(cfg),
        "samples_formula": "sum over agents of local_steps * (min(batch_size, shard) + "
        "min(distill_batch_size, public_batch_size) if it distils else 0) / round_s_mean",
        "notes": notes(args, results, cores),
        "modes": results,
    }
    print_table(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        sys.exit(f"bench: error: {error}")
