"""modular_resnet: template reuse, the two mixing modes, per-head mixtures, transfer mode.

The generic backbone tests (shapes, gradients, seeds, channels_last) run in test_backbones.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from agents.backbones import build_backbone
from agents.backbones.modular_resnet import ModularResNet
from agents.model import ModelConfig, MultiHeadModel
from sim.core.errors import ConfigError
from tests.test_backbones import images, yaml_params

SHAPE = (1, 8, 8)  # digits: no stem pooling, the cheapest map


def modular(seed: int = 0, model_heads: int = 1, **overrides: Any) -> ModularResNet:
    torch.manual_seed(seed)
    params = {**yaml_params("modular_resnet"), "width": 16, **overrides}
    model = build_backbone("modular_resnet", SHAPE, model_heads, **params)
    assert isinstance(model, ModularResNet)
    return model


def one_hot_logits(model: ModularResNet, choice: list[int]) -> None:
    """Position l uses only template choice[l] (softmax of +-100 is exactly one-hot in float32)."""
    with torch.no_grad():
        model.mixture_logits.fill_(-100.0)
        for position, template in enumerate(choice):
            model.mixture_logits[:, position, template] = 100.0


def test_depth_may_exceed_templates_and_the_bank_does_not_grow_with_depth() -> None:
    shallow, deep = modular(depth=2, num_templates=2), modular(depth=5, num_templates=2)
    assert deep.mixture_table().shape == (5, 2)
    bank = sum(p.numel() for p in deep.templates.parameters())
    assert bank == sum(p.numel() for p in shallow.templates.parameters()) == 2 * 2 * 16 * 16 * 9
    assert deep(images(SHAPE)).shape == (4, 16)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_weight_and_output_mixing_agree_for_a_one_hot_mixture(norm: str) -> None:
    by_weight = modular(mixing="weight", norm=norm, depth=5, num_templates=3)
    by_output = modular(mixing="output", norm=norm, depth=5, num_templates=3)
    by_output.stem.load_state_dict(by_weight.stem.state_dict())
    by_output.templates.load_state_dict(by_weight.templates.state_dict())
    choice = [2, 0, 2, 1, 0]  # reuse and reorder
    one_hot_logits(by_weight, choice)
    one_hot_logits(by_output, choice)
    x = images(SHAPE)
    torch.testing.assert_close(by_output(x), by_weight(x), rtol=1e-4, atol=1e-5)  # train mode: batch stats


@pytest.mark.parametrize("mixing", ["weight", "output"])
def test_a_soft_mixture_changes_the_output_and_modes_then_differ(mixing: str) -> None:
    model = modular(mixing=mixing)
    x = images(SHAPE)
    uniform = model(x)
    with torch.no_grad():
        model.mixture_logits.normal_()
    assert not torch.allclose(model(x), uniform)


@pytest.mark.parametrize("mixing", ["weight", "output"])
def test_each_head_path_equals_a_single_mixture_model_with_that_heads_mixture(mixing: str) -> None:
    per_head = modular(model_heads=3, per_head_mixtures=True, mixing=mixing)
    with torch.no_grad():
        per_head.mixture_logits.normal_(generator=torch.Generator().manual_seed(3))
    x = images(SHAPE)
    out = per_head(x)
    assert out.shape == (3, 4, per_head.num_features)
    for head in range(3):
        single = modular(mixing=mixing)
        single.stem.load_state_dict(per_head.stem.state_dict())
        single.templates.load_state_dict(per_head.templates.state_dict())
        with torch.no_grad():
            single.mixture_logits.copy_(per_head.mixture_logits[head : head + 1])
        torch.testing.assert_close(out[head], single(x), rtol=1e-4, atol=1e-5)


def test_heads_learn_their_own_mixtures_from_their_own_losses() -> None:
    torch.manual_seed(0)
    params = {**yaml_params("modular_resnet"), "width": 16, "per_head_mixtures": True}
    model = MultiHeadModel(ModelConfig("modular_resnet", params, SHAPE, num_classes=10, aux_heads=2))
    backbone = model.backbone
    assert isinstance(backbone, ModularResNet) and backbone.per_head
    table = backbone.mixture_table()
    assert table.shape == (3, 4, 2)
    assert torch.equal(table[0], table[1])  # all heads start from the uniform mixture
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = images(SHAPE, batch=16)
    targets = torch.randint(0, 10, (3, 16), generator=torch.Generator().manual_seed(4))  # one task per head
    for _ in range(3):
        logits, embedding = model(x)
        assert logits.shape == (3, 16, 10) and embedding.shape == (16, backbone.num_features)
        loss = sum(F.cross_entropy(logits[head], targets[head]) for head in range(3))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
    table = backbone.mixture_table()
    assert not torch.allclose(table[0], table[1], atol=1e-6)
    assert not torch.allclose(table[1], table[2], atol=1e-6)


def test_frozen_templates_get_no_gradient_while_mixtures_norms_and_stem_do() -> None:
    model = modular(freeze_templates=True, mixing="output")
    model(images(SHAPE)).square().sum().backward()
    for param in model.templates.parameters():
        assert not param.requires_grad and param.grad is None
    assert model.mixture_logits.grad is not None and model.mixture_logits.grad.abs().sum() > 0
    for name, param in model.named_parameters():
        if not name.startswith("templates."):
            assert param.grad is not None, name


def test_an_optimizer_step_leaves_frozen_templates_unchanged() -> None:
    model = modular(freeze_templates=True)
    before = [p.clone() for p in model.templates.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        optimizer.zero_grad()
        model(images(SHAPE)).square().sum().backward()
        optimizer.step()
    for old, new in zip(before, model.templates.parameters(), strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("per_head_mixtures", [False, True])
def test_mixture_table_rows_are_distributions(per_head_mixtures: bool) -> None:
    model = modular(model_heads=2, per_head_mixtures=per_head_mixtures, depth=4, num_templates=3)
    with torch.no_grad():
        model.mixture_logits.normal_()
    table = model.mixture_table()
    assert table.shape == ((2, 4, 3) if per_head_mixtures else (4, 3))
    assert (table >= 0).all()
    torch.testing.assert_close(table.sum(dim=-1), torch.ones(table.shape[:-1]))


@pytest.mark.parametrize(("shape", "side"), [((1, 8, 8), 8), ((1, 28, 28), 7), ((3, 32, 32), 8)])
def test_the_stem_pools_to_at_most_max_resolution(shape: tuple[int, int, int], side: int) -> None:
    torch.manual_seed(0)
    model = build_backbone("modular_resnet", shape, **yaml_params("modular_resnet"))
    assert model.stem(images(shape)).shape[-2:] == (side, side)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"mixing": "both"}, "backbone.mixing"),
        ({"num_templates": 0}, "backbone.num_templates"),
        ({"depth": -1}, "backbone.depth"),
        ({"width": 0}, "backbone.width"),
        ({"norm": "layer"}, "backbone.norm"),
        ({"max_resolution": 0}, "backbone.max_resolution"),
        ({"per_head_mixtures": "yes"}, "backbone.per_head_mixtures"),
        ({"freeze_templates": 1}, "backbone.freeze_templates"),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        modular(**overrides)
    assert error.value.key == key
    assert "\n" not in str(error.value)
