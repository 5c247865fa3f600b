"""`memory_vit`: a ViT with learnable memory tokens per layer (Sandler et al., CVPR 2022,
"Fine-tuning Image Transformers using Learnable Memory").

The encoder is a plain pre-LN ViT: patch embedding, a class token, learned position embeddings,
`depth` blocks, a final LayerNorm; the embedding is the class token's output. Each block also
receives m learnable memory tokens: they pass through the block's LayerNorm and key/value
projections and are attended to, but are never queries, so they are dropped after the layer and
every layer gets fresh ones.

`mode: full` trains all of it. `mode: memory` freezes that encoder (the base) and adds one adapter:
a new class token (initialised from the base's) plus m new memory tokens per layer; only the
adapter trains (and the heads, which live in MultiHeadModel). An attention mask keeps the base
tokens (base class token, patches) from attending to any adapter token, so the base model's own
output is unchanged, and lets the adapter's class token attend to the base tokens, itself and its
own memory only. Because no adapter can see another, several adapters fine-tuned independently on
one base run in one forward pass (`merge_adapters`) and each gets exactly its lone output.

The base for memory mode comes from `base_checkpoint`, a state_dict of a full-mode memory_vit with
the same sizes (an agent checkpoint file `agent_XXXXX.pt` also works); it keeps the memory tokens
it was trained with, and `memory_tokens` sets the adapter's. With `base_checkpoint: null` the base
is a plain ViT (no memory) drawn from the fixed seed BASE_SEED, not the agent's seed: every agent
then holds the same base, which is what lets their adapters be merged.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.backbones.registry import BACKBONES, Backbone, positive_ints
from sim.core.errors import ConfigError

MODES = ("full", "memory")
BASE_SEED = 0  # memory mode without a checkpoint: the one random base every agent shares
CHECKPOINT_KEY = "backbone.base_checkpoint"
INIT_STD = 0.02  # N(0, 0.02) for tokens, position embeddings and linear weights (ViT's init)


class Attention(nn.Module):
    """Multi-head self-attention whose keys and values also include extra (memory) tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, memory: Tensor | None, mask: Tensor | None) -> Tensor:
        batch, tokens, dim = x.shape  # x: [B, T, D]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if memory is not None:  # [M, D]: keys and values only, shared by the whole batch
            kv_weight, kv_bias = self.qkv.weight[dim:], self.qkv.bias[dim:]  # the K and V rows
            mk, mv = F.linear(memory, kv_weight, kv_bias).view(-1, 2, self.heads, dim // self.heads).permute(1, 2, 0, 3)
            k = torch.cat([k, mk.expand(batch, -1, -1, -1)], dim=2)  # [B, heads, T+M, hd]
            v = torch.cat([v, mv.expand(batch, -1, -1, -1)], dim=2)  # [B, heads, T+M, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, T, hd]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))  # [B, T, D]


class Block(nn.Module):
    """Pre-LN transformer block; memory tokens go through the same LayerNorm as the tokens."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, memory: Tensor | None, mask: Tensor | None) -> Tensor:
        memory = None if memory is None else self.norm1(memory)  # [M, D]
        x = x + self.attn(self.norm1(x), memory, mask)  # [B, T, D]
        return x + self.mlp(self.norm2(x))  # [B, T, D]


class Adapter(nn.Module):
    """What memory fine-tuning adds to a frozen base: a class token and m memory tokens per layer."""

    def __init__(self, base_class_token: Tensor, depth: int, memory_tokens: int) -> None:
        super().__init__()
        # starts as the base's class token, so a fresh adapter's output differs only by its memory
        self.class_token = nn.Parameter(base_class_token.detach().clone())  # [1, D]
        dim = base_class_token.shape[-1]
        self.memory = new_memory(depth, memory_tokens, dim)  # [depth, m, D] or None


def new_memory(depth: int, memory_tokens: int, dim: int) -> nn.Parameter | None:
    """m memory tokens per layer, N(0, 0.02); None for m = 0 (a zero-size tensor gets no gradient)."""
    if memory_tokens == 0:
        return None
    return nn.Parameter(torch.randn(depth, memory_tokens, dim) * INIT_STD)  # [depth, m, D]


def adapter_mask(base_tokens: int, base_memory: int, adapter_memory: Sequence[int]) -> Tensor:
    """Who may attend to whom when adapters' class tokens and memories join a base's tokens.

    Queries are [base tokens, adapter class tokens]; keys are the queries followed by
    [base memory, adapter 1 memory, ..., adapter A memory]. Base tokens see base tokens and base
    memory only (so the base output is unchanged); adapter a's class token also sees itself and
    its own memory, never another adapter's tokens. True = may attend.

    Returns:
        [T, T + M] bool, T = base_tokens + A, M = base_memory + sum(adapter_memory).
    """
    queries = base_tokens + len(adapter_memory)
    mask = torch.zeros(queries, queries + base_memory + sum(adapter_memory), dtype=torch.bool)
    mask[:, :base_tokens] = True
    mask[:, queries : queries + base_memory] = True
    start = queries + base_memory
    for index, size in enumerate(adapter_memory):
        row = base_tokens + index
        mask[row, row] = True
        mask[row, start : start + size] = True
        start += size
    return mask


class ViTEncoder(nn.Module):
    """The base ViT with its own memory: image -> normalised class-token outputs."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        memory_tokens: int,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        # the class token carries its own position, so only patches get a position embedding
        self.class_token = nn.Parameter(torch.randn(1, dim) * INIT_STD)  # [1, D]
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, dim) * INIT_STD)  # [1, N, D]
        self.memory = new_memory(depth, memory_tokens, dim)  # [depth, m, D] or None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, adapters: Sequence[Adapter] = ()) -> Tensor:
        """Class-token embeddings: [1 + A, B, D], row 0 the base's, row 1 + a adapter a's."""
        patches = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, N, D]
        batch = patches.shape[0]
        tokens = torch.cat([self.class_token.expand(batch, 1, -1), patches], dim=1)  # [B, 1+N, D]
        if adapters:
            extra = torch.cat([adapter.class_token for adapter in adapters]).expand(batch, -1, -1)  # [B, A, D]
            tokens = torch.cat([tokens, extra], dim=1)  # [B, 1+N+A, D]
        memories = [self.memory] + [adapter.memory for adapter in adapters]
        # without adapters every token sees every memory token: no mask, the fast attention path
        mask = None
        if adapters:
            sizes = [0 if memory is None else memory.shape[1] for memory in memories]
            mask = adapter_mask(1 + self.num_patches, sizes[0], sizes[1:]).to(x.device)  # [T, T+M]
        for layer, block in enumerate(self.blocks):
            present = [memory[layer] for memory in memories if memory is not None]
            tokens = block(tokens, torch.cat(present) if present else None, mask)  # [B, T, D]
        outputs = torch.cat([tokens[:, :1], tokens[:, 1 + self.num_patches :]], dim=1)  # [B, 1+A, D]
        return self.norm(outputs).transpose(0, 1)  # [1+A, B, D]


def read_base(path: str) -> dict[str, Tensor]:
    """The encoder weights in a full-mode memory_vit checkpoint file.

    Accepts a MemoryViT state_dict (keys `encoder.*`), a MultiHeadModel one (`backbone.encoder.*`)
    or an agent checkpoint file (the model's state_dict under "model").
    """
    if not Path(path).is_file():
        raise ConfigError(CHECKPOINT_KEY, path, "no such file; give a state_dict of a full-mode memory_vit, or null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise ConfigError(CHECKPOINT_KEY, path, f"not a torch state_dict file ({error})") from None
    state = state.get("model", state) if isinstance(state, dict) else {}
    prefixes = ("encoder.", "backbone.encoder.")
    return {name.split("encoder.", 1)[1]: value for name, value in state.items() if name.startswith(prefixes)}


def load_base(encoder: ViTEncoder, weights: dict[str, Tensor], path: str) -> None:
    """`encoder.load_state_dict(weights)`, with a mismatch reported as a one-line ConfigError."""
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as error:
        lines = str(error).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ConfigError(CHECKPOINT_KEY, path, f"not a memory_vit of this config's sizes ({detail})") from None


@BACKBONES.register("memory_vit")
class MemoryViT(Backbone):
    """The memory ViT backbone: the base encoder's class token (full) or one adapter's (memory).

    Args:
        input_shape: (C, H, W) of one image; patch_size must divide H and W.
        patch_size: side of the square patches (4 fits 8x8, 28x28 and 32x32 images).
        dim: token width; num_features = dim.
        depth: transformer blocks.
        heads: attention heads; must divide dim.
        mlp_ratio: hidden width of each block's MLP, in multiples of dim.
        memory_tokens: m, learnable memory tokens per layer: the model's own in full mode (0: a
            plain ViT), the adapter's in memory mode (the base keeps the memory its checkpoint has).
        mode: "full" trains everything; "memory" freezes the base and trains one adapter.
        base_checkpoint: state_dict file the encoder starts from (either mode); null: random init,
            the agent's seed in full mode, the fixed BASE_SEED in memory mode.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        *,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        memory_tokens: int,
        mode: str,
        base_checkpoint: str | None,
    ) -> None:
        super().__init__()
        _, height, width = input_shape
        (patch_size,) = positive_ints("backbone.patch_size", [patch_size])
        (dim,) = positive_ints("backbone.dim", [dim])
        (depth,) = positive_ints("backbone.depth", [depth])
        (heads,) = positive_ints("backbone.heads", [heads])
        (mlp_ratio,) = positive_ints("backbone.mlp_ratio", [mlp_ratio])
        if height % patch_size or width % patch_size:
            raise ConfigError("backbone.patch_size", patch_size, f"must divide the {height}x{width} images")
        if dim % heads:
            raise ConfigError("backbone.heads", heads, f"must divide backbone.dim={dim}")
        if not isinstance(memory_tokens, int) or isinstance(memory_tokens, bool) or memory_tokens < 0:
            raise ConfigError("backbone.memory_tokens", memory_tokens, "must be an integer >= 0")
        if mode not in MODES:
            raise ConfigError("backbone.mode", mode, f"one of {', '.join(MODES)}")
        weights = None if base_checkpoint is None else read_base(str(base_checkpoint))
        sizes = (input_shape, patch_size, dim, depth, heads, mlp_ratio)
        if mode == "memory":
            # the base keeps the memory its checkpoint has; the null base is a plain ViT
            base_memory = 0 if weights is None or "memory" not in weights else weights["memory"].shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(BASE_SEED)
                self.encoder = ViTEncoder(*sizes, base_memory)
        else:
            self.encoder = ViTEncoder(*sizes, memory_tokens)
        if weights is not None:
            load_base(self.encoder, weights, str(base_checkpoint))
        self.adapter: Adapter | None = None
        if mode == "memory":
            self.encoder.requires_grad_(False)
            self.adapter = Adapter(self.encoder.class_token, depth, memory_tokens)
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        if self.adapter is None:
            return self.encoder(x)[0]  # [B, D]
        return self.encoder(x, [self.adapter])[1]  # [B, D]


class MergedMemoryViT(nn.Module):
    """One base and several adapters in one forward pass (see `merge_adapters`)."""

    def __init__(self, encoder: ViTEncoder, adapters: Sequence[Adapter]) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapters = nn.ModuleList(adapters)

    def forward(self, x: Tensor) -> Tensor:
        """[1 + A, B, D]: row 0 the base's embedding, row 1 + a the embedding adapter a gives alone."""
        return self.encoder(x, cast(Sequence[Adapter], self.adapters))


def merge_adapters(models: Sequence[MemoryViT]) -> MergedMemoryViT:
    """Runs memory-mode models that share one base as a single forward pass.

    The merged module shares (does not copy) the first model's encoder and every model's adapter.
    Each adapter's output equals its model's own forward: the mask lets no adapter see another.

    Raises:
        ValueError: a model is not in memory mode, or the models' bases differ.
    """
    if not models or any(model.adapter is None for model in models):
        raise ValueError("merge_adapters needs one or more memory_vit backbones in mode: memory")
    base = models[0].encoder.state_dict()
    for index, model in enumerate(models[1:], start=1):
        other = model.encoder.state_dict()
        if base.keys() != other.keys() or not all(torch.equal(base[k], other[k]) for k in base):
            raise ValueError(f"model {index} was fine-tuned from a different base than model 0")
    return MergedMemoryViT(models[0].encoder, [model.adapter for model in models if model.adapter is not None])
