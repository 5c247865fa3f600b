"""The multi-head model: backbone -> embedding -> 1 main head + H auxiliary heads.

All heads read the same embedding, so they are stored as one linear layer producing
`heads * classes` outputs: one matmul serves every head (cheaper than H+1 small ones), and
the result is viewed as [heads, batch, classes].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from agents.backbones import build_backbone


@dataclass(frozen=True)
class ModelConfig:
    backbone: str  # registry name in agents.backbones
    backbone_params: dict[str, Any] = field(hash=False)  # builder kwargs from conf/backbone
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int  # logits per head
    aux_heads: int  # H; 0 is the single-head ablation
    embedding_projection: int | None = None  # width of P_i for embedding distillation; None: off


def head_names(num_heads: int) -> list[str]:
    """Names used in metrics and summaries: main, aux1, aux2, ..."""
    return ["main"] + [f"aux{k}" for k in range(1, num_heads)]


class MultiHeadModel(nn.Module):
    """Backbone plus 1 + H linear heads and an optional embedding projection P_i."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = 1 + config.aux_heads
        self.num_classes = config.num_classes
        self.backbone = build_backbone(config.backbone, config.input_shape, self.num_heads, **config.backbone_params)
        width = int(self.backbone.num_features)
        self.heads = nn.Linear(width, self.num_heads * config.num_classes)
        self.projection: nn.Module | None = None
        if config.embedding_projection is not None:
            same_width = config.embedding_projection == width
            self.projection = nn.Identity() if same_width else nn.Linear(width, config.embedding_projection)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [heads, B, classes], the main head's embedding [B, features])."""
        embedding = self.backbone(x)  # [B, D], or [heads, B, D] for a per-head backbone
        if self.backbone.per_head:
            return self._per_head_logits(embedding), embedding[0]
        logits = self.heads(embedding)  # [B, heads * classes]
        logits = logits.view(-1, self.num_heads, self.num_classes).transpose(0, 1)  # [heads, B, C]
        return logits, embedding

    def _per_head_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Head k applied to embedding k: the fused weight viewed per head, one batched matmul."""
        weight = self.heads.weight.view(self.num_heads, self.num_classes, -1)  # [heads, C, D]
        bias = self.heads.bias.view(self.num_heads, 1, self.num_classes)  # [heads, 1, C]
        return torch.baddbmm(bias, embeddings, weight.transpose(1, 2))  # [heads, B, C]

    def head_rows(self, head: int) -> dict[str, slice]:
        """The rows of the fused head parameters that head `head`'s logits read, by parameter name.

        Both forward paths view the fused layer's outputs as [heads, classes] (head-major), so
        head h's logits are outputs h*C .. (h+1)*C - 1 and depend on those rows of the weight and
        bias and on no other: a loss on one head has a structurally zero gradient in the rest
        (agents/privacy.py adds no DP noise there).
        """
        rows = slice(head * self.num_classes, (head + 1) * self.num_classes)
        return {"heads.weight": rows, "heads.bias": rows}

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """P_i(e): the embedding in the shared width used for embedding distillation."""
        if self.projection is None:
            raise RuntimeError("embedding distillation is off: no projection was built")
        return self.projection(embedding)
