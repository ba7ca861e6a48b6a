"""Gradient accumulation: exact for the M2D loss."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate
from train_fixtures import get_synth, stage1_config

from m2d2_embed.train.dist import DistInfo
from m2d2_embed.train.loop import step_generator
from m2d2_embed.train.stages import setup_stage1


def _trainer(synth, out, batch_size, accum_steps):
    cfg = stage1_config(synth, out, max_steps=2, batch_size=batch_size, accum_steps=accum_steps)
    cfg.clap.weight = 0.0  # M2D only: the part accumulation keeps exact
    cfg.data.norm_stats = (-7.1, 4.2)
    return setup_stage1(cfg, DistInfo())


def test_accumulated_m2d_gradient_equals_the_whole_batch(tmp_path_factory, tmp_path):
    synth = get_synth(tmp_path_factory)
    whole, accum = _trainer(synth, tmp_path / "a", 4, 1), _trainer(synth, tmp_path / "b", 2, 2)
    assert whole.step_batch == accum.step_batch == 4 and (whole.peak_lr, whole.total_steps) == (
        accum.peak_lr,
        accum.total_steps,
    )
    batch = default_collate([whole.dataset[i] for i in range(4)])
    la, _ = whole.forward_backward(batch, step_generator(0, 0, 0))
    lb, _ = accum.forward_backward(batch, step_generator(0, 0, 0))
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    ga = dict(whole.model.named_parameters())
    n = 0
    for name, p in accum.model.named_parameters():
        if p.grad is None:
            assert ga[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, ga[name].grad, rtol=1e-4, atol=1e-7, msg=name)
        n += 1
    assert n > 20


def test_accum_steps_count_optimizer_steps(tmp_path_factory, tmp_path):
    synth = get_synth(tmp_path_factory)  # 24 clips
    t = _trainer(synth, tmp_path, 4, 3)
    assert t.steps_per_epoch == 2  # 24 // (4 x 3)
    t.fit(until=1)
    assert t.step == 1
