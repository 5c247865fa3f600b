"""Measured cost of a checkpoint, against the cost of a round.

    python scripts/bench_checkpoint.py [OVERRIDE ...] [--repeats 5] [--out bench_checkpoint.json]

Builds the run the overrides describe (default: the default `mhd-sim` run), starts its
backend, burns in two rounds, then times `repeats` rounds and `repeats` checkpoints of the
whole population, and the storage probe once. Prints and writes JSON: seconds per round,
seconds per checkpoint, MB per checkpoint, the overhead per round at the configured
`checkpoint_every`, and seconds of the probe. Checkpoints go where `runtime.storage` says (a
temporary folder when it is null), and are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from sim.backends import create_backend
from sim.backends.storage import StorageDir
from sim.experiment.assembly import build_experiment
from sim.run.checkpoint import CheckpointStore, LoopState
from sim.run.loop import group_plans
from sim.run.preflight import compose_config
from sim.run.storage import probe_storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for mhd-sim")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_checkpoint.json"))
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    storage = experiment.runtime.storage
    location = StorageDir.local(run_dir) if storage is None else storage.child(f"bench-{secrets.token_hex(4)}")
    store = CheckpointStore(location, keep=1)
    try:
        backend.start(group_plans(experiment, groups), experiment.public)
        tick = time.perf_counter()
        probe_storage(backend, location, None if storage is None else storage.root)
        probe_s = time.perf_counter() - tick
        for round_idx in range(2):  # burn in
            backend.run_round(round_idx, publish=True)
        tick = time.perf_counter()
        for round_idx in range(2, 2 + args.repeats):
            backend.run_round(round_idx, publish=True)
        round_s = (time.perf_counter() - tick) / args.repeats
        tick = time.perf_counter()
        for repeat in range(args.repeats):
            saved = store.save(backend, LoopState(next_round=2 + args.repeats + repeat))
        checkpoint_s = (time.perf_counter() - tick) / args.repeats
        size_mb = sum(saved.size(name) for name in saved.names()) / 1e6
    finally:
        backend.shutdown()
        if storage is not None:
            location.delete()
        shutil.rmtree(run_dir)
    result = {
        "overrides": args.overrides,
        "backend": experiment.runtime.backend,
        "storage": str(location),
        "probe_s": probe_s,
        "num_agents": experiment.num_agents,
        "backbone": str(cfg.backbone.name),
        "round_s": round_s,
        "checkpoint_s": checkpoint_s,
        "checkpoint_mb": size_mb,
        "checkpoint_every": int(cfg.checkpoint_every),
        "overhead_per_round_pct": 100 * checkpoint_s / max(int(cfg.checkpoint_every), 1) / round_s,
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
