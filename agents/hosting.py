"""Which group class hosts a process's agents: stepped in turn, or vectorised with vmap."""

from __future__ import annotations

from collections.abc import Sequence

from agents.agent import AgentSpec, ExecutionConfig, PublicData
from agents.group import AgentGroup
from agents.vectorized import VectorizedAgentGroup


def build_group(specs: Sequence[AgentSpec], public: PublicData, execution: ExecutionConfig) -> AgentGroup:
    """An AgentGroup, or its vectorised form when `execution.vectorize` (same interface)."""
    group_class = VectorizedAgentGroup if execution.vectorize else AgentGroup
    return group_class(specs, public, execution)
