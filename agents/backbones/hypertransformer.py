"""`hypertransformer`: a transformer writes the weights of a small CNN from the agent's support set.

HyperTransformer (Zhmoginov, Sandler, Vladymyrov, ICML 2022, arXiv 2201.04182): instead of
learning one fixed CNN, the agent learns a transformer that reads a labelled support set and
emits the CNN's conv kernels, one layer at a time. The support set is a set, so the transformer
sees it without positional encodings and every generated weight is invariant to its order.

Per generated layer l (channels C_in -> C_out):
    sample token i  = W_l [phi(x_i); psi_l(a_i^l)] + E_l[y_i]        # [S, dim]
    channel token k = P_l[k]                                          # [C_out, dim], learned
    kernel_k, scale_k, shift_k = decode_l(transformer_l(tokens)[S + k])
where phi is a shared image feature extractor, a^l the support images passed through layers
0..l-1 as already generated, psi_l a per-layer feature extractor of those activations, and E_l a
label embedding with one extra row for unlabelled samples (label -1). Concatenating features and
a one-hot label and projecting them equals adding a per-label vector to the projected features,
so the join is written as that sum. The paper also has a shared and a per-layer extractor.

Each layer of the generated CNN is conv3x3 -> norm -> ReLU -> maxpool (while the map is at least
MIN_DOWNSAMPLE_SIZE), and the embedding is the global average of the last layer. The norm uses
the support set's statistics of each conv output ("MetaBN" in Bronskill et al. 2020, TaskNorm):
with weights that change every step, running statistics would describe no particular CNN, and
batch statistics of the query would make a prediction depend on what else is in the batch.
Support statistics are the same in training and evaluation and leave each query sample on its own.
A conv bias before that norm would be cancelled by it, so each channel token emits the norm's
scale and shift instead, the place where a per-channel bias takes effect.

The MHD heads stay ordinary trained linear maps on the embedding (the paper generates its logits
layer too): every agent's classes are the dataset's global classes, so heads need no support set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.backbones.registry import BACKBONES, MIN_DOWNSAMPLE_SIZE, Backbone, positive_ints
from sim.core.errors import ConfigError

GENERATE = ("all", "last")  # which conv layers the transformer writes; the rest are trained convs
KERNEL = 3
NORM_EPS = 1e-5
PLACEHOLDER_STD = 1.0  # the scale of nn.Embedding rows, so placeholders and label rows start alike


@dataclass(frozen=True)
class LayerWeights:
    """One conv layer of the CNN as a support set made it; `kernel` is what a generator emitted."""

    kernel: Tensor  # [C_out, C_in, 3, 3]
    scale: Tensor  # [C_out] norm scale
    shift: Tensor  # [C_out] norm shift
    mean: Tensor  # [C_out] support mean of the conv output
    inv_std: Tensor  # [C_out] 1 / support std of the conv output

    def folded(self) -> tuple[Tensor, Tensor]:
        """The conv with its norm folded in: kernel [C_out, C_in, 3, 3], bias [C_out]."""
        gain = self.scale * self.inv_std  # [C_out]
        return self.kernel * gain.view(-1, 1, 1, 1).to(self.kernel.dtype), self.shift - self.mean * gain


class Block(nn.Module):
    """Pre-LN transformer block: self-attention over all tokens, then an MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        tokens, dim = x.shape  # [T, dim]
        q, k, v = self.qkv(self.norm1(x)).view(tokens, 3, self.heads, dim // self.heads).unbind(1)  # [T, h, d]
        attended = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        x = x + self.proj(attended.transpose(0, 1).reshape(tokens, dim))  # [T, dim]
        return x + self.mlp(self.norm2(x))  # [T, dim]


def activation_features(in_channels: int, feature_dim: int) -> nn.Sequential:
    """conv3x3-ReLU, then the global average: one feature vector per sample, any map size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, feature_dim, KERNEL, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class ConvSource(nn.Module):
    """Where a layer's kernel, norm scale and norm shift come from."""

    def forward(self, activations: Tensor, image_features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """activations [S, C_in, h, w], image_features [S, F], labels [S] (num_classes = unlabelled)."""
        raise NotImplementedError


class TrainedConv(ConvSource):
    """An ordinary conv layer (`generate: last` keeps all but the last one like this)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, KERNEL, padding=1, bias=False)
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.shift = nn.Parameter(torch.zeros(out_channels))

    def forward(self, activations: Tensor, image_features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.conv.weight, self.scale, self.shift


class GeneratedConv(ConvSource):
    """A transformer over support tokens and one placeholder per output channel writes the layer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        feature_dim: int,
        num_classes: int,
        dim: int,
        heads: int,
        depth: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation_features = activation_features(in_channels, feature_dim)  # psi_l
        self.embed_sample = nn.Linear(2 * feature_dim, dim)  # [phi(x); psi_l(a)] -> token
        self.embed_label = nn.Embedding(num_classes + 1, dim)  # last row: unlabelled
        self.placeholders = nn.Parameter(torch.randn(out_channels, dim) * PLACEHOLDER_STD)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        fan_in = in_channels * KERNEL * KERNEL
        self.decode = nn.Linear(dim, fan_in + 2)  # per channel: kernel, norm scale, norm shift
        # He-normal kernels and the identity norm at the start, as a trained conv would begin;
        # the norm removes a kernel's scale, so this only sets the size of the first gradients.
        nn.init.normal_(self.decode.weight[:fan_in], std=(2.0 / fan_in) ** 0.5 / dim**0.5)
        nn.init.zeros_(self.decode.weight[fan_in:])
        nn.init.zeros_(self.decode.bias)

    def forward(self, activations: Tensor, image_features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = torch.cat([image_features, self.activation_features(activations)], dim=1)  # [S, 2F]
        samples = self.embed_sample(features) + self.embed_label(labels)  # [S, dim]
        tokens = torch.cat([samples, self.placeholders.to(samples.dtype)])  # [S + C_out, dim]
        out = self.norm(self.blocks(tokens)[len(samples) :])  # [C_out, dim]: one readout per channel
        decoded = self.decode(out)  # [C_out, C_in * 9 + 2]
        kernel = decoded[:, :-2].reshape(self.out_channels, self.in_channels, KERNEL, KERNEL)
        return kernel, 1.0 + decoded[:, -2], decoded[:, -1]


def _normalize_relu_pool(conv_out: Tensor, weights: LayerWeights, pool: bool) -> Tensor:
    """conv output [B, C, h, w] -> support-normalized, scaled, shifted, ReLU, maybe 2x2 max-pooled."""
    gain = (weights.scale * weights.inv_std).view(1, -1, 1, 1)
    out = torch.relu((conv_out - weights.mean.view(1, -1, 1, 1)) * gain + weights.shift.view(1, -1, 1, 1))
    return F.max_pool2d(out, 2) if pool else out


@BACKBONES.register("hypertransformer")
class HyperTransformer(Backbone):
    """A CNN whose conv weights a transformer generates from the agent's labelled support set.

    Call `condition(support_x, support_y)` before `forward`. With gradients enabled every forward
    generates the weights afresh (the graph runs through the transformer); without gradients
    (evaluation, prediction) they are generated once per support set and parameter state.

    Args:
        input_shape: (C, H, W) of one image.
        channels: output channels of each conv layer; num_features = channels[-1].
        generate: "all" (the transformer writes every conv layer) or "last" (only the last;
            the earlier ones are ordinary trained convs).
        support_size: labelled samples the agent draws from its own shard for each condition().
        num_classes: label embedding rows (plus one for unlabelled); support labels must be
            in [0, num_classes) or -1.
        feature_dim: width of the image and activation features of each support sample.
        dim: transformer width.
        heads: attention heads; must divide dim.
        transformer_layers: blocks of each generated layer's transformer.
        mlp_dim: hidden width of each block's MLP.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        *,
        channels: Sequence[int],
        generate: str,
        support_size: int,
        num_classes: int,
        feature_dim: int,
        dim: int,
        heads: int,
        transformer_layers: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        widths = positive_ints("backbone.channels", channels)
        if generate not in GENERATE:
            raise ConfigError("backbone.generate", generate, f"one of {', '.join(GENERATE)}")
        (self.support_size,) = positive_ints("backbone.support_size", [support_size])
        (self.num_classes,) = positive_ints("backbone.num_classes", [num_classes])
        (feature_dim,) = positive_ints("backbone.feature_dim", [feature_dim])
        (dim,) = positive_ints("backbone.dim", [dim])
        (heads,) = positive_ints("backbone.heads", [heads])
        if dim % heads:
            raise ConfigError("backbone.heads", heads, f"must divide backbone.dim={dim}")
        (depth,) = positive_ints("backbone.transformer_layers", [transformer_layers])
        (mlp_dim,) = positive_ints("backbone.mlp_dim", [mlp_dim])

        in_channels, height, width = input_shape
        self.in_channels = in_channels
        # phi: shared image features of the support samples (the paper's shared feature extractor)
        self.image_features = nn.Sequential(
            nn.Conv2d(in_channels, feature_dim, KERNEL, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if min(height, width) >= MIN_DOWNSAMPLE_SIZE else nn.Identity(),
            activation_features(feature_dim, feature_dim),
        )
        self.layers = nn.ModuleList()
        self.pools: list[bool] = []  # per layer: 2x2 max-pool after it
        size = min(height, width)
        for index, out_channels in enumerate(widths):
            if generate == "all" or index == len(widths) - 1:
                self.layers.append(
                    GeneratedConv(
                        in_channels,
                        out_channels,
                        feature_dim=feature_dim,
                        num_classes=self.num_classes,
                        dim=dim,
                        heads=heads,
                        depth=depth,
                        mlp_dim=mlp_dim,
                    )
                )
            else:
                self.layers.append(TrainedConv(in_channels, out_channels))
            self.pools.append(size >= MIN_DOWNSAMPLE_SIZE)
            size = size // 2 if self.pools[-1] else size
            in_channels = out_channels
        self.num_features = widths[-1]
        self.init_convs()
        self._support: tuple[Tensor, Tensor] | None = None
        self._cache: tuple[tuple[int, ...], list[LayerWeights]] | None = None

    def condition(self, support_x: Tensor, support_y: Tensor) -> None:
        """Sets the support set ([S, C, H, W] images, [S] labels, -1 = unlabelled) later forwards read."""
        if support_x.dim() != 4 or support_x.shape[1] != self.in_channels or len(support_x) == 0:
            raise ValueError(f"support_x must be [S, {self.in_channels}, H, W] with S > 0, got {list(support_x.shape)}")
        if support_y.shape != support_x.shape[:1]:
            raise ValueError(f"support_y must be [{len(support_x)}] labels, got {list(support_y.shape)}")
        low, high = int(support_y.min()), int(support_y.max())
        if low < -1 or high >= self.num_classes:
            raise ConfigError(
                "backbone.num_classes",
                self.num_classes,
                f"support labels span {low}..{high}; set it to the dataset's class count (-1 = unlabelled)",
            )
        self._support = (support_x, support_y)
        self._cache = None

    def generate_layers(self) -> list[LayerWeights]:
        """Every conv layer's weights and support statistics, from the current support set.

        The support set runs through the CNN layer by layer: layer l is generated from the
        activations of layers 0..l-1 just generated, then its own output gives its statistics.
        """
        if self._support is None:
            raise RuntimeError("hypertransformer needs a support set: call condition(support_x, support_y) first")
        support_x, support_y = self._support
        labels = torch.where(support_y < 0, self.num_classes, support_y)  # [S], num_classes = unlabelled
        image_features = self.image_features(support_x)  # [S, F]
        activations = support_x  # [S, C_in, H, W]
        layers = []
        for source, pool in zip(self.layers, self.pools, strict=True):
            kernel, scale, shift = source(activations, image_features, labels)
            conv_out = F.conv2d(activations, kernel.to(activations.dtype), padding=1)  # [S, C_out, h, w]
            var, mean = torch.var_mean(conv_out.float(), dim=(0, 2, 3), correction=0)  # [C_out] each
            weights = LayerWeights(kernel, scale, shift, mean, torch.rsqrt(var + NORM_EPS))
            activations = _normalize_relu_pool(conv_out, weights, pool)  # [S, C_out, h', w']
            layers.append(weights)
        return layers

    def forward(self, x: Tensor) -> Tensor:
        for weights, pool in zip(self._current_layers(), self.pools, strict=True):
            kernel, bias = weights.folded()
            x = F.conv2d(x, kernel.to(x.dtype), bias.to(x.dtype), padding=1)  # [B, C_out, h, w], normalized
            x = F.max_pool2d(torch.relu(x), 2) if pool else torch.relu(x)
        # global average pool; mean (not .view) works in any memory format
        return x.mean(dim=(2, 3))  # [B, channels[-1]]

    def _current_layers(self) -> list[LayerWeights]:
        """Fresh weights when autograd records; without it, one generation per support set and parameters."""
        if torch.is_grad_enabled():
            return self.generate_layers()
        key = self._parameter_state()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.generate_layers())
        return self._cache[1]

    def _parameter_state(self) -> tuple[int, ...]:
        """Changes whenever a parameter does: an in-place write (optimizer step, load_state_dict)
        bumps a tensor's version counter, and moving a module gives its parameters new storage."""
        return tuple(
            item
            for param in self.parameters()
            for item in (param.data_ptr(), param._version)  # type: ignore[attr-defined]  # not in torch's stubs
        )
