"""Downstream: linear probe, metrics, fine-tuning augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2d2_embed.train.downstream import accuracy, linear_probe, mean_average_precision, spec_mask


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes, linearly separable in 16-d: a class centre far apart plus unit noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((4, 16)) * 6
    y = rng.integers(0, 4, n)
    return (centres[y] + rng.standard_normal((n, 16))).astype(np.float32), np.array(["a", "b", "c", "d"])[y]


def test_linear_probe_is_near_perfect_on_separable_data():
    xtr, ytr = _separable(400, 0)
    xte, yte = _separable(200, 1)
    res = linear_probe(xtr, ytr, test_x=xte, test_y=yte)
    assert res.metric == "accuracy" and res.val_score >= 0.97 and res.test_score >= 0.97
    assert res.classes == ["a", "b", "c", "d"]
    assert accuracy(res.predict(xte), np.searchsorted(res.classes, yte)) == res.test_score


def test_linear_probe_multi_label_reports_map():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0, x[:, 0] + x[:, 2] > 0], 1).astype(np.float32)
    res = linear_probe(x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:], lr=1e-2)
    assert res.metric == "mAP" and res.test_score > 0.95


def test_linear_probe_rejects_unknown_test_labels():
    x, y = _separable(50, 0)
    with pytest.raises(ValueError, match="does not occur"):
        linear_probe(x, y, test_x=x[:2], test_y=["a", "zebra"], max_epochs=2)


def test_mean_average_precision_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.6], [0.1, 0.2]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    # class 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; class 1: positive at rank 1 -> 1
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_spec_mask_zeroes_one_band_per_clip():
    x = torch.ones(4, 1, 80, 50)
    g = torch.Generator().manual_seed(0)
    f = spec_mask(x, 10, -2, g)
    zero_rows = (f[:, 0, :, 0] == 0).sum(1)
    assert torch.all(zero_rows <= 10) and torch.all((f == 0).any(-1).sum(-1).squeeze(1) == zero_rows)
    t = spec_mask(x, 20, -1, g)
    assert torch.all((t[:, 0, 0] == 0).sum(1) <= 20) and torch.equal(spec_mask(x, 0, -1, g), x)
