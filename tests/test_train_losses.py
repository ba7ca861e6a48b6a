"""Contrastive loss: InfoNCE against a naive implementation, the learnable temperature."""

from __future__ import annotations

import math

import pytest
import torch

from m2d2_embed.train.dist import gather_with_grad
from m2d2_embed.train.losses import LogitScale, info_nce


def naive_info_nce(a: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
    """Loops over rows: -log softmax of the matching pair, both directions, averaged."""
    a = a / a.norm(dim=1, keepdim=True)
    t = t / t.norm(dim=1, keepdim=True)
    total = 0.0
    n = len(a)
    for i in range(n):
        sims_a = torch.stack([scale * a[i] @ t[j] for j in range(n)])
        sims_t = torch.stack([scale * t[i] @ a[j] for j in range(n)])
        total = total - torch.log_softmax(sims_a, 0)[i] - torch.log_softmax(sims_t, 0)[i]
    return total / (2 * n)


def test_info_nce_equals_naive_implementation():
    g = torch.Generator().manual_seed(0)
    a, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert info_nce(a, t, 14.3).item() == pytest.approx(naive_info_nce(a, t, 14.3).item(), abs=1e-5)


def test_info_nce_is_low_for_aligned_pairs_and_symmetric():
    a = torch.eye(4)
    assert info_nce(a, a, 100.0).item() < 1e-3
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert info_nce(x, y, 10.0).item() == pytest.approx(info_nce(y, x, 10.0).item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        info_nce(torch.randn(4, 3), torch.randn(5, 3), 1.0)


def test_gather_is_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_logit_scale_starts_at_clip_value_and_is_clamped():
    s = LogitScale()
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        s.value.fill_(10.0)
    assert s().item() == pytest.approx(100.0, rel=1e-5)
    s.clamp_()
    assert s.value.item() == pytest.approx(math.log(100.0))
