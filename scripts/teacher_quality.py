"""How good are the distillation targets MHD agents get, round by round? (A diagnostic: it reads public labels.)

    python scripts/teacher_quality.py --out teacher.json -- partition=dirichlet partition.alpha=0.1 num_agents=16

Runs the composed config (conf/ plus the overrides after `--`) serially, with the agents stepped
exactly as the round loop steps them (train on round r's inbox, then publish predictions on
public batch r + 1), and after every round scores what each agent would be taught next round.
The simulator never gives agents public labels; this script looks them up in the dataset only
to score the targets, which no agent sees.

Per round, means over agents, on the next round's public batch (candidates: the in-neighbours'
messages and, under include_self, the agent's own):
- `most_confident`: accuracy of the main-head target the most_confident rule picks;
- `mean`, `confidence_weighted`: accuracy of the candidates' mean, and of their mean weighted by
  each candidate's max probability;
- `any_candidate`: how often at least one candidate is right (what a perfect rule would reach);
- `self_chosen`, `self_chosen_wrong`: how often the agent's own prediction wins, and wins while wrong;
- `unseen_confidence`: the agent's own max probability on public images of classes absent from its shard;
- `aux1_most_confident`: the same as `most_confident` one link down the head chain (head 1's
  candidates, which teach head 2).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.agent import Agent, ExecutionConfig
from agents.messages import Prediction
from agents.public import public_batch_indices
from sim.core.seeding import derive_rng
from sim.data.datasets import load_dataset
from sim.experiment.assembly import build_experiment
from sim.experiment.params import builder_params
from sim.experiment.settings import DATA_SPLIT_KEYS
from sim.run.preflight import compose_config

METRICS = (
    "most_confident",
    "mean",
    "confidence_weighted",
    "any_candidate",
    "self_chosen",
    "self_chosen_wrong",
    "unseen_confidence",
    "aux1_most_confident",
)


def public_labels(cfg: Any) -> np.ndarray:
    """Labels of the public set, in the order the simulator draws it (sim/data/datasets.py)."""
    root = None if cfg.data.root is None else str(cfg.data.root)
    splits = load_dataset(str(cfg.data.name), root, int(cfg.seed), **builder_params(cfg.data, drop=DATA_SPLIT_KEYS))
    is_public = np.zeros(len(splits.train.y), dtype=bool)
    order = derive_rng(int(cfg.seed), "public_split").permutation(len(splits.train.y))
    is_public[order[: int(cfg.data.public_size)]] = True
    return splits.train.y[is_public]


def score(candidates: Sequence[Prediction], y: torch.Tensor, seen: set[int], own_last: bool) -> dict[str, float]:
    """The targets' quality for one agent; `own_last`: its own message is the last candidate."""
    out: dict[str, float] = {}
    for head, key in ((0, "most_confident"), (1, "aux1_most_confident")):
        if any(message.num_heads <= head for message in candidates):
            continue
        probs = torch.stack([message.decode(head).float().softmax(-1) for message in candidates])  # [N, P, C]
        confidence = probs.amax(-1)  # [N, P]
        source = confidence.argmax(0)
        picked = probs[source, torch.arange(probs.shape[1])].argmax(-1)
        out[key] = float((picked == y).float().mean())
        if head:
            continue
        weights = confidence / confidence.sum(0, keepdim=True)
        out["mean"] = float((probs.mean(0).argmax(-1) == y).float().mean())
        out["confidence_weighted"] = float(((weights[..., None] * probs).sum(0).argmax(-1) == y).float().mean())
        out["any_candidate"] = float((probs.argmax(-1) == y).any(0).float().mean())
        if not own_last:
            continue
        own = source == len(candidates) - 1
        out["self_chosen"] = float(own.float().mean())
        out["self_chosen_wrong"] = float((own & (picked != y)).float().mean())
        unseen = torch.tensor([int(label) not in seen for label in y])
        if bool(unseen.any()):
            out["unseen_confidence"] = float(confidence[-1][unseen].mean())
    return out


def audit(overrides: Sequence[str]) -> list[dict[str, Any]]:
    """One row per round: the mean over agents of every metric in METRICS that applies."""
    cfg = compose_config(overrides)
    experiment = build_experiment(cfg)
    labels = public_labels(cfg)
    public = experiment.public
    threads = experiment.runtime.torch_threads or 1
    torch.set_num_threads(threads)
    execution = ExecutionConfig(
        "cpu", threads, channels_last=False, compile=False, vectorize=False, bf16=False, eval_channels_last=False
    )
    agents = [Agent(spec, public, execution) for spec in experiment.specs]
    seen = [set(np.unique(spec.private_y).tolist()) for spec in experiment.specs]
    include_self = experiment.specs[0].distill is not None and experiment.specs[0].distill.include_self
    messages: dict[int, Prediction] = {}
    rows = []
    for round_idx in range(experiment.settings.rounds):
        for agent in agents:
            agent.train_round(round_idx, [messages[n] for n in agent.in_neighbours if n in messages])
        messages = {agent.agent_id: agent.predict(round_idx + 1) for agent in agents}
        rows_of_batch = public_batch_indices(
            public.schedule_seed, round_idx + 1, len(public.public_x), public.public_batch_size
        )
        y = torch.from_numpy(labels[rows_of_batch])
        per_agent = []
        for agent in agents:
            own = [messages[agent.agent_id]] if include_self else []
            candidates = [messages[n] for n in agent.in_neighbours] + own
            if candidates:
                per_agent.append(score(candidates, y, seen[agent.agent_id], include_self))
        row: dict[str, Any] = {"round": round_idx}
        for metric in METRICS:
            values = [scores[metric] for scores in per_agent if metric in scores]
            row[metric] = round(float(np.mean(values)), 3) if values else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("teacher_quality.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the audited run, after --")
    args = parser.parse_args(argv)
    overrides = args.overrides
    rows = audit(overrides)
    args.out.write_text(json.dumps({"overrides": overrides, "rounds": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
