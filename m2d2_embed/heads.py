"""CLAP audio heads: patch tokens of a whole clip -> one audio embedding in the shared audio-text space."""

from __future__ import annotations

import torch
from torch import nn

from .config import AudioHeadConfig
from .encoder import Block


class SemanticAudioHead(nn.Module):
    """M2D2 2025 "AudioToSemantic": a learned token prepended to all patch tokens, transformer block(s)
    (1 head, MLP ratio 1, LayerNorm eps 1e-5, no position embedding), the learned token's output, LayerNorm.

    tokens [B, N, D] (+ key_mask [B, N], True for real tokens) -> [B, D]
    """

    def __init__(self, config: AudioHeadConfig) -> None:
        super().__init__()
        D = config.dim
        self.sem_token = nn.Parameter(torch.zeros(1, 1, D))
        self.sem_blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, config.norm_eps) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B = tokens.shape[0]
        x = torch.cat([self.sem_token.expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(B, 1), key_mask], dim=1)
        for blk in self.sem_blocks:
            x = blk(x, key_mask)
        return self.norm(x[:, 0])


class MlpAudioHead(nn.Sequential):
    """M2D-CLAP 2024: Linear-ReLU-Linear on the mean of the patch tokens (keys ``0.*``, ``2.*``)."""

    def __init__(self, config: AudioHeadConfig) -> None:
        super().__init__(nn.Linear(config.dim, config.dim), nn.ReLU(), nn.Linear(config.dim, config.out_dim))

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_mask is None:
            x = tokens.mean(1)
        else:
            m = key_mask.unsqueeze(-1).to(tokens.dtype)
            x = (tokens * m).sum(1) / m.sum(1)
        return super().forward(x)


def build_audio_head(config: AudioHeadConfig) -> nn.Module:
    if config.kind == "semantic":
        return SemanticAudioHead(config)
    if config.kind == "mlp":
        return MlpAudioHead(config)
    raise ValueError(f"unknown audio head kind {config.kind!r}; expected 'semantic' or 'mlp'")
