"""Every registered backbone, on every input shape the datasets produce (timm test_models style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from agents.backbones import BACKBONES, Backbone, build_backbone
from sim.core.errors import ConfigError
from sim.experiment.backbones import MIXED_BACKBONES

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "backbone"
INPUT_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]  # sklearn digits, MNIST, CIFAR
BATCH = 4


def yaml_params(name: str) -> dict[str, Any]:
    """conf/backbone/NAME.yaml as builder kwargs (without `name` and the driver's `optimizer`)."""
    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    assert isinstance(conf, dict)
    params = {str(key): value for key, value in conf.items()}
    assert params.pop("name") == name
    params.pop("optimizer", None)
    if "num_classes" in params and params["num_classes"] is None:  # the driver fills in the dataset's
        params["num_classes"] = 10
    return params


def build(name: str, shape: tuple[int, int, int], seed: int = 0, **overrides: Any) -> Backbone:
    """The backbone as its yaml configures it; a support-conditioned one gets a fixed support set."""
    torch.manual_seed(seed)
    model = build_backbone(name, shape, **{**yaml_params(name), **overrides})
    if model.support_size:
        labels = torch.arange(model.support_size) % 3
        model.condition(images(shape, batch=model.support_size), labels)
    return model


def images(shape: tuple[int, int, int], batch: int = BATCH) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


each_backbone = pytest.mark.parametrize("name", BACKBONES.names())
each_shape = pytest.mark.parametrize("shape", INPUT_SHAPES, ids=lambda s: "x".join(map(str, s)))


@each_backbone
@each_shape
def test_output_is_an_embedding_of_num_features(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape)
    out = model(images(shape))
    assert out.shape == (BATCH, model.num_features)
    assert out.dtype == torch.float32


@each_backbone
@each_shape
def test_every_parameter_gets_a_finite_gradient(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape)
    out = model(images(shape))
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * projection).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@each_backbone
@each_shape
def test_same_seed_builds_the_same_model(name: str, shape: tuple[int, int, int]) -> None:
    first, second = build(name, shape), build(name, shape)
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    x = images(shape)
    assert torch.equal(first(x), second(x))
    assert not torch.equal(build(name, shape, seed=1)(x), first(x))


@each_backbone
@each_shape
def test_channels_last_input_gives_the_same_embedding(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape).eval()
    x = images(shape)
    expected = model(x)
    # Module.to accepts memory_format at runtime; torch's stubs omit it.
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@each_backbone
@each_shape
def test_eval_forward_on_a_single_image(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape).eval()
    with torch.no_grad():
        single = model(images(shape, batch=1))
        batched = model(images(shape, batch=1).expand(3, *shape))
    assert single.shape == (1, model.num_features)
    torch.testing.assert_close(batched, single.expand(3, -1))


def test_every_backbone_has_a_yaml_and_every_yaml_a_backbone() -> None:
    yaml_names = {path.stem for path in CONF_DIR.glob("*.yaml")} - {MIXED_BACKBONES}
    assert yaml_names == set(BACKBONES.names())
    for name in yaml_names:
        assert OmegaConf.load(CONF_DIR / f"{name}.yaml").name == name


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("resnet8", {"norm": "foo"}, "backbone.norm"),
        ("resnet8", {"blocks_per_stage": 3}, "backbone.blocks_per_stage"),
        ("resnet20", {"widths": [16, 32]}, "backbone.widths"),
        ("resnet20", {"widths": [16, 0, 64]}, "backbone.widths"),
        ("small_cnn", {"channels": []}, "backbone.channels"),
        ("small_cnn", {"embedding_dim": -1}, "backbone.embedding_dim"),
        ("small_cnn", {"dropout": 0.5}, "backbone.dropout"),
        ("small_cnn", {"init": "xavier"}, "backbone.init"),
    ],
)
def test_bad_param_raises_config_error_naming_the_key(name: str, overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        build(name, (1, 28, 28), **overrides)
    assert error.value.key == key
    assert key in str(error.value)


def test_missing_param_and_unknown_name_raise_config_error() -> None:
    params = yaml_params("resnet8")
    del params["norm"]
    with pytest.raises(ConfigError, match="backbone.norm"):
        build_backbone("resnet8", (1, 28, 28), **params)
    with pytest.raises(ConfigError, match="resnet20"):
        build_backbone("resnet21", (1, 28, 28))


def test_group_norm_resnet_builds_and_runs() -> None:
    model = build("resnet8", (3, 32, 32), norm="group")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert model(images((3, 32, 32))).shape == (BATCH, model.num_features)


@pytest.mark.parametrize(("init", "low", "high"), [("fan_in", 0.5, 5.0), ("fan_out", 0.0, 0.2)])
def test_small_cnn_init_sets_how_much_signal_reaches_the_embedding(init: str, low: float, high: float) -> None:
    """fan_in keeps a unit-variance 1x28x28 input's signal to the embedding; fan_out (the ResNets' init) shrinks it.

    The shrunken signal is what kept 2-class MNIST agents at the chance loss for rounds
    (docs/results.md, "Robustness grid").
    """
    stds = []
    for seed in range(3):
        model = build("small_cnn", (1, 28, 28), seed=seed, init=init)
        with torch.no_grad():
            stds.append(float(model(torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(seed))).std()))
    assert all(low < std < high for std in stds), stds


def test_the_shipped_small_cnn_init_keeps_the_signal_on_28x28_images() -> None:
    """conf/backbone/small_cnn.yaml ships the init under which 2-class MNIST agents learn from round 1.

    With the earlier default (fan_out) `mhd-sim data=mnist` ended at 0.37 shared accuracy
    against 0.65 (docs/results.md, "Robustness grid"); this fails if the shipped default loses
    the forward signal again.
    """
    model = build("small_cnn", (1, 28, 28))  # conf/backbone/small_cnn.yaml as shipped
    with torch.no_grad():
        embedding = model(torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert float(embedding.std()) > 0.3
