"""memory_vit: memory tokens, memory (adapter) mode, the base-preserving mask, merged adapters.

The generic backbone tests (shapes, gradients, seeds, channels_last) run in test_backbones.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from agents.backbones import build_backbone
from agents.backbones.memory_vit import Block, MemoryViT, adapter_mask, merge_adapters
from agents.model import ModelConfig, MultiHeadModel
from sim.core.errors import ConfigError
from tests.test_backbones import images, yaml_params

SHAPE = (1, 8, 8)  # digits, 2x2 patches of 4x4: the cheapest input


def vit(seed: int = 0, shape: tuple[int, int, int] = SHAPE, **overrides: Any) -> MemoryViT:
    torch.manual_seed(seed)
    model = build_backbone("memory_vit", shape, **{**yaml_params("memory_vit"), **overrides})
    assert isinstance(model, MemoryViT)
    return model


def perturb_adapter(model: MemoryViT, seed: int) -> None:
    """Stands in for fine-tuning: large random adapter tokens, so a leak through the mask would show."""
    assert model.adapter is not None
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))


def test_memory_tokens_are_keys_and_values_only_and_change_the_output() -> None:
    model = vit()
    assert model.encoder.memory is not None and model.encoder.memory.shape == (4, 4, 64)
    seen: list[torch.Size] = []
    for block in model.encoder.blocks:
        block.register_forward_hook(lambda _module, _inputs, output: seen.append(output.shape))
    x = images(SHAPE)
    out = model(x)
    assert seen == [torch.Size([4, 1 + 4, 64])] * 4  # class token + 4 patches: memory is dropped per layer
    with torch.no_grad():
        model.encoder.memory.zero_()
    assert not torch.allclose(model(x), out)


def test_memory_init_is_normal_with_std_0_02() -> None:
    memory = vit(dim=96, heads=4, memory_tokens=64).encoder.memory
    assert memory is not None
    assert abs(memory.std().item() - 0.02) < 0.002 and abs(memory.mean().item()) < 0.002


def test_zero_memory_tokens_is_a_plain_vit() -> None:
    model = vit(memory_tokens=0)
    assert model.encoder.memory is None
    assert model(images(SHAPE)).shape == (4, 64)


def test_memory_mode_trains_only_the_adapter() -> None:
    model = vit(mode="memory")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {"adapter.class_token", "adapter.memory"}
    model(images(SHAPE)).square().sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    before = {name: value.clone() for name, value in model.encoder.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    optimizer.step()
    for name, value in model.encoder.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_heads_train_in_memory_mode() -> None:
    torch.manual_seed(0)
    params = {**yaml_params("memory_vit"), "mode": "memory"}
    model = MultiHeadModel(ModelConfig("memory_vit", params, SHAPE, num_classes=10, aux_heads=3))
    logits, _ = model(images(SHAPE))
    logits.sum().backward()
    assert model.heads.weight.grad is not None


def test_a_fresh_adapter_starts_from_the_base_class_token_of_a_plain_vit() -> None:
    model = vit(mode="memory")
    assert model.encoder.memory is None  # base_checkpoint: null: a plain ViT from BASE_SEED
    assert model.adapter is not None
    assert torch.equal(model.adapter.class_token, model.encoder.class_token)


def test_every_agent_shares_the_memory_mode_base_but_not_its_adapter() -> None:
    first, second = vit(seed=0, mode="memory"), vit(seed=1, mode="memory")
    for (name, a), (_, b) in zip(first.encoder.state_dict().items(), second.encoder.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert first.adapter is not None and second.adapter is not None
    assert not torch.equal(first.adapter.memory, second.adapter.memory)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)], ids=lambda s: "x".join(map(str, s)))
def test_adding_an_adapter_leaves_the_base_output_unchanged(shape: tuple[int, int, int]) -> None:
    model = vit(shape=shape, mode="memory")
    perturb_adapter(model, seed=5)
    x = images(shape)
    alone = model.encoder(x)  # [1, B, D]: the base by itself, no mask
    together = model.encoder(x, [model.adapter])  # [2, B, D]
    torch.testing.assert_close(together[0], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[1], together[0], atol=1e-3)  # the adapter's own output moved
    torch.testing.assert_close(model(x), together[1])


def test_merged_adapters_give_each_adapters_lone_output_and_the_base_output() -> None:
    # independently "fine-tuned" adapters on one base, with different memory sizes
    models = [vit(seed=seed, mode="memory", memory_tokens=m) for seed, m in [(1, 4), (2, 2), (3, 0)]]
    for seed, model in enumerate(models):
        perturb_adapter(model, seed=10 + seed)
    x = images(SHAPE, batch=5)
    merged = merge_adapters(models)
    with torch.no_grad():
        out = merged(x)  # [1 + 3, B, D]
        assert out.shape == (4, 5, 64)
        torch.testing.assert_close(out[0], models[0].encoder(x)[0], rtol=1e-5, atol=1e-5)
        for index, model in enumerate(models):
            torch.testing.assert_close(out[1 + index], model(x), rtol=1e-5, atol=1e-5)


def test_merging_refuses_full_mode_models_and_different_bases(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode: memory"):
        merge_adapters([vit(mode="memory"), vit(mode="full")])
    other_base = vit(seed=7)
    torch.save(other_base.state_dict(), tmp_path / "base.pt")
    with pytest.raises(ValueError, match="different base"):
        merge_adapters([vit(mode="memory"), vit(mode="memory", base_checkpoint=str(tmp_path / "base.pt"))])


def test_the_mask_hides_adapters_from_the_base_and_from_each_other() -> None:
    mask = adapter_mask(base_tokens=3, base_memory=1, adapter_memory=[2, 1])
    # queries: b b b A1 A2 | keys: b b b A1 A2 | base memory | A1 memory x2 | A2 memory
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 1, 1, 1, 0],
            [1, 1, 1, 0, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_memory_mode_starts_from_a_full_mode_checkpoint(tmp_path: Path) -> None:
    base = vit(seed=3)
    x = images(SHAPE)
    torch.save(base.state_dict(), tmp_path / "backbone.pt")
    adapted = vit(mode="memory", base_checkpoint=str(tmp_path / "backbone.pt"), memory_tokens=2)
    torch.testing.assert_close(adapted.encoder(x)[0], base(x))
    # the base keeps its own 4 memory tokens per layer (frozen); the adapter adds memory_tokens=2
    assert adapted.encoder.memory is not None and adapted.encoder.memory.shape == (4, 4, 64)
    assert not adapted.encoder.memory.requires_grad
    assert adapted.adapter is not None and adapted.adapter.memory is not None
    assert adapted.adapter.memory.shape == (4, 2, 64)
    # an agent checkpoint: the MultiHeadModel's state_dict under "model"
    model = MultiHeadModel(ModelConfig("memory_vit", yaml_params("memory_vit"), SHAPE, num_classes=10, aux_heads=1))
    torch.save({"model": model.state_dict(), "cursor": 0}, tmp_path / "agent_00000.pt")
    from_agent = vit(mode="full", base_checkpoint=str(tmp_path / "agent_00000.pt"))
    torch.testing.assert_close(from_agent(x), model.backbone(x))


def test_a_mismatched_or_missing_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    torch.save(vit(dim=32).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match="backbone.base_checkpoint") as error:
        vit(mode="memory", base_checkpoint=str(tmp_path / "small.pt"))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="no such file"):
        vit(mode="memory", base_checkpoint=str(tmp_path / "absent.pt"))


def test_block_keeps_the_token_count_with_and_without_memory() -> None:
    block = Block(dim=16, heads=2, mlp_ratio=2)
    x = torch.randn(3, 5, 16)
    assert block(x, torch.randn(7, 16), None).shape == block(x, None, None).shape == (3, 5, 16)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"patch_size": 3}, "backbone.patch_size"),
        ({"patch_size": 0}, "backbone.patch_size"),
        ({"heads": 5}, "backbone.heads"),
        ({"dim": 0}, "backbone.dim"),
        ({"depth": 0}, "backbone.depth"),
        ({"mlp_ratio": 0}, "backbone.mlp_ratio"),
        ({"memory_tokens": -1}, "backbone.memory_tokens"),
        ({"mode": "adapter"}, "backbone.mode"),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        vit(**overrides)
    assert error.value.key == key
    assert "\n" not in str(error.value)
