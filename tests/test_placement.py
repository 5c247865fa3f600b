"""Agents are spread over workers that fit the cluster; impossible requests fail up front."""

from __future__ import annotations

import pytest

from sim.errors import ConfigError
from sim.placement import RuntimeConfig, plan_placement


def _runtime(**overrides: object) -> RuntimeConfig:
    values: dict[str, object] = dict(
        backend="ray",
        address=None,
        num_cpus=None,
        agents_per_actor=None,
        num_cpus_per_actor=1.0,
        num_gpus_per_actor=0.0,
        torch_threads=None,
        startup_timeout_s=60.0,
        round_timeout_s=60.0,
        max_actor_restarts=0,
        channels_last=False,
        compile=False,
        vectorize=False,
        bf16=False,
    )
    values.update(overrides)
    return RuntimeConfig(**values)  # type: ignore[arg-type]


def test_default_is_one_actor_per_core_with_contiguous_blocks() -> None:
    placement = plan_placement(8, _runtime(), cpus=2, gpus=0)
    assert placement.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert placement.torch_threads == 1


def test_agents_per_actor_sets_the_group_size() -> None:
    placement = plan_placement(5, _runtime(agents_per_actor=2, num_cpus_per_actor=0.5), cpus=2, gpus=0)
    assert [len(g) for g in placement.groups] == [2, 2, 1]


def test_fractional_gpus_bound_the_number_of_actors() -> None:
    placement = plan_placement(16, _runtime(num_gpus_per_actor=0.25, num_cpus_per_actor=1.0), cpus=16, gpus=1)
    assert len(placement.groups) == 4


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"agents_per_actor": 1}, "runtime.num_cpus_per_actor"),  # 8 actors x 1 CPU on 2 CPUs
        ({"num_cpus_per_actor": 4.0}, "runtime.num_cpus_per_actor"),
        ({"num_gpus_per_actor": 0.5}, "runtime.num_gpus_per_actor"),  # no GPU at all
        ({"num_cpus_per_actor": 0.0}, "runtime.num_cpus_per_actor"),
    ],
)
def test_requests_the_cluster_cannot_satisfy_are_rejected(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        plan_placement(8, _runtime(**overrides), cpus=2, gpus=0)
