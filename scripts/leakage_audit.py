"""Leakage audit: what an honest-but-curious neighbour learns about an agent from its predictions, measured.

    python scripts/leakage_audit.py                                   # none and dp_sgd at epsilon 1, 4, 8, 32
    python scripts/leakage_audit.py --epsilons 4 --rounds 10 --out audit.json -- num_agents=4
    python scripts/leakage_audit.py --epsilons 8 --noisy-probs 4 --rr 2      # DP-SGD against the output mechanisms

Each setting is a serial run of the composed config (conf/, plus the overrides after `--`); every
`--every` rounds and after the last one, the attacks below run on what the agents published that
round and the script records the attack's score next to the score of a guess that ignores the
predictions. It writes one JSON and prints one table per attack.

What the attacker observes (docs/privacy.md#leakage-audit). A neighbour of agent i receives i's
message each round: i's prediction of every head on that round's public batch (public images,
which it also holds). It never sees i's outputs on private samples, its weights or its losses.

(a) Class mix. The attacker's estimate of i's private class mix is i's mean main-head probability
    over the public batch (under randomized response: the label frequencies, debiased with the
    mechanism's public epsilon). Score: total variation distance to the true mix, against the uniform
    guess's distance; and how often the estimate's top class is i's most frequent class, against
    the 1/C of guessing.
(b) Membership, from the messages. For a candidate sample (x, y) the attacker averages i's
    probability of y on the k public images nearest to x (pixels, Euclidean). Members are i's
    private samples; non-members are test samples of the same classes, as many per class, so that
    the class mix (attack a) cannot decide membership. Score: ROC AUC and the best TPR - FPR
    (advantage), against 0.5 and 0 for a guess.
(c) Membership, querying the model: an upper bound. An auditor that can run i's model on the
    candidates themselves (which no neighbour can) scores them by their negative loss (Yeom et al.
    2018). This bounds what any attacker with less access learns by this statistic; it is not what
    a neighbour sees.

The scores are on one seed and a few hundred candidates per agent: differences of a few points
of AUC are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agents.agent import TrainingDivergedError
from agents.messages import Prediction
from agents.output_privacy import debias_label_frequencies
from sim.backends import create_backend
from sim.core.seeding import derive_rng
from sim.experiment.assembly import Experiment, build_experiment
from sim.experiment.output_privacy import OutputPrivacyPlan
from sim.reporting.metrics import agent_accuracies, head_summary
from sim.run.loop import group_plans
from sim.run.preflight import compose_config

NEAREST_PUBLIC = 5  # public images whose predictions stand in for a candidate's, in attack (b)
MAX_MEMBERS = 200  # candidates per agent and side (members, non-members)


class Setting(NamedTuple):
    label: str
    overrides: list[str]


def settings(epsilons: Sequence[float], noisy: Sequence[float] = (), responses: Sequence[float] = ()) -> list[Setting]:
    """No privacy, DP-SGD calibrated to each target epsilon, then the output mechanisms at each per-release epsilon."""
    dp = ["privacy=dp_sgd", "privacy.noise_multiplier=null"]
    label_only = ["privacy=randomized_response", "method.message_codec=topk", "method.message_topk=1"]
    return (
        [Setting("none", ["privacy=none"])]
        + [Setting(f"dp eps={eps:g}", [*dp, f"privacy.target_epsilon={eps}"]) for eps in epsilons]
        + [Setting(f"noisy e0={eps:g}", ["privacy=noisy_probs", f"privacy.epsilon={eps}"]) for eps in noisy]
        + [Setting(f"rr e0={eps:g}", [*label_only, f"privacy.epsilon={eps}"]) for eps in responses]
    )


def roc_auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counting half (the Mann-Whitney statistic)."""
    scores = np.concatenate([members, others])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(sorted_scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    member_ranks = ranks[: len(members)].sum()
    return float((member_ranks - len(members) * (len(members) + 1) / 2) / (len(members) * len(others)))


def advantage(members: np.ndarray, others: np.ndarray) -> float:
    """max over thresholds of TPR - FPR (0 for a guess, 1 for a perfect attack)."""
    thresholds = np.unique(np.concatenate([members, others]))
    tpr = (members[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (others[None, :] >= thresholds[:, None]).mean(axis=1)
    return float(max((tpr - fpr).max(), 0.0))


class Candidates(NamedTuple):
    """One agent's membership candidates: its own samples and class-matched test samples."""

    members_x: torch.Tensor
    members_y: torch.Tensor
    others_x: torch.Tensor
    others_y: torch.Tensor


def candidates(experiment: Experiment, agent_id: int) -> Candidates:
    """Per class, as many members as test samples of that class allow (at most MAX_MEMBERS in all)."""
    rng = derive_rng(experiment.settings.seed, "leakage_audit", agent_id)
    spec = experiment.specs[agent_id]
    test_y = experiment.public.test_y
    member_rows, other_rows = [], []
    for label in np.unique(spec.private_y):
        mine = np.flatnonzero(spec.private_y == label)
        theirs = np.flatnonzero(test_y == label)
        take = min(len(mine), len(theirs))
        member_rows.append(rng.choice(mine, take, replace=False))
        other_rows.append(rng.choice(theirs, take, replace=False))
    members, others = np.concatenate(member_rows), np.concatenate(other_rows)
    keep = rng.permutation(len(members))[:MAX_MEMBERS]
    members, others = members[keep], others[keep]
    return Candidates(
        torch.from_numpy(spec.private_x[members]),
        torch.from_numpy(spec.private_y[members]),
        torch.from_numpy(experiment.public.test_x[others]),
        torch.from_numpy(test_y[others]),
    )


def published_probs(message: Prediction) -> torch.Tensor:
    """The main head's probabilities on the public batch, as the receiver decodes them: [P, C]."""
    return message.decode(0).softmax(dim=-1)


def class_mix_attack(message: Prediction, true_mix: np.ndarray, rr_epsilon: float | None = None) -> dict[str, float]:
    """The mean published probability; for randomized-response labels, their debiased frequencies (clipped at 0)."""
    estimate = published_probs(message).mean(dim=0).numpy()
    if rr_epsilon is not None:  # the mechanism and its epsilon are public: the attacker inverts its bias
        debiased = debias_label_frequencies(torch.from_numpy(estimate), rr_epsilon).clamp_min(0).numpy()
        estimate = debiased / debiased.sum() if debiased.sum() > 0 else np.full_like(estimate, 1 / len(estimate))
    uniform = np.full_like(true_mix, 1 / len(true_mix))
    return {
        "tv_attack": float(0.5 * np.abs(estimate - true_mix).sum()),
        "tv_uniform": float(0.5 * np.abs(uniform - true_mix).sum()),
        "top_class_hit": float(estimate.argmax() == true_mix.argmax()),
    }


def observable_scores(message: Prediction, public_x: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Attack (b): i's mean probability of y on the public images nearest to each candidate."""
    distances = torch.cdist(x.flatten(1), public_x.flatten(1))  # [n, P]
    nearest = distances.topk(NEAREST_PUBLIC, largest=False).indices  # [n, k]
    probs = published_probs(message)  # [P, C]
    return probs[nearest, y[:, None]].mean(dim=1).numpy()


def query_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Attack (c), the upper bound: the negative loss of i's own model on each candidate."""
    model.eval()
    with torch.inference_mode():
        logits = model(x)[0][0]
    return (-F.cross_entropy(logits, y, reduction="none")).numpy()


def rr_epsilon(experiment: Experiment) -> float | None:
    """The per-label epsilon of a randomized-response run (what the attacker debiases with); None otherwise."""
    plan = experiment.privacy
    if isinstance(plan, OutputPrivacyPlan) and plan.settings.mechanism == "randomized_response":
        return plan.settings.epsilon
    return None


def audit_round(experiment: Experiment, backend: Any, round_idx: int, pool: dict[int, Candidates]) -> dict[str, Any]:
    """Every attack on every agent that published this round, averaged over agents."""
    messages = {sender: m for bundle in backend.bundles for sender, m in bundle.items() if m.batch_id == round_idx + 1}
    agents = {agent_id: agent for group in backend.groups for agent_id, agent in group.agents.items()}
    rows: dict[str, list[float]] = {}
    for agent_id, message in sorted(messages.items()):
        counts = experiment.class_counts[agent_id]
        public_x = agents[agent_id].public_batch(round_idx + 1).cpu()
        found = class_mix_attack(message, counts / counts.sum(), rr_epsilon(experiment))
        c = pool[agent_id]
        seen = [
            observable_scores(message, public_x, x, y)
            for x, y in ((c.members_x, c.members_y), (c.others_x, c.others_y))
        ]
        queried = [
            query_scores(agents[agent_id].model, x, y)
            for x, y in ((c.members_x, c.members_y), (c.others_x, c.others_y))
        ]
        found |= {
            "observable_auc": roc_auc(*seen),
            "observable_advantage": advantage(*seen),
            "query_auc": roc_auc(*queried),
            "query_advantage": advantage(*queried),
        }
        for key, value in found.items():
            rows.setdefault(key, []).append(value)
    return {"agents_publishing": len(messages), **{key: float(np.mean(values)) for key, values in rows.items()}}


def run_setting(setting: Setting, overrides: Sequence[str], rounds: int, every: int) -> dict[str, Any]:
    """One serial run of the setting, with the attacks every `every` rounds and after the last published round."""
    cfg = compose_config([*overrides, *setting.overrides, f"rounds={rounds}", "runtime.backend=serial"])
    experiment = build_experiment(cfg)
    backend, groups = create_backend(experiment)
    pool = {spec.agent_id: candidates(experiment, spec.agent_id) for spec in experiment.specs}
    history: list[dict[str, Any]] = []
    result: dict[str, Any] = {"setting": setting.label, "overrides": setting.overrides, "rounds": history}
    try:
        backend.start(group_plans(experiment, groups), experiment.public)
        for round_idx in range(experiment.settings.rounds):
            metrics = backend.run_round(round_idx, publish=True)  # the last round publishes too: its model is audited
            if (round_idx + 1) % every and round_idx != experiment.settings.rounds - 1:
                continue
            point = {"round": round_idx + 1, **audit_round(experiment, backend, round_idx, pool)}
            if experiment.privacy is not None:
                point["epsilon_max"] = experiment.privacy.record(metrics).get("privacy/epsilon_max")
            history.append(point)
        result["main_head"] = head_summary(agent_accuracies(backend.evaluate(full=True), experiment.class_counts))[
            "main"
        ]
    except TrainingDivergedError as error:  # too much noise for this optimizer: a result, not a crash
        result["diverged"] = str(error)
    finally:
        backend.shutdown()
    return result


COLUMNS = [
    ("eps", "epsilon_max", "{:.2f}"),
    ("mixTV", "tv_attack", "{:.3f}"),
    ("uniTV", "tv_uniform", "{:.3f}"),
    ("top1", "top_class_hit", "{:.2f}"),
    ("obsAUC", "observable_auc", "{:.3f}"),
    ("obsAdv", "observable_advantage", "{:.3f}"),
    ("qryAUC", "query_auc", "{:.3f}"),
    ("qryAdv", "query_advantage", "{:.3f}"),
]


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'setting':<13} {'round':>5} " + " ".join(f"{name:>7}" for name, _, _ in COLUMNS)]
    for result in results:
        for point in result["rounds"]:
            cells = ["-" if point.get(key) is None else fmt.format(point[key]) for _, key, fmt in COLUMNS]
            lines.append(f"{result['setting']:<13} {point['round']:>5} " + " ".join(f"{cell:>7}" for cell in cells))
        if "diverged" in result:
            lines.append(f"{'':<13} diverged: {result['diverged']}")
            continue
        accuracy = result["main_head"]
        lines.append(
            f"{'':<13} final main head: shared {accuracy['shared_acc']:.3f} private {accuracy['private_acc']:.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 8.0, 32.0])
    parser.add_argument("--noisy-probs", type=float, nargs="*", default=[], help="privacy=noisy_probs at each epsilon")
    parser.add_argument("--rr", type=float, nargs="*", default=[], help="privacy=randomized_response at each epsilon")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--every", type=int, default=10, help="rounds between audits (and after the last)")
    parser.add_argument("--out", type=Path, default=Path("leakage_audit.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every setting, e.g. num_agents=4")
    args = parser.parse_args(argv)
    base = ["logger.progress=false", "runtime.torch_threads=1", *args.overrides]
    results = []
    for setting in settings(args.epsilons, args.noisy_probs, args.rr):
        print(f"running {setting.label} ...", file=sys.stderr, flush=True)
        results.append(run_setting(setting, base, args.rounds, args.every))
    args.out.write_text(json.dumps({"overrides": base, "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
