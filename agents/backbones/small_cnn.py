"""`small_cnn`: a few conv stages and a linear embedding; the fast default.

Small enough that 8 agents train on sklearn digits in seconds on 2 CPU cores, so tests and
the default simulation do not wait on the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from agents.backbones.registry import (
    BACKBONES,
    MIN_DOWNSAMPLE_SIZE,
    Backbone,
    positive_ints,
)
from sim.core.errors import ConfigError

INITS = ("fan_out", "fan_in")
"""Weight inits of `small_cnn` (its `init` option)."""


@BACKBONES.register("small_cnn")
class SmallCNN(Backbone):
    """Stages of conv3x3-ReLU-maxpool, global average pool, then Linear-ReLU to the embedding.

    A stage skips its maxpool once the map is smaller than MIN_DOWNSAMPLE_SIZE, so the same
    config works for 8x8, 28x28 and 32x32 inputs.

    Args:
        input_shape: (C, H, W) of one image.
        channels: output channels of each conv stage, e.g. [32, 64].
        embedding_dim: width of the embedding the heads read (= num_features).
        init: `fan_out`: He-normal convs scaled by fan-out (the ResNets' init, `init_convs`);
            `fan_in`: He-normal convs and embedding scaled by fan-in, which keeps the forward
            signal's variance through this net without batch norm. With fan_out a 1-channel
            28x28 input reaches the embedding with std ~0.07 instead of ~0.4, and agents with
            2-class MNIST shards sat at the chance loss (ln 2) for 8+ rounds (docs/results.md,
            "Robustness grid").
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        *,
        channels: Sequence[int],
        embedding_dim: int,
        init: str,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        size = min(height, width)
        layers: list[nn.Module] = []
        for out_channels in positive_ints("backbone.channels", channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            if size >= MIN_DOWNSAMPLE_SIZE:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        (self.num_features,) = positive_ints("backbone.embedding_dim", [embedding_dim])
        self.embed = nn.Linear(in_channels, self.num_features)
        if init not in INITS:
            raise ConfigError("backbone.init", init, f"one of {', '.join(INITS)}")
        if init == "fan_out":
            self.init_convs()
        else:
            for module in (*self.features, self.embed):
                if isinstance(module, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # [B, channels[-1], h, w]
        # global average pool; mean (not .view) works in any memory format
        x = x.mean(dim=(2, 3))  # [B, channels[-1]]
        return torch.relu(self.embed(x))  # [B, embedding_dim]
