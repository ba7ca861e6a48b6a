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


GATHER_MODES = ("exact", "upstream", "local")


def normalise_gather(gather: str | bool) -> str:
    """``clap.gather`` as one of ``GATHER_MODES`` (the booleans of older configs: True -> "exact",
    False -> "local")."""
    if gather is True:
        return "exact"
    if gather is False:
        return "local"
    if gather not in GATHER_MODES:
        raise ValueError(f"clap.gather must be one of {list(GATHER_MODES)}, got {gather!r}")
    return str(gather)


def info_nce(
    audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float, gather: str | bool = "exact"
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``audio`` [B, D] and ``text`` [B, D] (L2-normalised here).

    Row i of each is the positive of row i of the other; the rest of the batch are negatives. Under a
    process group, ``gather`` says how the other processes' rows take part:

    - ``"exact"``: negatives from every process through a differentiable all-gather; each process returns
      the loss of its own rows, so the mean over processes (what DDP's gradient averaging optimises)
      equals the single-process loss on the concatenated batch, and so does every gradient.
    - ``"upstream"``: as upstream M2D-CLAP (open_clip's ``gather_with_grad=False``): the other rows are
      gathered without gradient and every process computes the loss of the whole global batch. After
      DDP's averaging the audio and text sides get 1/world of the global-batch gradient; the temperature
      gets all of it.
    - ``"local"``: negatives from this process's rows only.

    Without a process group all three are the plain single-batch loss. Returns a scalar, float32.
    """
    if audio.shape != text.shape or audio.ndim != 2:
        raise ValueError(f"audio {tuple(audio.shape)} and text {tuple(text.shape)} must both be [B, D]")
    mode = normalise_gather(gather)
    a = F.normalize(audio.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    world = dist.world_size()
    if mode == "upstream" and world > 1:
        a_all, t_all = dist.gather_no_grad(a), dist.gather_no_grad(t)  # this process's rows keep their graph
        labels = torch.arange(a_all.shape[0], device=a.device)
        logits = logit_scale * a_all @ t_all.T  # (world * B, world * B)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    if mode == "exact" and world > 1:
        a_all, t_all = dist.gather_with_grad(a), dist.gather_with_grad(t)
        offset = dist.rank() * a.shape[0]
    else:
        a_all, t_all, offset = a, t, 0
    labels = torch.arange(a.shape[0], device=a.device) + offset
    logits_at = logit_scale * a @ t_all.T  # (B, world * B): my audio vs all captions
    logits_ta = logit_scale * t @ a_all.T  # (B, world * B): my captions vs all audio
    return (F.cross_entropy(logits_at, labels) + F.cross_entropy(logits_ta, labels)) / 2
