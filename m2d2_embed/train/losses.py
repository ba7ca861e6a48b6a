"""Contrastive (InfoNCE) loss with a learnable temperature, in one process or across all of them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import dist


class LogitScale(nn.Module):
    """Learnable log of the inverse temperature, as CLIP: ``exp(min(value, max_value))``.

    ``clamp_()`` after each optimizer step keeps the stored value at or below ``max_value``."""

    def __init__(self, init: float = math.log(1 / 0.07), max_value: float = math.log(100.0)) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(init)))
        self.max_value = max_value

    def forward(self) -> torch.Tensor:
        return self.value.clamp(max=self.max_value).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.value.clamp_(max=self.max_value)


def info_nce(
    audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, gather: bool = True
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``audio`` [B, D] and ``text`` [B, D] (L2-normalised here).

    Row i of each is the positive of row i of the other; the rest of the batch are negatives. With
    ``gather`` and a process group, the negatives are the rows of every process (differentiable
    all-gather); each process returns the loss of its own rows, so the mean over processes (what DDP's
    gradient averaging optimises) equals the single-process loss on the concatenated batch.
    Returns a scalar, float32.
    """
    if audio.shape != text.shape or audio.ndim != 2:
        raise ValueError(f"audio {tuple(audio.shape)} and text {tuple(text.shape)} must both be [B, D]")
    a = F.normalize(audio.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    if gather and dist.world_size() > 1:
        a_all, t_all = dist.gather_with_grad(a), dist.gather_with_grad(t)
        offset = dist.rank() * a.shape[0]
    else:
        a_all, t_all, offset = a, t, 0
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_at = logit_scale * a @ t_all.T  # (B, world * B): my audio vs all captions
    logits_ta = logit_scale * t @ a_all.T  # (B, world * B): my captions vs all audio
    return (F.cross_entropy(logits_at, labels) + F.cross_entropy(logits_ta, labels)) / 2
