"""The backbone registry, the `Backbone` base class and `build_backbone`.

A backbone maps an image batch to an embedding; it carries no heads. The multi-head wrapper
reads `num_features` to size its main and auxiliary heads, so any registered backbone can be
paired with any number of heads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from sim.core.errors import ConfigError
from sim.core.registry import Registry

# Halving a 4x4 map leaves 2x2, the smallest map that still has spatial structure; smaller
# maps (e.g. from 8x8 sklearn digits) skip the downsampling instead of pooling to nothing.
MIN_DOWNSAMPLE_SIZE = 4


class Backbone(nn.Module):
    """An image -> embedding network: forward([B, C, H, W]) -> [B, num_features]."""

    num_features: int
    per_head: bool = False
    """True: forward returns one embedding per model head, [heads, B, num_features] (e.g. a
    modular ResNet whose heads each mix the shared blocks their own way). Such a builder takes
    `model_heads`, the number of heads of the model it serves."""
    support_size: int = 0
    """> 0: forward reads a labelled support set of this many samples from the agent's own shard,
    given by `condition` before the forward (a HyperTransformer generates its weights from it).
    The Agent draws it; it never leaves the agent."""

    def condition(self, support_x: Tensor, support_y: Tensor) -> None:
        """Sets the support set ([S, C, H, W] images, [S] labels, -1 = unlabelled) later forwards read."""
        raise TypeError(f"{type(self).__name__} reads no support set (support_size is 0)")

    def init_convs(self) -> None:
        """He (Kaiming) normal init for every conv, the init the ReLU nets here assume.

        fan_out keeps the backward signal's variance constant, as in the ResNet paper.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


MODEL_HEADS = "model_heads"  # the builder parameter that receives the model's head count

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


def build_backbone(name: str, input_shape: tuple[int, int, int], model_heads: int = 1, **params: object) -> Backbone:
    """Builds backbone `name` for images of `input_shape` (C, H, W).

    Args:
        name: a registered backbone, e.g. "small_cnn" or "resnet20".
        input_shape: (channels, height, width) of one image; backbones adapt their
            downsampling to it.
        model_heads: heads of the model the backbone serves; passed only to builders that
            declare a `model_heads` parameter (per-head backbones).
        **params: conf/backbone/NAME.yaml without its `name` key. Builders have no defaults,
            so every tunable value is visible in the config.

    Raises:
        ConfigError: unknown name, or a missing, unknown or invalid param (`backbone.KEY`).
    """
    builder = BACKBONES.get(name)
    check_param_names(name, builder, params)
    if MODEL_HEADS in inspect.signature(builder).parameters:
        return builder(input_shape, model_heads, **params)
    return builder(input_shape, **params)


def check_param_names(name: str, builder: Callable[..., Backbone], params: dict[str, object]) -> None:
    """Turns a missing or unknown param into a ConfigError; a TypeError would not name the key."""
    expected = {p.name for p in inspect.signature(builder).parameters.values() if p.kind is p.KEYWORD_ONLY}
    missing = sorted(expected - params.keys())
    if missing:
        raise ConfigError(
            f"backbone.{missing[0]}",
            None,
            f"missing; set it in conf/backbone/{name}.yaml",
        )
    unknown = sorted(params.keys() - expected)
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"backbone.{key}",
            params[key],
            f"{name} takes {', '.join(sorted(expected))}",
        )


def positive_ints(key: str, values: Sequence[int]) -> tuple[int, ...]:
    """`values` as a tuple, or a ConfigError naming `key` unless it is non-empty and all > 0."""
    ok = len(values) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        raise ConfigError(key, list(values), "must be one or more positive integers")
    return tuple(values)
