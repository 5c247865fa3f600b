"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2): 6n+2 layers in 3 stages of n BasicBlocks.

The stem is a single conv3x3 (no 7x7 conv or maxpool), sized for 32x32 images rather than
ImageNet. Where a block changes shape, its shortcut is a 1x1 conv + norm projection (the
paper's option B) rather than option A's zero-padded identity: it is simpler to write, works
with any widths, and costs few parameters at these sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from agents.backbones.registry import (
    BACKBONES,
    MIN_DOWNSAMPLE_SIZE,
    Backbone,
    positive_ints,
)
from sim.core.errors import ConfigError
from sim.core.registry import Registry

NORMS: Registry[Callable[[int], nn.Module]] = Registry("backbone.norm")

# Upper bound on GroupNorm groups; gcd(channels, 8) always divides the channel count and
# gives 8 groups for the default widths 16/32/64.
MAX_GROUPS = 8


@NORMS.register("batch")
def batch_norm(channels: int) -> nn.Module:
    """BatchNorm, the paper's choice; its running statistics assume every agent sees similar data."""
    return nn.BatchNorm2d(channels)


@NORMS.register("group")
def group_norm(channels: int) -> nn.Module:
    """GroupNorm has no running statistics, so non-IID agents and eval mode see the same norm.

    Hsieh et al. 2020 ("The Non-IID Data Quagmire") recommend it for decentralized learning.
    """
    return nn.GroupNorm(math.gcd(channels, MAX_GROUPS), channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """A padded 3x3 conv without bias (the norm after it has one)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm, plus the shortcut, then ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.norm1 = norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.norm2 = norm(out_channels)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm(out_channels),
            )
            if reshapes
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))  # [B, out, H/stride, W/stride]
        out = self.norm2(self.conv2(out))  # [B, out, H/stride, W/stride]
        return torch.relu(out + self.shortcut(x))


class ResNet(Backbone):
    """Stem, one stage of `blocks_per_stage` BasicBlocks per width, global average pool.

    Every stage after the first halves the map with a stride-2 first block, unless the map is
    already smaller than MIN_DOWNSAMPLE_SIZE (8x8 digits: 8 -> 4 -> 2).

    Args:
        input_shape: (C, H, W) of one image.
        widths: channels of each stage, e.g. [16, 32, 64]; num_features = widths[-1].
        blocks_per_stage: n, the BasicBlocks in each stage.
        norm: a name in NORMS ("batch" or "group").
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        *,
        widths: Sequence[int],
        blocks_per_stage: int,
        norm: str,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        make_norm = NORMS.get(norm)
        widths = positive_ints("backbone.widths", widths)
        (n,) = positive_ints("backbone.blocks_per_stage", [blocks_per_stage])
        self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), make_norm(widths[0]), nn.ReLU())
        size = min(height, width)
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, stage_width in enumerate(widths):
            stride = 2 if stage > 0 and size >= MIN_DOWNSAMPLE_SIZE else 1
            # ceil: a padded stride-2 conv3x3 keeps the odd row and column
            size = -(-size // stride)
            for block in range(n):
                blocks.append(BasicBlock(channels, stage_width, stride if block == 0 else 1, make_norm))
                channels = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = channels
        self.init_convs()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # [B, widths[0], H, W]
        x = self.blocks(x)  # [B, widths[-1], h, w]
        # global average pool; mean (not .view) works in any memory format
        return x.mean(dim=(2, 3))  # [B, widths[-1]]


def cifar_resnet(
    depth: int,
    input_shape: tuple[int, int, int],
    widths: Sequence[int],
    blocks_per_stage: int,
    norm: str,
) -> ResNet:
    """A 3-stage ResNet of `depth` = 6n+2 layers; the YAML's params must agree with the name.

    `blocks_per_stage` stays in the YAML so a config dump shows the whole architecture; it is
    checked here so that "resnet8" never silently builds a deeper net.
    """
    if len(widths) != 3:
        raise ConfigError("backbone.widths", list(widths), f"resnet{depth} has 3 stages")
    if blocks_per_stage != (depth - 2) // 6:
        allowed = f"resnet{depth} has 6n+2={depth} layers, so n={(depth - 2) // 6}"
        raise ConfigError("backbone.blocks_per_stage", blocks_per_stage, allowed)
    return ResNet(input_shape, widths=widths, blocks_per_stage=blocks_per_stage, norm=norm)


@BACKBONES.register("resnet8")
def resnet8(
    input_shape: tuple[int, int, int],
    *,
    widths: Sequence[int],
    blocks_per_stage: int,
    norm: str,
) -> ResNet:
    """ResNet-8 (n=1): the cheapest residual net, for CIFAR runs on CPU."""
    return cifar_resnet(8, input_shape, widths, blocks_per_stage, norm)


@BACKBONES.register("resnet20")
def resnet20(
    input_shape: tuple[int, int, int],
    *,
    widths: Sequence[int],
    blocks_per_stage: int,
    norm: str,
) -> ResNet:
    """ResNet-20 (n=3): the paper's smallest CIFAR-10 net (0.27M params, 8.75% error)."""
    return cifar_resnet(20, input_shape, widths, blocks_per_stage, norm)
