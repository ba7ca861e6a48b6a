"""Heads on the audio encoder: CLAP audio heads (patch tokens of a clip -> one embedding in the shared audio-text
space) and the task classifier of fine-tuned models (clip or frame features -> class logits)."""

from __future__ import annotations

import torch
from torch import nn

from .config import AudioHeadConfig, ClassifierConfig
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
            Block(D, config.num_heads, config.mlp_ratio, config.norm_eps) for _ in range(config.depth)
        )
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


class Standardize(nn.Module):
    """BatchNorm1d without affine parameters, in eval mode: ``(x - running_mean) / sqrt(running_var + eps)``
    over the last axis. Plain buffers (no ``num_batches_tracked``): the key names of EVAR's head norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)


class Classifier(nn.Module):
    """Task head of a fine-tuned model (EVAR's: BatchNorm1d(affine=False) + Linear; ours: Linear only).

    features [..., in_features] -> logits [..., num_classes]. It runs in float32 whatever the model's dtype: it is
    one small matmul, and the standardisation divides by per-feature deviations that bf16 would blur.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.norm = Standardize(config.in_features, config.norm_eps) if config.norm else None
        self.linear = nn.Linear(config.in_features, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.linear.weight.device, torch.float32)
        if self.norm is not None:
            x = self.norm(x)
        return self.linear(x)
