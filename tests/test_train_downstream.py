"""Downstream: linear probe, metrics, fine-tuning augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2d2_embed.train.downstream import accuracy, linear_probe, mean_average_precision, spec_mask


@pytest.fixture(autouse=True)
def _one_thread():
    """The probes are small: one thread avoids the cost of thread hand-offs on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes, linearly separable in 16-d: a class centre far apart plus unit noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((4, 16)) * 6
    y = rng.integers(0, 4, n)
    return (centres[y] + rng.standard_normal((n, 16))).astype(np.float32), np.array(["a", "b", "c", "d"])[y]


def test_linear_probe_is_near_perfect_on_separable_data():
    xtr, ytr = _separable(400, 0)
    xte, yte = _separable(200, 1)
    res = linear_probe(xtr, ytr, test_x=xte, test_y=yte, lr=1e-3)
    assert res.metric == "accuracy" and res.val_score >= 0.97 and res.test_score >= 0.97
    assert res.classes == ["a", "b", "c", "d"]
    assert accuracy(res.predict(xte), np.searchsorted(res.classes, yte)) == res.test_score


def _embeddings(n: int, seed: int, dim: int = 768, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like features: 768-d, offset and scaled (so standardising matters), class centres apart."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((classes, dim))
    y = rng.integers(0, classes, n)
    return (centres[y] + 3 * rng.standard_normal((n, dim)) + 5).astype(np.float32), y


def test_linear_probe_with_evar_defaults_reaches_scikit_learn():
    """EVAR's protocol (standardised, one Linear, Adam 3e-5, batch 200, <= 200 epochs, patience 20) on a separable
    set scores within 0.02 of scikit-learn's logistic regression on the same standardised features."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = _embeddings(600, 0)
    xv, yv = _embeddings(150, 1)
    xte, yte = _embeddings(500, 2)
    sc = StandardScaler().fit(xtr)
    ref = sklearn.LogisticRegression(max_iter=2000).fit(sc.transform(xtr), ytr).score(sc.transform(xte), yte)
    res = linear_probe(xtr, ytr, xv, yv, xte, yte)
    assert ref > 0.95 and res.test_score >= ref - 0.02, (ref, res.test_score)
    np.testing.assert_allclose(res.mean, sc.mean_, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.std, sc.scale_, rtol=1e-5)


def test_linear_probe_early_stopping_follows_evar():
    """A tie with the best score counts as a new best (the later epoch is kept), and training stops once
    ``patience`` epochs have passed without one."""
    x, y = _separable(200, 0)
    res = linear_probe(x, y, x[:40], y[:40], lr=1e-2, patience=3, max_epochs=30)
    assert res.val_score == 1.0 and res.best_epoch == 29  # perfect within a few epochs; every tie is a new best
    noisy = np.random.default_rng(1).permutation(y[:40])  # validation labels unrelated to the features
    res = linear_probe(x, y, x[:40], noisy, lr=1e-2, patience=3, max_epochs=30)
    assert res.best_epoch < 26, "no improvement for 3 epochs after the best one: stopped"


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
