"""The HyperTransformer backbone: weights written from the support set, as a set, inside an Agent.

tests/test_backbones.py covers what every backbone must do; these tests cover what only a
support-conditioned one does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from agents.agent import Agent
from agents.backbones import build_backbone
from agents.backbones.hypertransformer import GeneratedConv, HyperTransformer, TrainedConv
from sim.core.errors import ConfigError
from sim.experiment.assembly import build_experiment
from sim.reporting.metrics import agent_accuracies
from tests.conftest import PLAIN_CPU, TINY, make_config
from tests.test_backbones import INPUT_SHAPES, yaml_params

SHAPE = (1, 28, 28)
each_shape = pytest.mark.parametrize("shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
each_mode = pytest.mark.parametrize("generate", ["all", "last"])


def build(shape: tuple[int, int, int] = SHAPE, seed: int = 0, **overrides: Any) -> HyperTransformer:
    torch.manual_seed(seed)
    model = build_backbone("hypertransformer", shape, **{**yaml_params("hypertransformer"), **overrides})
    assert isinstance(model, HyperTransformer)
    return model


def support(model: HyperTransformer, shape: tuple[int, int, int] = SHAPE, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """A random support set of the model's size with labels 0..9 (every class at least twice)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(model.support_size, *shape, generator=generator)
    return x, torch.arange(model.support_size) % 10


def kernels(model: HyperTransformer) -> list[torch.Tensor]:
    """Kernel, norm scale/shift and support statistics of every layer, flattened per layer."""
    return [torch.cat([w.kernel.flatten(), w.scale, w.shift, w.mean, w.inv_std]) for w in model.generate_layers()]


def query(shape: tuple[int, int, int] = SHAPE, batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(7))


@each_mode
@each_shape
def test_embedding_has_the_last_layers_channels(shape: tuple[int, int, int], generate: str) -> None:
    model = build(shape, generate=generate)
    model.condition(*support(model, shape))
    out = model(query(shape))
    assert out.shape == (5, model.num_features)
    assert model.num_features == yaml_params("hypertransformer")["channels"][-1]
    assert torch.isfinite(out).all()


@each_mode
@each_shape
def test_every_trainable_parameter_gets_a_gradient(shape: tuple[int, int, int], generate: str) -> None:
    model = build(shape, generate=generate)
    model.condition(*support(model, shape))
    (model(query(shape)) * torch.randn(5, model.num_features)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_the_same_seed_and_support_give_the_same_weights_and_embedding() -> None:
    first, second, other = build(), build(), build(seed=1)
    for model in (first, second, other):
        model.condition(*support(model))
    for a, b in zip(kernels(first), kernels(second), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first(query()), second(query()))
    assert not torch.allclose(first(query()), other(query()))


def test_other_support_images_give_other_weights() -> None:
    model = build()
    model.condition(*support(model, seed=1))
    before = kernels(model)
    model.condition(*support(model, seed=2))
    for layer, (a, b) in enumerate(zip(before, kernels(model), strict=True)):
        assert not torch.allclose(a, b), layer


def test_other_support_labels_on_the_same_images_give_other_weights() -> None:
    model = build()
    x, y = support(model)
    model.condition(x, y)
    before = kernels(model)
    for labels in ((y + 1) % 10, torch.full_like(y, -1)):  # relabelled; all unlabelled
        model.condition(x, labels)
        for layer, (a, b) in enumerate(zip(before, kernels(model), strict=True)):
            assert not torch.allclose(a, b), layer


@each_mode
def test_the_support_set_is_read_as_a_set(generate: str) -> None:
    """No positional encoding: permuting the support samples leaves every weight unchanged."""
    model = build(generate=generate)
    x, y = support(model)
    model.condition(x, y)
    expected, embedding = kernels(model), model(query())
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    model.condition(x[order], y[order])
    for a, b in zip(expected, kernels(model), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(query()), embedding, rtol=1e-4, atol=1e-5)


def test_generate_last_keeps_earlier_layers_as_ordinary_convs() -> None:
    model = build(generate="last")
    *trained, last = model.layers
    assert all(isinstance(layer, TrainedConv) for layer in trained) and isinstance(last, GeneratedConv)
    model.condition(*support(model, seed=1))
    first = model.generate_layers()
    model.condition(*support(model, seed=2))
    second = model.generate_layers()
    names = dict(model.named_parameters())
    for index, layer in enumerate(trained):
        assert isinstance(layer, TrainedConv)
        assert names[f"layers.{index}.conv.weight"] is layer.conv.weight
        assert first[index].kernel is second[index].kernel is layer.conv.weight
    assert not torch.allclose(first[-1].kernel, second[-1].kernel)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build().parameters())


def test_forward_without_a_support_set_says_what_to_call() -> None:
    with pytest.raises(RuntimeError, match=r"condition\(support_x, support_y\)"):
        build()(query())


def test_support_labels_are_checked_against_num_classes() -> None:
    model = build(num_classes=5)
    x, y = support(model)  # labels up to 9
    with pytest.raises(ConfigError, match="backbone.num_classes"):
        model.condition(x, y)
    with pytest.raises(ConfigError, match="backbone.num_classes"):
        model.condition(x, torch.full_like(y, -2))
    with pytest.raises(ValueError, match="support_y"):
        model.condition(x, y[:3] % 5)
    model.condition(x, torch.where(y < 5, y, -1))  # -1: unlabelled


def test_evaluation_generates_once_per_support_set_and_parameter_state() -> None:
    model = build().eval()
    model.condition(*support(model, seed=1))
    with torch.inference_mode():
        first = model(query())
        cached = model._current_layers()
        assert model._current_layers() is cached
    model.condition(*support(model, seed=2))  # a new support set: new weights
    with torch.inference_mode():
        assert model._current_layers() is not cached
        assert not torch.allclose(model(query()), first)
    with torch.no_grad():
        before = model(query())
        next(iter(model.parameters())).add_(0.5)  # as an optimizer step would, in place
        after = model(query())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model(query()).detach())  # the cache agrees with a fresh generation


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"generate": "first"}, "backbone.generate"),
        ({"channels": []}, "backbone.channels"),
        ({"heads": 5}, "backbone.heads"),
        ({"support_size": 0}, "backbone.support_size"),
        ({"num_classes": -1}, "backbone.num_classes"),
        ({"transformer_layers": 0}, "backbone.transformer_layers"),
    ],
)
def test_bad_values_name_their_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(**overrides)
    assert error.value.key == key


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """What the agent's host sets (runtime.torch_threads=1): two threads on two busy cores are 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_hypertransformer_agent_learns_digits() -> None:
    """Isolated training inside the Agent: fresh support per step, the fixed one for evaluation."""
    experiment = build_experiment(
        make_config(*TINY, "backbone=hypertransformer", "method=isolated", "train.local_steps=20")
    )
    plain = PLAIN_CPU
    agent = Agent(experiment.specs[0], experiment.public, plain)
    assert agent.eval_support is not None and len(agent.eval_support[0]) == agent.support_size

    def private_accuracy() -> float:
        return agent_accuracies({0: agent.evaluate(full=True)}, experiment.class_counts)[0]["main"]["private_acc"]

    before = private_accuracy()
    for round_idx in range(4):
        agent.train_round(round_idx, [])
    after = private_accuracy()
    mix = experiment.class_counts[0] / experiment.class_counts[0].sum()
    # chance under the agent's skewed class mix is its most common class (always guessing it)
    assert after > float(np.max(mix)) + 0.3 and after > before + 0.2


def test_num_classes_comes_from_the_dataset_and_a_mismatch_is_one_named_error() -> None:
    experiment = build_experiment(make_config(*TINY, "backbone=hypertransformer"))
    assert experiment.specs[0].model.backbone_params["num_classes"] == 10  # digits
    with pytest.raises(ConfigError, match="backbone.num_classes"):
        build_experiment(make_config(*TINY, "backbone=hypertransformer", "backbone.num_classes=5"))


def test_a_training_step_draws_support_disjoint_from_its_query_batch() -> None:
    plain = PLAIN_CPU
    experiment = build_experiment(make_config(*TINY, "backbone=hypertransformer", "method=isolated"))
    agent = Agent(experiment.specs[0], experiment.public, plain)
    agent.step_batch(None)
    query = agent._batch_index
    assert query is not None
    support_x, _ = agent._draw_support(exclude=query)
    query_x = agent.private_x[query]
    matches = (support_x.flatten(1)[:, None, :] == query_x.flatten(1)[None, :, :]).all(dim=-1)
    assert not bool(matches.any())
