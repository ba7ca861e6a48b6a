"""M2D objective: masking bookkeeping, EMA, predictor, loss."""

from __future__ import annotations

import math

import pytest
import torch
from train_fixtures import TINY_ENCODER

from m2d2_embed.encoder import AudioEncoder
from m2d2_embed.train.m2d import (
    M2D,
    Mask,
    Predictor,
    TargetEncoder,
    ema_decay,
    ema_update,
    encode_visible,
    init_encoder,
    m2d_loss,
    random_mask,
    sincos_pos_embed,
    time_mask,
)


def _encoder(seed: int = 0) -> AudioEncoder:
    torch.manual_seed(seed)
    enc = AudioEncoder(TINY_ENCODER)
    init_encoder(enc)
    return enc


def _check_partition(m: Mask, n: int) -> None:
    both = torch.cat([m.visible, m.masked], 1).sort(1).values
    assert torch.equal(both, torch.arange(n).expand_as(both)), "visible and masked must partition 0..N-1"
    assert torch.all(m.visible[:, 1:] > m.visible[:, :-1]) and torch.all(m.masked[:, 1:] > m.masked[:, :-1])


@pytest.mark.parametrize("n, ratio", [(20, 0.7), (310, 0.7), (16, 0.5), (10, 0.0)])
def test_random_mask_keeps_upstream_count_and_partitions_patches(n, ratio):
    m = random_mask(6, n, ratio, torch.Generator().manual_seed(1))
    assert m.visible.shape == (6, int(n * (1 - ratio))) and m.masked.shape == (6, n - int(n * (1 - ratio)))
    _check_partition(m, n)
    if ratio > 0:
        assert len({tuple(v.tolist()) for v in m.visible}) > 1, "each clip draws its own mask"


def test_random_mask_is_reproducible_from_the_generator():
    a = random_mask(3, 40, 0.7, torch.Generator().manual_seed(5))
    b = random_mask(3, 40, 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(a.visible, b.visible) and torch.equal(a.masked, b.masked)
    with pytest.raises(ValueError, match="mask ratio"):
        random_mask(1, 10, 1.0)


def test_time_mask_hides_whole_time_columns():
    f, t = 5, 8
    m = time_mask(4, f, t, 0.3, torch.Generator().manual_seed(0))
    _check_partition(m, f * t)
    assert m.masked.shape == (4, f * int(t * 0.3))
    for row in m.masked:
        cols = row % t
        assert all((cols == c).sum() == f for c in cols.unique()), "every frequency patch of a column is masked"


def test_ema_update_equals_the_formula():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o, rtol=0, atol=1e-7)


def test_target_encoder_tracks_online_blocks_and_norm_only():
    enc = _encoder()
    target = TargetEncoder(enc)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in enc.blocks.parameters():
            p.add_(1.0)
    old = target.norm.weight.clone()
    target.update(enc, 0.75)
    torch.testing.assert_close(
        target.blocks[0].attn.qkv.weight,
        0.75 * (enc.blocks[0].attn.qkv.weight - 1) + 0.25 * enc.blocks[0].attn.qkv.weight,
    )
    torch.testing.assert_close(target.norm.weight, old)  # norm unchanged: online norm equals the copy


def test_ema_decay_rises_linearly_from_init_to_final():
    assert ema_decay(0, 101, 0.99995, 0.99999) == pytest.approx(0.99995, abs=1e-12)
    assert ema_decay(100, 101, 0.99995, 0.99999) == pytest.approx(0.99999, abs=1e-12)
    assert ema_decay(50, 101, 0.99995, 0.99999) == pytest.approx(0.99997, abs=1e-12)


def test_m2d_loss_equals_a_direct_computation():
    pred = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])  # (1, 2, 3)
    target = torch.tensor([[[3.0, 1.0, 2.0], [1.0, 1.0, 4.0]]])
    # standardise each target token over features (unbiased variance), then 2 - 2 cos
    z = [(torch.tensor(v) - sum(v) / 3) for v in ([3.0, 1.0, 2.0], [1.0, 1.0, 4.0])]
    z = [v / math.sqrt((v**2).sum() / 2 + 1e-6) for v in z]
    p = [torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])]
    expect = sum(2 - 2 * float(pi @ zi / zi.norm()) for pi, zi in zip(p, z, strict=True)) / 2
    assert m2d_loss(pred, target).item() == pytest.approx(expect, abs=1e-6)
    centred = target - target.mean(-1, keepdim=True)  # the direction of the standardised target: loss 0
    assert m2d_loss(3 * centred, target).item() == pytest.approx(0.0, abs=1e-6)


def test_sincos_pos_embed_shape_and_cls_row():
    pe = sincos_pos_embed(32, 5, 4)
    assert pe.shape == (21, 32) and torch.all(pe[0] == 0)
    assert len({tuple(r.tolist()) for r in pe[1:]}) == 20, "every position is distinct"


def test_encode_visible_without_mask_equals_the_runtime_encoder():
    enc = _encoder()
    x = torch.randn(2, 1, 80, 64)
    torch.testing.assert_close(encode_visible(enc, x, None)[:, 1:], enc(x))


def test_predictor_returns_masked_positions_in_order_and_ignores_their_content():
    torch.manual_seed(0)
    pred = Predictor(64, TINY_ENCODER.grid, dim=32, depth=1, num_heads=2)
    m = random_mask(2, 20, 0.7, torch.Generator().manual_seed(0))
    z = torch.randn(2, 1 + m.visible.shape[1], 64)
    out = pred(z, m, t=4)
    assert out.shape == (2, m.masked.shape[1], 64)
    # shorter input (t=2 time patches): position embedding cut like the encoder's
    m2 = random_mask(2, 10, 0.7, torch.Generator().manual_seed(0))
    assert pred(torch.randn(2, 1 + m2.visible.shape[1], 64), m2, t=2).shape == (2, m2.masked.shape[1], 64)


def test_m2d_forward_gives_gradients_to_online_and_predictor_not_target():
    enc = _encoder()
    obj = M2D(enc, 0.7, 32, 1, 2)
    loss, z = obj(enc, torch.randn(3, 1, 80, 64), torch.Generator().manual_seed(0))
    assert z.shape == (3, 1 + int(20 * 0.3), 64)
    loss.backward()
    assert enc.blocks[0].attn.qkv.weight.grad is not None and obj.predictor.mask_token.grad is not None
    assert all(p.grad is None for p in obj.target.parameters())
    assert enc.pos_embed.grad is None, "the encoder position embedding is fixed sin-cos, as upstream"
