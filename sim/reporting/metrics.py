"""Accuracy per agent and per head, from test-set counts.

Shared accuracy: correct / seen over the whole global test set. Private accuracy: per-class
accuracy weighted by the agent's own private class distribution (its partition row), i.e. the
accuracy the agent would get on test data drawn like its own data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from agents.messages import EvalCounts
from agents.model import head_names

AgentHeadAccuracy = dict[int, dict[str, dict[str, float]]]  # agent -> head -> metric -> value


def agent_accuracies(counts: Mapping[int, EvalCounts], class_counts: np.ndarray) -> AgentHeadAccuracy:
    """Shared and private accuracy of every agent's every head.

    Args:
        counts: test counts per agent id (the central method maps every id to one model).
        class_counts: [K, C] private samples of each class held by each agent.
    """
    result: AgentHeadAccuracy = {}
    for agent_id in sorted(counts):
        agent_counts = counts[agent_id]
        mix = class_counts[agent_id] / max(int(class_counts[agent_id].sum()), 1)  # [C]
        per_class = agent_counts.correct / np.maximum(agent_counts.seen, 1)  # [heads, C]
        shared = agent_counts.correct.sum(axis=1) / max(int(agent_counts.seen.sum()), 1)  # [heads]
        private = per_class @ mix  # [heads]
        names = head_names(agent_counts.correct.shape[0])
        result[agent_id] = {
            name: {"shared_acc": float(shared[h]), "private_acc": float(private[h])} for h, name in enumerate(names)
        }
    return result


def head_summary(per_agent: AgentHeadAccuracy) -> dict[str, dict[str, float]]:
    """Per head: mean/min/max over agents of shared and private accuracy (`shared_acc` = mean)."""
    heads = next(iter(per_agent.values())).keys()
    summary: dict[str, dict[str, float]] = {}
    for head in heads:
        row: dict[str, float] = {}
        for metric in ("shared_acc", "private_acc"):
            values = np.array([agent[head][metric] for agent in per_agent.values()])
            row[metric] = float(values.mean())
            row[f"{metric}_min"] = float(values.min())
            row[f"{metric}_max"] = float(values.max())
        summary[head] = row
    return summary


def mean_losses(round_metrics: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Mean over agents of every loss term any agent reported this round."""
    names = sorted({name for metrics in round_metrics.values() for name in metrics if name.startswith("loss/")})
    return {name: float(np.mean([m[name] for m in round_metrics.values() if name in m])) for name in names}


def round_bytes(round_metrics: Mapping[int, Mapping[str, float]], out_degree: Mapping[int, int]) -> int:
    """Bytes put on edges this round: each message travels once per out-edge."""
    return int(
        sum(
            metrics.get("comm/message_bytes", 0.0) * out_degree[agent_id] for agent_id, metrics in round_metrics.items()
        )
    )
