"""Round time of K homogeneous agents in one group: stepped in turn (AgentGroup) vs vmapped.

    python scripts/bench_vmap.py [--presets small_cnn_digits,resnet8_group_28] [--device cpu|cuda]
                                 [--rounds 3] [--burn-in 2] [--threads N] [--out bench_vmap.json] [OVERRIDE ...]

Both modes host the same specs (one group of all K agents, as runtime.backend=serial places
them) and route each round's outgoing bundle to the next round, as the serial backend does:

    loop   agents.group.AgentGroup: one agent's forward/backward/step after another
    vmap   agents.vectorized.VectorizedAgentGroup: every agent's step in one vmapped call

Per preset and mode: start-up (agents built), mean round time (train + predict) over --rounds
after --burn-in rounds (round 0 has no messages, so round 1 is the first with distillation
batches and their first-call costs: keep --burn-in >= 2), one evaluation, and training
samples/s. `max_logit_gap` is the largest |logit| difference between the modes' last
predictions: float rounding, grown over the rounds (tests/test_vectorized.py checks parity).
Prints a table and writes JSON (--out). Timings on a shared machine are noisy; nothing here
asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.agent import ExecutionConfig
from agents.group import AgentGroup
from agents.messages import Prediction
from agents.vectorized import VectorizedAgentGroup
from sim.experiment.assembly import Experiment, build_experiment
from sim.run.preflight import compose_config

PRESETS = {
    "small_cnn_digits": ["backbone=small_cnn", "data=digits"],
    "resnet8_group_28": [
        "backbone=resnet8",
        "backbone.norm=group",
        "data=synthetic",
        "data.image_shape=[1,28,28]",
        "data.num_classes=10",
    ],
}
MODES = {"loop": AgentGroup, "vmap": VectorizedAgentGroup}


def build(overrides: Sequence[str]) -> Experiment:
    return build_experiment(compose_config(overrides))


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so a timer reads finished work (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    mode: str, experiment: Experiment, execution: ExecutionConfig, burn_in: int, rounds: int
) -> tuple[dict[str, Any], dict[int, Prediction]]:
    """Start-up, round times and one evaluation of one mode; returns them and the last bundle."""
    tick = time.perf_counter()
    group = MODES[mode](experiment.specs, experiment.public, execution)
    synchronize(execution.device)
    startup_s = time.perf_counter() - tick
    bundle: dict[int, Prediction] = {}
    round_s = []
    for round_idx in range(burn_in + rounds):
        tick = time.perf_counter()
        _, bundle = group.run_round(round_idx, [bundle], publish=True)
        synchronize(execution.device)
        if round_idx >= burn_in:
            round_s.append(time.perf_counter() - tick)
    tick = time.perf_counter()
    group.evaluate(full=True)
    synchronize(execution.device)
    evaluate_s = time.perf_counter() - tick
    mean = sum(round_s) / len(round_s)
    samples = samples_per_round(experiment)
    result = {
        "startup_s": startup_s,
        "round_s": round_s,
        "round_s_mean": mean,
        "evaluate_s": evaluate_s,
        "samples_per_round": samples,
        "samples_per_s": samples / mean,
    }
    return result, bundle


def samples_per_round(experiment: Experiment) -> int:
    """Training images per round once every agent distils (after the burn-in)."""
    public_batch_size = experiment.public.public_batch_size
    return sum(
        spec.train.local_steps
        * (min(spec.train.batch_size, len(spec.private_y)) + min(spec.train.distill_batch_size, public_batch_size))
        for spec in experiment.specs
    )


def max_logit_gap(first: dict[int, Prediction], second: dict[int, Prediction]) -> float:
    return max(float(np.abs(first[i].payload["logits"] - second[i].payload["logits"]).max()) for i in first)


def run_preset(name: str, extras: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    overrides = [*PRESETS[name], "method.message_codec=float32", *extras]
    experiment = build(overrides)
    execution = ExecutionConfig(
        device=args.device,
        torch_threads=args.threads,
        channels_last=False,
        compile=False,
        vectorize=False,
        bf16=False,
        eval_channels_last=False,
    )
    results: dict[str, Any] = {}
    bundles = {}
    for mode in MODES:
        results[mode], bundles[mode] = measure(mode, experiment, execution, args.burn_in, args.rounds)
    return {
        "overrides": overrides,
        "num_agents": experiment.num_agents,
        "image_shape": list(experiment.specs[0].model.input_shape),
        "local_steps": experiment.specs[0].train.local_steps,
        "modes": results,
        "vmap_round_vs_loop": results["vmap"]["round_s_mean"] / results["loop"]["round_s_mean"],
        "vmap_evaluate_vs_loop": results["vmap"]["evaluate_s"] / results["loop"]["evaluate_s"],
        "max_logit_gap": max_logit_gap(bundles["loop"], bundles["vmap"]),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'preset':<18} {'mode':<5} {'start-up s':>10} {'round s':>8} {'samples/s':>10} {'eval s':>7}")
    for name, preset in report["presets"].items():
        for mode, result in preset["modes"].items():
            print(
                f"{name:<18} {mode:<5} {result['startup_s']:>10.2f} {result['round_s_mean']:>8.3f} "
                f"{result['samples_per_s']:>10.0f} {result['evaluate_s']:>7.3f}"
            )
        print(
            f"{name:<18} vmap/loop: round x{preset['vmap_round_vs_loop']:.2f}, "
            f"evaluate x{preset['vmap_evaluate_vs_loop']:.2f}; max logit gap {preset['max_logit_gap']:.1e}"
        )


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {sorted(PRESETS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--burn-in", type=int, default=2, help="untimed rounds first (>= 2, see above)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("bench_vmap.json"))
    args, extras = parser.parse_known_args()
    unknown = [extra for extra in extras if extra.startswith("-")]
    if unknown:
        parser.error(f"unknown options {unknown}; Hydra overrides look like key=value")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args, ["num_agents=8", "logger.progress=false", *extras]


def main() -> None:
    args, extras = parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "device": device_name(args.device),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "burn_in": args.burn_in,
        "rounds": args.rounds,
        "presets": {name: run_preset(name, extras, args) for name in args.presets.split(",")},
    }
    print_table(report)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
