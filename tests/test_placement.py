"""Agents are grouped into workers that fit the nodes; impossible requests fail up front.

Backbones that ask for the runtime-wide resources share workers; one with its own
`runtime.backbone_resources` entry (or any backbone, when vectorised) gets workers of its own.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from sim.backends.ray.cluster import ClusterConfig
from sim.backends.ray.placement import Node, plan_placement
from sim.backends.runtime import RuntimeConfig
from sim.core.errors import ConfigError


def _runtime(**overrides: object) -> RuntimeConfig:
    cluster = ClusterConfig(
        placement_strategy="PACK", resources={}, backbone_resources={}, shard_source="driver", ship_code=True
    )
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
        cluster=cluster,
        faults=(),
        storage=None,
        eval_channels_last=True,
        keep_actors=False,
        kept_idle_s=600.0,
    )
    values.update(overrides)
    return RuntimeConfig(**values)  # type: ignore[arg-type]


def _with_cluster(runtime: RuntimeConfig, **overrides: object) -> RuntimeConfig:
    return replace(runtime, cluster=replace(runtime.cluster, **overrides))  # type: ignore[arg-type]


def _machine(cpus: float, gpus: float = 0.0, **custom: float) -> list[Node]:
    return [Node("127.0.0.1", {"CPU": cpus, "GPU": gpus, **custom})]


CNN = "small_cnn"


def test_default_is_one_actor_per_core_with_contiguous_blocks() -> None:
    placement = plan_placement([CNN] * 8, _runtime(), _machine(2))
    assert placement.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert placement.torch_threads == [1, 1]
    assert [request.amounts for request in placement.requests] == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_agents_per_actor_sets_the_group_size() -> None:
    placement = plan_placement([CNN] * 5, _runtime(agents_per_actor=2, num_cpus_per_actor=0.5), _machine(2))
    assert [len(g) for g in placement.groups] == [2, 2, 1]


def test_fractional_gpus_bound_the_number_of_actors() -> None:
    placement = plan_placement([CNN] * 16, _runtime(num_gpus_per_actor=0.25), _machine(16, gpus=1))
    assert len(placement.groups) == 4
    assert placement.requests[0].num_gpus == 0.25


def test_requests_are_packed_node_by_node_not_against_the_cluster_sum() -> None:
    nodes = [Node("127.0.0.2", {"CPU": 1.5}), Node("127.0.0.3", {"CPU": 1.5})]
    assert len(plan_placement([CNN] * 8, _runtime(), nodes).groups) == 2  # 3 CPUs in all, but 1 actor per node
    with pytest.raises(ConfigError, match=r"runtime.num_cpus_per_actor=2.0 .*at most 1.5: no node has more CPU"):
        plan_placement([CNN] * 8, _runtime(num_cpus_per_actor=2.0), nodes)


def test_agents_of_one_backbone_share_actors_with_their_backbone_request() -> None:
    backbones = ["resnet20", CNN, "resnet20", CNN, CNN, CNN]
    runtime = _with_cluster(_runtime(num_cpus_per_actor=0.5), backbone_resources={"resnet20": {"CPU": 1.0, "GPU": 0.5}})
    placement = plan_placement(backbones, runtime, _machine(4, gpus=1))
    hosted = {tuple(group): ask.amounts for group, ask in zip(placement.groups, placement.requests, strict=True)}
    assert all(len({backbones[agent] for agent in group}) == 1 for group in placement.groups)
    assert hosted[(0,)] == hosted[(2,)] == {"CPU": 1.0, "GPU": 0.5}  # two GPU halves, one agent each
    cnn_groups = [group for group in placement.groups if backbones[group[0]] == CNN]
    assert sorted(agent for group in cnn_groups for agent in group) == [1, 3, 4, 5]
    assert len(cnn_groups) == 4  # the 2 CPUs left give 4 half-CPU actors
    assert placement.torch_threads[placement.groups.index([0])] == 1


def test_backbones_without_their_own_resources_share_workers() -> None:
    """Four backbones on two cores: two workers in ring order, as for one backbone."""
    backbones = ["resnet8", "modular_resnet", "memory_vit", "hypertransformer"] * 2
    placement = plan_placement(backbones, _runtime(), _machine(2))
    assert placement.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [request.amounts for request in placement.requests] == [{"CPU": 1.0}, {"CPU": 1.0}]


def test_vectorised_backbones_get_workers_of_their_own_and_must_fit() -> None:
    """One vmapped model per worker: each backbone is its own kind, so four do not fit two cores."""
    backbones = [CNN, "resnet8"] * 4
    placement = plan_placement(backbones, _runtime(vectorize=True), _machine(2))
    assert [sorted({backbones[agent] for agent in group}) for group in placement.groups] == [[CNN], ["resnet8"]]
    four = ["resnet8", "modular_resnet", "memory_vit", "hypertransformer"] * 2
    with pytest.raises(ConfigError, match=r"runtime.num_cpus_per_actor=1.0 .*every kind of worker \(resnet8, "):
        plan_placement(four, _runtime(vectorize=True), _machine(2))


def test_custom_resources_pin_actors_to_the_nodes_that_have_them() -> None:
    nodes = [Node("127.0.0.2", {"CPU": 4.0}), Node("127.0.0.3", {"CPU": 4.0, "ssd": 1.0})]
    runtime = _with_cluster(_runtime(), resources={"ssd": 0.25})
    placement = plan_placement([CNN] * 8, runtime, nodes)
    assert len(placement.groups) == 4  # bounded by ssd: 4 x 0.25 on the one node with it
    assert placement.requests[0].custom == {"ssd": 0.25}
    with pytest.raises(ConfigError, match=r"runtime.resources.gpu_node=1.0 .*ray start --resources"):
        plan_placement([CNN] * 8, _with_cluster(_runtime(), resources={"gpu_node": 1.0}), nodes)


def test_a_backbone_request_no_node_can_hold_names_its_key() -> None:
    runtime = _with_cluster(_runtime(), backbone_resources={"resnet20": {"GPU": 2.0}})
    nodes = [Node("10.0.0.1", {"CPU": 8.0, "GPU": 1.0}), Node("10.0.0.2", {"CPU": 8.0, "GPU": 1.0})]
    with pytest.raises(ConfigError, match=r"runtime.backbone_resources.resnet20.num_gpus=2.0 .*10.0.0.1: 1"):
        plan_placement(["resnet20", CNN], runtime, nodes)


def test_the_strategy_is_carried_to_the_placement() -> None:
    placement = plan_placement([CNN] * 4, _with_cluster(_runtime(), placement_strategy="SPREAD"), _machine(2))
    assert placement.strategy == "SPREAD"


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
        plan_placement([CNN] * 8, _runtime(**overrides), _machine(2))
