"""Deep visual prompts (VPT-deep: Jia et al., "Visual Prompt Tuning", ECCV 2022) in a frozen timm transformer:
model.vpt_prompts learned tokens per block, the only new tensors of the backbone, which train beside the head.

Token networks (ViT, DeiT, DINOv2 with or without registers, EVA-02, CLIP): before each block the block's own
prompts are inserted after the class, distillation and register tokens, and after it they are taken out again, so
the next block gets its own fresh prompts (VPT-deep replaces them at every layer) and the token grid that becomes
the head's map is the plain network's H x W grid, whatever the head. EVA-02's rotary embedding turns the patch
tokens only: its attention is told the prompts are prefix tokens, as the class token is.

Windowed networks (Swin): a block's prompts join every window's tokens inside its attention (as the VPT authors
prompt Swin), the window's relative-position bias and shift mask padded with zeros for them (no position, never
masked), and leave with the attention's output. Swin-V2 adds its bias inside its attention, where it cannot be
padded from outside: refused.

Prompts start uniform in +-sqrt(6 / (3 * patch area + dim)), the VPT authors' Xavier-style init. A zero-valued
prompt is not "no prompt": the tokens still attend to it (its key is the key projection's bias), so the map changes
with any prompts at all; tests compare against a hand-written prompted forward instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from bcnn.errors import UserError


class PromptedBlock(nn.Module):
    """A token network's block with its prompts: [prefix, prompts, patches] in, [prefix, patches] out."""

    def __init__(self, block: nn.Module, count: int, dim: int, prefix: int, init_range: float):
        super().__init__()
        self.block, self.prefix = block, prefix
        self.prompts = nn.Parameter(torch.empty(count, dim).uniform_(-init_range, init_range))
        attention = getattr(block, "attn", None)
        if hasattr(attention, "num_prefix_tokens"):  # EVA-02: its rotary embedding skips the prefix tokens
            attention.num_prefix_tokens = prefix + count

    def forward(self, tokens: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        batch, count = tokens.shape[0], self.prompts.shape[0]
        prompts = self.prompts.to(tokens.dtype).expand(batch, -1, -1)
        tokens = torch.cat([tokens[:, :self.prefix], prompts, tokens[:, self.prefix:]], dim=1)
        tokens = self.block(tokens, *args, **kwargs)
        return torch.cat([tokens[:, :self.prefix], tokens[:, self.prefix + count:]], dim=1)


class PromptedWindowAttention(nn.Module):
    """A Swin block's window attention with its prompts in every window: (windows, N, C) in and out."""

    def __init__(self, attention: nn.Module, count: int, dim: int, init_range: float):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(count, dim).uniform_(-init_range, init_range))
        # The attention's own class, its position bias padded for the prompts: a class rather than a patched method,
        # so a copy of the model (the exponential average's) pads its own bias.
        attention.__class__ = _padded_bias_class(type(attention))
        attention.bcnn_prompt_count = count
        self.attention = attention

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        count = self.prompts.shape[0]
        prompts = self.prompts.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        if mask is not None:  # the shifted windows' mask: prompts are seen from every token and see every token
            mask = F.pad(mask, (count, 0, count, 0))
        return self.attention(torch.cat([prompts, tokens], dim=1), mask=mask)[:, count:]


class _PaddedBias:
    """Mixed into a Swin window attention's class: the bias for [prompts, window] is zero in the prompts' rows and
    columns (they have no position)."""

    def _get_rel_pos_bias(self) -> torch.Tensor:
        count = self.bcnn_prompt_count
        return F.pad(super()._get_rel_pos_bias(), (count, 0, count, 0))


_PADDED_CLASSES: dict[type, type] = {}


def _padded_bias_class(attention_class: type) -> type:
    if attention_class not in _PADDED_CLASSES:
        _PADDED_CLASSES[attention_class] = type(f"Prompted{attention_class.__name__}", (_PaddedBias, attention_class),
                                                {})
    return _PADDED_CLASSES[attention_class]


def add_prompts(backbone: nn.Module, count: int, name: str) -> int:
    """Prompts in every block of a frozen timm transformer built by bcnn (timm_maps: LastFeatureMap ->
    FeatureGetterNet -> the network); returns how many prompt parameters were added. name: model.backbone."""
    network = getattr(getattr(backbone, "network", None), "model", None)
    blocks = getattr(network, "blocks", None)
    patch = getattr(getattr(network, "patch_embed", None), "patch_size", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(network, "num_prefix_tokens") and patch is not None:
        return _prompt_token_blocks(network, count, _init_range(patch, network.embed_dim))
    layers = getattr(network, "layers", None)
    swin_blocks = [block for block in network.modules() if hasattr(block, "attn") and hasattr(block, "shift_size")] \
        if network is not None else []
    if swin_blocks and all(hasattr(block.attn, "_get_rel_pos_bias") for block in swin_blocks) and layers is not None:
        return _prompt_windows(swin_blocks, count, network)
    kind = "Swin-V2 (its attention adds its position bias inside)" if swin_blocks else "not a ViT or Swin"
    raise UserError(f"model.adapt=vpt_deep inserts prompt tokens into a transformer's blocks, and model.backbone={name} "
                    f"is {kind}; use model.adapt=lora or bitfit, or a ViT, DeiT, DINOv2, EVA-02, CLIP or Swin backbone.")


def _init_range(patch, dim: int) -> float:
    area = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    return math.sqrt(6.0 / (3 * area + dim))


def _prompt_token_blocks(network: nn.Module, count: int, init_range: float) -> int:
    dim, prefix = network.embed_dim, network.num_prefix_tokens
    for index, block in enumerate(network.blocks):
        network.blocks[index] = PromptedBlock(block, count, dim, prefix, init_range)
    return count * dim * len(network.blocks)


def _prompt_windows(blocks: list[nn.Module], count: int, network: nn.Module) -> int:
    patch = getattr(getattr(network, "patch_embed", None), "patch_size", 4)
    added = 0
    for block in blocks:
        dim = block.attn.qkv.in_features
        block.attn = PromptedWindowAttention(block.attn, count, dim, _init_range(patch, dim))
        added += count * dim
    return added
