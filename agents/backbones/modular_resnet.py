"""`modular_resnet`: an isometric ResNet whose layers are learned mixtures of a few block templates.

After the stem, every layer has the same width and resolution, so every residual block has the
same shape and any block can sit at any depth. The blocks' conv weights therefore live in one
bank of `num_templates` templates, and layer position l uses the softmax mixture p[l] over them
(soft parameter sharing, Savarese & Maire 2019, "Learning Implicitly Recurrent CNNs Through
Parameter Sharing"). Depth may exceed the number of templates: a template is then reused, and
the learned mixtures (`mixture_table`) show which template serves which position, in what order.

Two ways to combine the templates at a position (`mixing`):
- `weight`: W_l = sum_t p[l, t] W_t, then one block runs: the cost of a plain ResNet of `depth`.
- `output`: every template's block runs and the outputs are summed with weights p[l, t]: the
  cost of `num_templates` blocks per position, but a mixture of functions rather than weights.
For a one-hot mixture the two are the same network (tests/test_backbone_modular_resnet.py).

Norm layers are not part of the templates: each position owns its norms, as in Savarese & Maire.
A reused template sees a different input distribution at each position, so shared batch-norm
statistics would fit none of them. In `output` mode each (position, template) path owns its norm,
so a one-hot output mixture is exactly the weight-mixed block.

`per_head_mixtures`: each model head owns a mixture over the shared templates (and its own norms),
so the heads read differently composed networks built from one bank. All heads run in one pass:
their channels are stacked, [B, heads * width, h, w], and every conv is a grouped conv.

`freeze_templates` (transfer mode): the template bank gets requires_grad False; the mixtures, the
per-position norms (small "model patches", Mudrakarta et al. 2019) and the stem still train, the
stem because a new input domain needs its own first layer. The heads (MultiHeadModel) always train.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.backbones.registry import BACKBONES, Backbone, positive_ints
from agents.backbones.resnet import MAX_GROUPS, conv3x3
from sim.core.errors import ConfigError
from sim.core.registry import Registry

# A norm over `paths` stacked copies of `width` channels that never mixes statistics across copies.
PATH_NORMS: Registry[Callable[[int, int], nn.Module]] = Registry("backbone.norm")


@PATH_NORMS.register("batch")
def path_batch_norm(paths: int, width: int) -> nn.Module:
    """BatchNorm is per channel, so stacked paths already keep separate statistics."""
    return nn.BatchNorm2d(paths * width)


@PATH_NORMS.register("group")
def path_group_norm(paths: int, width: int) -> nn.Module:
    """GroupNorm with gcd(width, 8) groups per path: groups are contiguous, so none spans two paths."""
    return nn.GroupNorm(paths * math.gcd(width, MAX_GROUPS), paths * width)


class TemplateBank(nn.Module):
    """The conv weights of `num_templates` residual blocks (conv3x3 -> conv3x3), stacked.

    Only weights: the norms belong to the layer positions (see the module docstring). Stored as
    4-D [T*C, C, 3, 3] conv weights, not [T, C, C, 3, 3], so `Module.to(memory_format=
    torch.channels_last)` treats them like any conv weight.
    """

    def __init__(self, num_templates: int, width: int) -> None:
        super().__init__()
        self.num_templates = num_templates
        # He normal, fan_out, per template: the init the ResNets here use for every conv.
        std = math.sqrt(2.0 / (width * 9))
        self.conv1 = nn.Parameter(torch.randn(num_templates * width, width, 3, 3) * std)  # [T*C, C, 3, 3]
        self.conv2 = nn.Parameter(torch.randn(num_templates * width, width, 3, 3) * std)  # [T*C, C, 3, 3]

    def mixed(self, weight: Tensor, probs: Tensor) -> Tensor:
        """sum_t probs[p, t] * template t of `weight`, per path p: [P*C, C, 3, 3] for a grouped conv."""
        templates = weight.unflatten(0, (self.num_templates, -1))  # [T, C, C, 3, 3]
        return torch.einsum("pt,tocij->pocij", probs, templates).flatten(0, 1)  # [P*C, C, 3, 3]


class MixedLayer(nn.Module):
    """One layer position: its own norms; its conv weights come from the bank, combined by `probs`.

    Input and output are [B, paths * width, h, w]: one residual stream per path (per head when
    `per_head_mixtures`, else a single path).
    """

    def __init__(self, width: int, paths: int, num_templates: int, norm: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(self.norm_paths(paths, num_templates), width)
        self.norm2 = norm(self.norm_paths(paths, num_templates), width)

    @staticmethod
    def norm_paths(paths: int, num_templates: int) -> int:
        """How many separately normalised copies of `width` channels a conv output holds."""
        raise NotImplementedError

    def forward(self, x: Tensor, probs: Tensor, bank: TemplateBank) -> Tensor:
        raise NotImplementedError


MIXINGS: Registry[type[MixedLayer]] = Registry("backbone.mixing")


@MIXINGS.register("weight")
class WeightMixedLayer(MixedLayer):
    """Mixes the templates' weights, W = sum_t p_t W_t, then runs one block per path."""

    @staticmethod
    def norm_paths(paths: int, num_templates: int) -> int:
        return paths

    def forward(self, x: Tensor, probs: Tensor, bank: TemplateBank) -> Tensor:
        paths = probs.shape[0]  # probs: [P, T]
        out = F.conv2d(x, bank.mixed(bank.conv1, probs), padding=1, groups=paths)  # [B, P*C, h, w]
        out = torch.relu(self.norm1(out))
        out = self.norm2(F.conv2d(out, bank.mixed(bank.conv2, probs), padding=1, groups=paths))  # [B, P*C, h, w]
        return torch.relu(x + out)


@MIXINGS.register("output")
class OutputMixedLayer(MixedLayer):
    """Runs every template's block on each path and sums the block outputs with weights p_t.

    All P*T blocks run as one grouped conv pair; each (path, template) has its own norm.
    """

    @staticmethod
    def norm_paths(paths: int, num_templates: int) -> int:
        return paths * num_templates

    def forward(self, x: Tensor, probs: Tensor, bank: TemplateBank) -> Tensor:
        paths, templates = probs.shape  # probs: [P, T]
        width = bank.conv1.shape[1]
        # each path's input feeds all T templates: P groups of T*C output channels
        conv1 = bank.conv1.repeat(paths, 1, 1, 1)  # [P*T*C, C, 3, 3]
        conv2 = bank.conv2.repeat(paths, 1, 1, 1)  # [P*T*C, C, 3, 3]
        out = torch.relu(self.norm1(F.conv2d(x, conv1, padding=1, groups=paths)))  # [B, P*T*C, h, w]
        out = self.norm2(F.conv2d(out, conv2, padding=1, groups=paths * templates))  # [B, P*T*C, h, w]
        blocks = torch.relu(x.unflatten(1, (paths, 1, width)) + out.unflatten(1, (paths, templates, width)))
        mixed = (probs[None, :, :, None, None, None] * blocks).sum(dim=2)  # [B, P, C, h, w]
        return mixed.flatten(1, 2)  # [B, P*C, h, w]


def flag(key: str, value: object) -> bool:
    """`value` if it is a bool, else a ConfigError naming `key` (a YAML "yes" string is not a flag)."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false")
    return value


@BACKBONES.register("modular_resnet")
class ModularResNet(Backbone):
    """Stem, then `depth` template-mixed residual blocks at constant width and resolution, then pool.

    The stem is conv3x3-norm-ReLU followed by 2x2 max-pools until the map is at most
    `max_resolution` (8: 28x28 -> 7x7, 32x32 -> 8x8, 8x8 digits keep their size), so the
    isometric part stays cheap on CPU.

    Args:
        input_shape: (C, H, W) of one image.
        model_heads: heads of the model served; the number of mixtures when per_head_mixtures.
        width: channels of every block; num_features = width.
        depth: layer positions (blocks); may exceed num_templates (templates are then reused).
        num_templates: residual block templates in the shared bank.
        mixing: "weight" (mix parameters, run one block) or "output" (run all, mix outputs).
        per_head_mixtures: each model head owns its mixture; forward returns [heads, B, width].
        freeze_templates: transfer mode; the bank does not train (mixtures, norms and stem do).
        norm: "batch" or "group", as in resnet.py.
        max_resolution: the stem pools until height and width are at most this.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        model_heads: int,
        *,
        width: int,
        depth: int,
        num_templates: int,
        mixing: str,
        per_head_mixtures: bool,
        freeze_templates: bool,
        norm: str,
        max_resolution: int,
    ) -> None:
        super().__init__()
        in_channels, height, image_width = input_shape
        (width,) = positive_ints("backbone.width", [width])
        (depth,) = positive_ints("backbone.depth", [depth])
        (num_templates,) = positive_ints("backbone.num_templates", [num_templates])
        (max_resolution,) = positive_ints("backbone.max_resolution", [max_resolution])
        layer_class = MIXINGS.get(mixing)
        make_norm = PATH_NORMS.get(norm)
        self.per_head = flag("backbone.per_head_mixtures", per_head_mixtures)
        self.paths = model_heads if self.per_head else 1

        stem: list[nn.Module] = [conv3x3(in_channels, width), make_norm(1, width), nn.ReLU()]
        size = max(height, image_width)
        while size > max_resolution:
            stem.append(nn.MaxPool2d(2, ceil_mode=True))
            size = -(-size // 2)  # ceil: an odd row or column is kept
        self.stem = nn.Sequential(*stem)
        self.templates = TemplateBank(num_templates, width)
        # zeros: every position starts from the uniform mixture, and the heads from the same one
        self.mixture_logits = nn.Parameter(torch.zeros(self.paths, depth, num_templates))  # [P, depth, T]
        self.layers = nn.ModuleList(layer_class(width, self.paths, num_templates, make_norm) for _ in range(depth))
        self.templates.requires_grad_(not flag("backbone.freeze_templates", freeze_templates))
        self.num_features = width
        self.init_convs()

    def mixture_table(self) -> Tensor:
        """The learned mixtures: [depth, templates], or [heads, depth, templates] per head; rows sum to 1.

        Row l is the weight of each template at position l, so the argmax down the rows reads as
        the learned order of blocks (and which templates are reused where).
        """
        probs = self.mixture_logits.detach().softmax(dim=-1)  # [P, depth, T]
        return probs if self.per_head else probs[0]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # [B, C, h, w]
        if self.paths > 1:
            x = x.repeat(1, self.paths, 1, 1)  # [B, P*C, h, w]: every head's stream starts at the stem
        probs = self.mixture_logits.softmax(dim=-1)  # [P, depth, T]
        for position, layer in enumerate(self.layers):
            x = layer(x, probs[:, position], self.templates)  # [B, P*C, h, w]
        # global average pool; mean (not .view) works in any memory format
        x = x.mean(dim=(2, 3))  # [B, P*C]
        if not self.per_head:
            return x  # [B, C]
        return x.unflatten(1, (self.paths, self.num_features)).transpose(0, 1)  # [P, B, C]
