"""Fine-tuning: EVAR's recipe (BatchNorm head, LARS, structured patch masking, random resized crop,
freeze_embed), its pieces, and the classifier export read by tagging."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from train_fixtures import finetune_config, get_stage1_model, get_synth

from m2d2_embed.config import ClassifierConfig
from m2d2_embed.train.config import load_config
from m2d2_embed.train.dist import DistInfo
from m2d2_embed.train.downstream import TaskHead, random_resized_crop, setup_finetune
from m2d2_embed.train.loop import Lars, lr_at
from m2d2_embed.train.m2d import structured_mask


def test_evar_recipe_is_a_preset_that_user_settings_override():
    cfg = load_config("finetune", overrides=["recipe=evar", "optim.lr=0.5"])
    assert (cfg.head_norm, cfg.training_mask, cfg.rrc, cfg.freeze_embed, cfg.mixup_kind, cfg.loss) == (
        True,
        0.5,
        True,
        True,
        "evar",
        "evar",
    )
    o = cfg.optim
    assert (o.optimizer, o.lr, o.weight_decay, o.cosine) == ("lars", 0.5, 0.0, "whole_run")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.freq_mask, cfg.time_mask) == (200.0, 128, 30, 192)
    ours = load_config("finetune")
    assert (ours.recipe, ours.head_norm, ours.optim.optimizer, ours.training_mask) == ("ours", False, "adamw", 0.0)
    with pytest.raises(ValueError, match="unknown finetune recipe"):
        load_config("finetune", overrides=["recipe=hear"])


def test_structured_mask_hides_whole_rows_and_columns():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = structured_mask(3, 5, 12, 0.5, g)
        n_vis = m.visible.shape[1]
        assert m.visible.shape[1] + m.masked.shape[1] == 60
        for b in range(3):
            vis = set(m.visible[b].tolist())
            rows = {p // 12 for p in vis}
            cols = {p % 12 for p in vis}
            assert vis == {r * 12 + c for r in rows for c in cols}, "visible = kept rows x kept columns"
            assert len(rows) * len(cols) == n_vis


def test_lars_is_timm_lars():
    torch.manual_seed(0)
    w0, grads = torch.randn(4, 3), [torch.randn(4, 3) for _ in range(3)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    lars, sgd = Lars([a], lr=0.5, momentum=0.9), torch.optim.SGD([b], lr=0.5, momentum=0.9)
    for g in grads:  # no weight decay: EVAR's Lars(lr, momentum=0.9, weight_decay=0) is SGD with momentum
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a, b)
    c = torch.nn.Parameter(w0.clone())
    c.grad = grads[0].clone()
    Lars([c], lr=0.5, momentum=0.9, weight_decay=0.1).step()
    ratio = 0.001 * w0.norm() / (grads[0].norm() + 0.1 * w0.norm() + 1e-8)
    torch.testing.assert_close(c.detach(), w0 - 0.5 * ratio * (grads[0] + 0.1 * w0))


def test_whole_run_cosine_is_timm_cosine():
    # timm CosineLRScheduler(t_initial=T, lr_min, warmup_t=W, warmup_lr_init=0): linear warm-up, then the cosine of t/T
    T, W, peak, lo = 100, 5, 2.0, 1e-7
    assert lr_at(2, peak, W, T, lo, "whole_run") == pytest.approx(peak * 2 / W)
    want = lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * 0.4))
    assert lr_at(40, peak, W, T, lo, "whole_run") == pytest.approx(want)
    assert lr_at(W, peak, W, T, lo, "whole_run") < peak  # no restart at the peak after the warm-up


def test_random_resized_crop_keeps_the_shape_and_changes_the_clip():
    x = torch.randn(2, 1, 80, 96)
    y = random_resized_crop(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(x, y)


def test_evar_finetune_runs_and_exports_the_tagging_head(tmp_path_factory, tmp_path):
    synth, stage1 = get_synth(tmp_path_factory), get_stage1_model(tmp_path_factory)
    cfg = finetune_config(synth, stage1, tmp_path, max_steps=3)
    base = load_config("finetune", overrides=["recipe=evar"])
    for k in ("recipe", "head_norm", "training_mask", "rrc", "freeze_embed", "mixup_kind", "loss", "mixup"):
        setattr(cfg, k, getattr(base, k))
    cfg.optim = base.optim
    cfg.optim.lr, cfg.optim.warmup_epochs = 0.05, 0.0
    trainer = setup_finetune(cfg, DistInfo())
    model = trainer.model
    assert isinstance(trainer.optimizer, Lars)
    assert not any(p.requires_grad for p in model.encoder.patch_embed.parameters())
    D = model.encoder.config.embed_dim
    assert isinstance(model.head.norm, torch.nn.BatchNorm1d) and model.head.linear.in_features == D
    w = model.head.linear.weight  # trunc_normal(std 2e-5) (truncated at +-2 absolute, so in effect a normal)
    assert 1e-5 < w.std().item() < 3e-5 and w.abs().max() < 1e-4 and not model.head.linear.bias.any()
    pe = model.encoder.patch_embed.proj.weight.clone()
    trainer.fit()
    assert torch.equal(model.encoder.patch_embed.proj.weight, pe)

    out = tmp_path / "model"
    clf = out / "classifier.safetensors"
    assert (clf.stat().st_mode & 0o777) == ((out / "model.safetensors").stat().st_mode & 0o777)
    with safe_open(str(clf), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        running_var = f.get_tensor("norm.running_var")
    assert keys == {"norm.running_mean", "norm.running_var", "linear.weight", "linear.bias"}
    assert json.loads(meta["labels"]) == model.labels.names and json.loads(meta["multi_label"]) is False
    cc = ClassifierConfig(**{**json.loads(meta["classifier_config"]), "labels": tuple(model.labels.names)})
    assert (cc.in_features, cc.num_classes, cc.norm) == (D, len(model.labels.names), True)
    assert not torch.allclose(running_var, torch.ones(D)), "BatchNorm statistics were updated by training"


def test_generic_head_exports_linear_keys(tmp_path_factory, tmp_path):
    synth, stage1 = get_synth(tmp_path_factory), get_stage1_model(tmp_path_factory)
    trainer = setup_finetune(finetune_config(synth, stage1, tmp_path, max_steps=1), DistInfo())
    path = trainer.model.export_extra(tmp_path / "m")
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"linear.weight", "linear.bias"}
    assert isinstance(trainer.model.head, TaskHead) and trainer.model.head.norm is None
