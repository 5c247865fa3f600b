"""Backbones: the image -> embedding half of an agent's model.

The heads are not here: the multi-head wrapper puts a main and H auxiliary linear heads on
`num_features`. Importing this package registers every backbone in BACKBONES.
"""

from agents.backbones import hypertransformer, memory_vit, modular_resnet, resnet, small_cnn  # noqa: F401  (importing registers them)
from agents.backbones.registry import BACKBONES, Backbone, build_backbone

__all__ = ["BACKBONES", "Backbone", "build_backbone"]
