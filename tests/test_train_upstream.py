"""Further pre-training from upstream's full-training checkpoints, and the export back to that layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from train_fixtures import TINY_M2D, TINY_TRAIN

import m2d2_embed
from m2d2_embed.config import AudioHeadConfig, EncoderConfig
from m2d2_embed.convert import read_any
from m2d2_embed.train.config import load_config
from m2d2_embed.train.data import make_synthetic_dataset
from m2d2_embed.train.dist import DistInfo
from m2d2_embed.train.m2d import ema_decay
from m2d2_embed.train.stages import setup_stage1
from m2d2_embed.train.upstream import read_training_state, stage1_key, write_upstream_checkpoint

TINY = {"embed_dim": 64, "depth": 2, "dec_dim": 32, "dec_depth": 1, "input_size": (80, 608)}
FRESH_TINY_ENCODER = EncoderConfig(input_size=(80, 64), embed_dim=64, depth=2, num_heads=1).__dict__


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    """Clips with 64-d caption embeddings (as wide as the tiny encoder, like GTE-base's 768 for ViT-B)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth64"), n_train=8, n_val=4, caption_dim=64)


def _config(ds, out, init_from=None, max_steps=1, **model):
    base = {
        "model": {"audio_head": {"kind": "mlp", "dim": 64, "out_dim": 64}, **model},
        "m2d": {**TINY_M2D, "predictor_heads": 2},
        "train": {**TINY_TRAIN, "batch_size": 4, "out_dir": str(out), "max_steps": max_steps},
        "optim": {"lr": 1e-3, "warmup_epochs": 0},
        "data": {"csv": str(ds.train_csv), "captions": str(ds.train_captions)},
    }
    if init_from is not None:
        base["init_from"] = str(init_from)
    return load_config("stage1", base=base)


def test_training_layout_is_the_release_layout(make_checkpoint_module):
    """The generator's sized layout, at ViT-Base size, is the pinned m2d_clap_vit_base-80x608p16x16-240128 one."""
    m = make_checkpoint_module
    rows = m.training_layout()
    assert [(n, s) for n, s, _ in rows] == [(n, s) for n, s, _ in m.layout("m2d_clap_2024")]
    assert m.layout_fingerprint(rows) == m.LAYOUT_FINGERPRINTS["m2d_clap_2024"][1]


def test_further_pretraining_keeps_predictor_and_target_bit_identical(make_checkpoint_module, synth64, tmp_path):
    path, ck = make_checkpoint_module.write_training_checkpoint(tmp_path / "rel", seed=3, **TINY)
    assert path.parent.name == "m2d_clap_vit_base-80x608p16x16-240128" and path.name == "checkpoint-300.pth"
    trainer = setup_stage1(_config(synth64, tmp_path / "run", init_from=path), DistInfo())
    model = trainer.model
    assert model.init_report == {"loaded": ["logit_scale", "predictor", "target"], "fresh": []}
    assert isinstance(model.text_proj, torch.nn.Identity), "caption width = audio width: Identity, as upstream"
    assert len(model.m2d.predictor.blocks) == 1 and model.m2d.predictor.embed.out_features == 32  # from the file
    assert (model.model_config.frontend.norm_mean, model.model_config.frontend.norm_std) == (-7.1, 4.2)

    ours = dict(model.state_dict())
    ours["m2d.predictor.pos_embed"] = model.m2d.predictor.pos_embed
    enc = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    checked = 0
    for k, v in ck.items():
        key = stage1_key(k) or (f"encoder.{k}" if f"encoder.{k}" in enc else k)
        assert torch.equal(ours[key], v), f"{k} -> {key} differs at step 0"
        checked += 1
    assert checked == len(ck) == 5 + 2 + 2 * 12 + 2 + 2 + 12 + 4 + 2 * 12 + 2 + 4

    # one step later the target is the EMA of the checkpoint's target and the updated online encoder
    target0 = {k: v.clone() for k, v in model.m2d.target.state_dict().items()}
    trainer.fit()
    assert trainer.step == 1
    d = ema_decay(0, trainer.total_steps, 0.99995, 0.99999)
    online = dict(model.encoder.named_parameters())
    for k, t in model.m2d.target.state_dict().items():
        want = target0[k].mul(d).add(online[k].detach(), alpha=1 - d)
        assert torch.allclose(t, want, rtol=0, atol=1e-7), k


def test_text_proj_and_partial_checkpoints(make_checkpoint_module, tmp_path, tmp_path_factory):
    ds32 = make_synthetic_dataset(tmp_path_factory.mktemp("synth32"), n_train=8, n_val=4, caption_dim=32)
    path, ck = make_checkpoint_module.write_training_checkpoint(tmp_path, seed=1, caption_dim=32, **TINY)
    model = setup_stage1(_config(ds32, tmp_path / "run", init_from=path), DistInfo()).model
    assert torch.equal(model.text_proj.weight, ck["text_proj.weight"]) and "text_proj" in model.init_report["loaded"]

    # an encoder-only release: predictor, target and temperature start fresh, and say so
    enc_only = {k: v for k, v in ck.items() if stage1_key(k) is None}
    torch.save({"model": enc_only}, path)
    model = setup_stage1(_config(ds32, tmp_path / "run2", init_from=path), DistInfo()).model
    assert model.init_report["loaded"] == []
    fresh = {"predictor", "target (a copy of the loaded encoder)", "logit_scale", "text_proj"}
    assert set(model.init_report["fresh"]) == fresh
    assert torch.equal(model.m2d.target.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def test_norm_stats_default_auto_from_scratch_and_kept_when_continuing(synth64, tmp_path):
    fresh = setup_stage1(_config(synth64, tmp_path / "a", encoder=FRESH_TINY_ENCODER), DistInfo()).model
    fe = fresh.model_config.frontend
    assert (fe.norm_mean, fe.norm_std) != (-7.1, 4.2) and fe.norm_std > 0  # estimated from the data


def test_upstream_export_round_trips_through_load(synth64, tmp_path):
    cfg = _config(synth64, tmp_path / "run", max_steps=2, encoder=FRESH_TINY_ENCODER)
    cfg.train.export_upstream = True
    trainer = setup_stage1(cfg, DistInfo())
    trainer.fit()
    ours = tmp_path / "run" / "model"
    pth = tmp_path / "run" / "upstream" / "m2d_clap_vit_64d2-80x64p16x16p16k-m2d2embed" / "checkpoint-1.pth"
    assert pth.exists()  # 2 steps of 2 per epoch: epoch 1
    assert pth == write_upstream_checkpoint(trainer.model, tmp_path / "run" / "upstream", epoch=1)
    assert oct(pth.stat().st_mode & 0o777) == oct((ours / "model.safetensors").stat().st_mode & 0o777)

    sd_ours, cfg_ours = read_any(ours)
    sd_up, cfg_up = read_any(pth)
    assert cfg_up.encoder == cfg_ours.encoder and cfg_up.audio_head == cfg_ours.audio_head
    assert (cfg_up.frontend.norm_mean, cfg_up.frontend.norm_std) == pytest.approx(
        (cfg_ours.frontend.norm_mean, cfg_ours.frontend.norm_std)
    )
    assert sd_up.keys() == sd_ours.keys() and all(torch.equal(sd_up[k], sd_ours[k]) for k in sd_ours)

    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    a = m2d2_embed.load(str(ours), device="cpu").clip_embeddings(wave, sample_rate=16000)
    b = m2d2_embed.load(str(pth), device="cpu").clip_embeddings(wave, sample_rate=16000)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)

    # and the predictor and target come back: further pre-training continues from the export
    state = read_training_state(pth)
    own = dict(trainer.model.state_dict())
    assert set(state.groups()) == {"predictor", "target", "logit_scale", "text_proj"} - {"text_proj"}
    assert all(torch.equal(v, own[k]) for k, v in state.tensors.items() if k in own)
    again = setup_stage1(_config(synth64, tmp_path / "run2", init_from=pth), DistInfo()).model
    assert again.init_report == {"loaded": ["logit_scale", "predictor", "target"], "fresh": []}
    assert torch.equal(again.m2d.target.norm.weight, trainer.model.m2d.target.norm.weight)


def test_audio_head_defaults_to_upstream_stage1_mlp():
    cfg = load_config("stage1")
    assert cfg.model.audio_head == AudioHeadConfig(kind="mlp")


def test_stage2_exports_the_m2d2_2025_layout(tmp_path_factory, tmp_path):
    from train_fixtures import get_stage1_model, get_synth, stage2_config

    from m2d2_embed.train.stages import setup_stage2

    cfg = stage2_config(get_synth(tmp_path_factory), get_stage1_model(tmp_path_factory), tmp_path)
    trainer = setup_stage2(cfg, DistInfo())
    trainer.fit()
    pth = write_upstream_checkpoint(trainer.model, tmp_path / "up.pth", epoch=1)
    raw = torch.load(pth, weights_only=False)["model"]
    assert any(k.startswith("backbone.audio_proj.") for k in raw) and "backbone.norm_stats" in raw
    assert any(k.startswith("text_encoder.text_encoder.encoder.layer.") for k in raw)
    sd_up, cfg_up = read_any(pth)
    sd_ours, cfg_ours = read_any(tmp_path / "model")
    # a .pth does not record head counts; readers assume 64-d heads (ViT-B, BERT-base), the tiny BERT has 16-d ones
    assert dataclasses.replace(cfg_up.text, num_heads=cfg_ours.text.num_heads) == cfg_ours.text
    assert cfg_up.audio_head == cfg_ours.audio_head
    assert sd_up.keys() == sd_ours.keys() and all(torch.equal(sd_up[k], sd_ours[k]) for k in sd_ours)


def test_m2d_alone_continues_an_m2d_release_without_captions(make_checkpoint_module, synth64, tmp_path):
    """An M2D (no CLAP) pre-training checkpoint, as m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth:
    with no caption embeddings and clap.weight 0, stage 1 is M2D alone and continues predictor and target."""
    path, ck = make_checkpoint_module.write_training_checkpoint(tmp_path / "rel", seed=5, **TINY)
    m2d_only = {k: v for k, v in ck.items() if not k.startswith("audio_proj.") and k != "logit_scale"}
    torch.save({"model": m2d_only, "epoch": 300}, path)
    cfg = _config(synth64, tmp_path / "run", init_from=path, max_steps=1)
    with pytest.raises(ValueError, match="clap.weight=0 for M2D alone"):
        cfg.data.captions = None
        setup_stage1(cfg, DistInfo())
    cfg.clap.weight = 0.0
    trainer = setup_stage1(cfg, DistInfo())
    model = trainer.model
    assert model.audio_proj is None and model.logit_scale is None
    assert model.init_report == {"loaded": ["predictor", "target"], "fresh": []}
    assert torch.equal(model.m2d.predictor.mask_token, ck["mask_token"])
    assert torch.equal(model.m2d.target.blocks[1].mlp.fc2.weight, ck["target_blocks.1.mlp.fc2.weight"])
    trainer.fit()
    sd, mcfg = read_any(tmp_path / "run" / "model")
    assert mcfg.audio_head is None and not any(k.startswith("audio_proj.") for k in sd)
    pth = write_upstream_checkpoint(model, tmp_path / "up", epoch=1)
    assert pth.parent.name.startswith("m2d_vit_64d2-80x608p16x16p16k")
    assert read_training_state(pth).groups() == ["predictor", "target"]
