"""Seconds one agent takes to evaluate on the whole test set, per `train.eval_batch_size`.

    python scripts/bench_eval.py [--presets mnist_small_cnn,cifar_resnet8,digits_small_cnn]
                                 [--batch-sizes 32,64,128,256,1024] [--repeats 5] [--threads 1]
                                 [--out bench_eval.json] [OVERRIDE ...]

An agent in a Ray actor of the default local runtime has one core (one torch thread), so that
is the default here. Every preset builds one trained-for-nothing agent (evaluation cost does not
depend on the weights) and times `Agent.evaluate(full=True)` for each batch size, the sizes
interleaved within each repeat so that a change of machine load hits all of them alike; the
median of --repeats is reported, with the spread. Presets use generated data of the real
datasets' shapes and test-set sizes (MNIST, CIFAR-10, digits), so no download is needed.
Prints a table and writes JSON (--out). Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from agents.agent import Agent
from sim.backends.runtime import execution_config
from sim.experiment.assembly import build_experiment
from sim.run.preflight import compose_config

SYNTHETIC = ["data=synthetic", "data.num_classes=10", "data.num_train=2000", "data.public_size=500"]
PRESETS = {
    "mnist_small_cnn": [*SYNTHETIC, "data.image_shape=[1,28,28]", "data.num_test=10000", "backbone=small_cnn"],
    "cifar_resnet8": [*SYNTHETIC, "data.image_shape=[3,32,32]", "data.num_test=10000", "backbone=resnet8"],
    "digits_small_cnn": ["data=digits", "backbone=small_cnn"],
}


def build_agent(overrides: Sequence[str], threads: int) -> Agent:
    """Agent 0 of a 3-agent population built from the composed config (serial execution settings)."""
    experiment = build_experiment(compose_config(["num_agents=3", "runtime.backend=serial", *overrides]))
    return Agent(experiment.specs[0], experiment.public, execution_config(experiment.runtime, threads))


def time_evaluation(agent: Agent, batch_size: int) -> float:
    """Wall seconds of one whole-test-set evaluation with `batch_size` images per forward pass."""
    agent.spec = replace(agent.spec, train=replace(agent.spec.train, eval_batch_size=batch_size))
    start = time.perf_counter()
    agent.evaluate(full=True)
    return time.perf_counter() - start


def run_preset(
    name: str, extras: Sequence[str], batch_sizes: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    agent = build_agent([*PRESETS[name], *extras], args.threads)
    time_evaluation(agent, batch_sizes[0])  # first-call costs (allocator, kernels) out of the way
    samples: dict[int, list[float]] = {size: [] for size in batch_sizes}
    for repeat in range(args.repeats):
        order = batch_sizes if repeat % 2 == 0 else list(reversed(batch_sizes))
        for size in order:
            samples[size].append(time_evaluation(agent, size))
    test_images = len(agent.public.test_y)
    results = {
        str(size): {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        for size, times in samples.items()
    }
    fastest = min(batch_sizes, key=lambda size: statistics.median(samples[size]))
    return {"test_images": test_images, "batch_sizes": results, "fastest": fastest}


def print_table(report: dict[str, Any]) -> None:
    sizes = report["batch_sizes"]
    print(f"seconds per whole-test-set evaluation of one agent ({report['threads']} torch thread(s), median)")
    print(f"{'preset':<20} {'test images':>11} " + " ".join(f"{size:>8}" for size in sizes) + "  fastest")
    for name, result in report["presets"].items():
        cells = " ".join(f"{result['batch_sizes'][str(size)]['median_s']:>8.2f}" for size in sizes)
        print(f"{name:<20} {result['test_images']:>11} {cells}  {result['fastest']}")


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--batch-sizes", default="32,64,128,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench_eval.json"))
    return parser.parse_known_args()


def main() -> None:
    args, extras = parse_args()
    presets = args.presets.split(",")
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        raise SystemExit(f"bench_eval.py: error: --presets: unknown {unknown}; choose from {', '.join(PRESETS)}")
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"bench_eval.py: error: --batch-sizes={args.batch_sizes!r}: comma-separated ints") from None
    if args.repeats < 1 or args.threads < 1 or min(batch_sizes) < 1:
        raise SystemExit("bench_eval.py: error: --repeats, --threads and every batch size must be >= 1")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "command": "python scripts/bench_eval.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]},
        "threads": args.threads,
        "repeats": args.repeats,
        "batch_sizes": batch_sizes,
        "presets": {name: run_preset(name, extras, batch_sizes, args) for name in presets},
    }
    report["machine"]["load_avg_1m_after"] = os.getloadavg()[0]
    print_table(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
