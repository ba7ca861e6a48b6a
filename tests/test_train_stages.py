"""Training stages end to end on the synthetic dataset: learning, resuming, exporting, the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from train_fixtures import finetune_config, get_stage1_model, get_synth, stage1_config, stage2_config

import m2d2_embed
from m2d2_embed.convert import read_any
from m2d2_embed.encoder import AudioEncoder
from m2d2_embed.train.__main__ import main
from m2d2_embed.train.config import load_config
from m2d2_embed.train.dist import DistInfo
from m2d2_embed.train.downstream import setup_finetune
from m2d2_embed.train.loop import Trainer, lr_at, param_groups
from m2d2_embed.train.stages import setup_stage1, setup_stage2, sub_state


@pytest.fixture
def synth(tmp_path_factory):
    return get_synth(tmp_path_factory)


@pytest.fixture
def stage1_model(tmp_path_factory):
    return get_stage1_model(tmp_path_factory)


def _fixed_batch(trainer: Trainer, n: int = 8) -> dict:
    items = [trainer.dataset[i] for i in range(n)]
    return (trainer.collate_fn or default_collate)(items)


def _loss_before_after(model: torch.nn.Module, batch: dict, steps: int = 12, lr: float = 1e-3) -> tuple[float, float]:
    """Loss on a fixed batch (fixed masks) before and after ``steps`` AdamW steps on that batch."""
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=lr)

    def loss_now() -> float:
        with torch.no_grad():
            return model(batch, torch.Generator().manual_seed(0))[0].item()

    before = loss_now()
    for i in range(steps):
        loss, _ = model(batch, torch.Generator().manual_seed(i))
        loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_step(i, steps)
    return before, loss_now()


def test_stage1_steps_reduce_the_loss(synth, tmp_path):
    trainer = setup_stage1(stage1_config(synth, tmp_path), DistInfo())
    before, after = _loss_before_after(trainer.model, _fixed_batch(trainer))
    assert after < 0.9 * before, (before, after)


def test_stage2_steps_reduce_the_loss_and_keep_the_encoder_frozen(synth, stage1_model, tmp_path):
    trainer = setup_stage2(stage2_config(synth, stage1_model, tmp_path), DistInfo())
    enc = {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}
    before, after = _loss_before_after(trainer.model, _fixed_batch(trainer))
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, trainer.model.encoder.state_dict()[k]) for k, v in enc.items())
    assert trainer.model.logit_scale.value.item() <= np.log(100) + 1e-6  # starts at ln(100), clamped there


def test_finetune_steps_reduce_the_loss(synth, stage1_model, tmp_path):
    trainer = setup_finetune(finetune_config(synth, stage1_model, tmp_path), DistInfo())
    trainer.model.eval()  # no mixup / masking: the same loss before and after
    before, after = _loss_before_after(trainer.model, _fixed_batch(trainer))
    assert after < 0.9 * before, (before, after)


def test_resume_from_checkpoint_continues_bit_identically(synth, tmp_path):
    kw = {"max_steps": 5, "batch_size": 8}  # 3 steps per epoch: resuming at step 2 crosses an epoch boundary
    full = setup_stage1(stage1_config(synth, tmp_path / "a", **kw), DistInfo())
    full.fit()
    part = setup_stage1(stage1_config(synth, tmp_path / "b", **kw), DistInfo())
    part.fit(until=2)  # as if preempted after the checkpoint of step 2
    assert part.step == 2 and not (tmp_path / "b" / "model").exists()
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must carry what matters
    resumed = setup_stage1(stage1_config(synth, tmp_path / "b", **kw), DistInfo())
    assert resumed.step == 2
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("m2d.target.") for k in a)  # EMA target included
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_checkpoint_write_is_atomic_and_complete(synth, tmp_path):
    trainer = setup_stage1(stage1_config(synth, tmp_path, max_steps=1), DistInfo())
    trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl", "model"]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "step", "rng"} <= set(ck) and ck["step"] == 1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and {"loss", "m2d", "clap", "lr"} <= set(log[-1])


def test_lr_schedule_warms_up_then_follows_half_cosine():
    assert lr_at(0, 1.0, 10, 110) == 0.0 and lr_at(5, 1.0, 10, 110) == 0.5
    assert lr_at(10, 1.0, 10, 110) == 1.0 and lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, 110, min_lr=0.1) == pytest.approx(0.1)


def _wave() -> np.ndarray:
    t = np.arange(16000) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_stage1_export_loads_in_the_runtime(stage1_model):
    sd, cfg = read_any(stage1_model)
    assert {k.split(".")[0] for k in sd} == {"encoder", "audio_proj"} and cfg.text is None
    enc = AudioEncoder(cfg.encoder)
    enc.load_state_dict(sub_state(sd, "encoder."))  # strict
    if not hasattr(m2d2_embed, "load"):
        pytest.skip("m2d2_embed.load is not available yet")
    model = m2d2_embed.load(stage1_model, device="cpu")
    emb = np.asarray(model.clip_embeddings(_wave(), sample_rate=16000))
    assert emb.shape[-1] == cfg.encoder.grid[0] * cfg.encoder.embed_dim and np.isfinite(emb).all()


def test_stage2_export_has_text_encoder_and_loads(synth, stage1_model, tmp_path):
    trainer = setup_stage2(stage2_config(synth, stage1_model, tmp_path, max_steps=1), DistInfo())
    trainer.fit()
    sd, cfg = read_any(tmp_path / "model")
    assert {k.split(".")[0] for k in sd} == {"encoder", "audio_proj", "text_encoder"}
    assert cfg.text is not None and cfg.text.hidden_size == 64 and cfg.audio_head is not None
    if not hasattr(m2d2_embed, "load"):
        pytest.skip("m2d2_embed.load is not available yet")
    model = m2d2_embed.load(tmp_path / "model", device="cpu")
    assert np.isfinite(np.asarray(model.clip_embeddings(_wave(), sample_rate=16000))).all()


def test_config_files_overrides_and_unknown_keys(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"batch_size": 16}, "m2d": {"mask_ratio": 0.6}}))
    cfg = load_config("stage1", tmp_path / "c.json", ["train.seed=7", "optim.betas=[0.9, 0.99]"])
    assert cfg.train.batch_size == 16 and cfg.m2d.mask_ratio == 0.6 and cfg.train.seed == 7
    assert cfg.optim.betas == (0.9, 0.99) and cfg.m2d.predictor_depth == 8  # defaults kept
    with pytest.raises(ValueError, match="unknown key"):
        load_config("stage1", overrides=["train.bacth_size=3"])
    with pytest.raises(ValueError, match="unknown stage"):
        load_config("stage3")


def test_published_recipe_defaults():
    c1, c2 = load_config("stage1"), load_config("stage2")
    assert (c1.m2d.mask_ratio, c1.m2d.predictor_dim, c1.m2d.predictor_depth, c1.m2d.predictor_heads) == (
        0.7,
        512,
        8,
        16,
    )
    assert (c1.m2d.ema_decay_init, c1.m2d.ema_decay_final, c1.clap.weight) == (0.99995, 0.99999, 0.01)
    assert (c1.optim.betas, c1.optim.weight_decay, c1.optim.clip_grad) == ((0.9, 0.95), 0.05, 3.0)
    assert c1.clap.logit_scale_init == pytest.approx(np.log(1 / 0.07)) and c2.mask_ratio == 0.3
    assert c2.clap.logit_scale_init == pytest.approx(np.log(100))


def test_cli_runs_all_stages_on_the_synthetic_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "demo", "--n-train", "16", "--n-val", "8"]) == 0
    short = ["--set", "train.max_steps=2"]
    for stage in ("stage1", "stage2", "finetune"):
        assert main([stage, "--config", f"demo/{stage}.json", *short]) == 0
        assert (tmp_path / "demo" / "runs" / stage / "model" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "runs" / "finetune" / "model" / "classifier.safetensors").exists()
    capsys.readouterr()
    assert main(["stage1", "--config", "demo/stage1.json", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["encoder"]["embed_dim"] == 64 and printed["m2d"]["mask_ratio"] == 0.7


def test_cli_reports_config_errors_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage1", "--set", "train.bogus=1"])
    assert e.value.code == 2 and "unknown key(s) ['bogus']" in capsys.readouterr().err


def test_importing_m2d2_embed_does_not_import_training():
    code = "import sys, m2d2_embed; sys.exit(any(m.startswith('m2d2_embed.train') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_cli_probe_on_an_exported_model(stage1_model, synth, capsys):
    args = ["probe", "--model", str(stage1_model), "--train", str(synth.train_csv), "--test", str(synth.val_csv)]
    assert main([*args, "--epochs", "7", "--patience", "100", "--lr", "1e-3", "--batch-size", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "accuracy" and out["classes"] == 4 and 0.0 <= out["test"] <= 1.0
    assert out["best_epoch"] <= 6  # --epochs bounds the run


def test_text_init_reads_hugging_face_bert_files_and_our_exports(tmp_path):
    from safetensors.torch import save_file
    from train_fixtures import TINY_TEXT

    from m2d2_embed.text import BertTextEncoder
    from m2d2_embed.train.stages import load_text_weights

    torch.manual_seed(0)
    src = BertTextEncoder(TINY_TEXT)
    hf = {
        ("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in src.state_dict().items()
    }
    hf["cls.predictions.bias"] = torch.zeros(3)  # a pre-training head tensor, ignored
    save_file(hf, str(tmp_path / "model.safetensors"))
    dst = BertTextEncoder(TINY_TEXT)
    load_text_weights(dst, str(tmp_path))
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    save_file(
        {"bert.embeddings.word_embeddings.weight": src.embeddings.word_embeddings.weight},
        str(tmp_path / "partial.safetensors"),
    )
    with pytest.raises(ValueError, match="lacks text encoder tensors"):
        load_text_weights(BertTextEncoder(TINY_TEXT), str(tmp_path / "partial.safetensors"))


def test_stage1_runs_under_bf16_autocast_and_estimates_norm_stats(synth, tmp_path):
    cfg = stage1_config(synth, tmp_path, max_steps=1, amp="bf16")
    cfg.data.norm_stats = "auto"
    trainer = setup_stage1(cfg, DistInfo())
    fe = trainer.model.model_config.frontend
    assert (fe.norm_mean, fe.norm_std) != (-7.1, 4.2) and -20 < fe.norm_mean < 0 < fe.norm_std
    trainer.fit()
    _, cfg_out = read_any(tmp_path / "model")
    assert cfg_out.frontend.norm_mean == pytest.approx(fe.norm_mean)  # exported with the data's statistics


def _unused_trainable(model: torch.nn.Module, batch: dict) -> list[str]:
    loss, _ = model(batch, torch.Generator().manual_seed(0))
    loss.backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_every_trainable_tensor_gets_a_gradient_as_ddp_requires(synth, stage1_model, tmp_path):
    for trainer in (
        setup_stage1(stage1_config(synth, tmp_path / "1"), DistInfo()),
        setup_stage2(stage2_config(synth, stage1_model, tmp_path / "2"), DistInfo()),
        setup_finetune(finetune_config(synth, stage1_model, tmp_path / "3"), DistInfo()),
    ):
        assert _unused_trainable(trainer.model, _fixed_batch(trainer, 4)) == []


def test_refinement_stage_continues_the_stage2_clap_side(synth, stage1_model, tmp_path):
    first = setup_stage2(stage2_config(synth, stage1_model, tmp_path / "s2", max_steps=1), DistInfo())
    first.fit()
    cfg = stage2_config(synth, tmp_path / "s2" / "model", tmp_path / "s21", max_steps=1)
    cfg.init_clap, cfg.mask_ratio = True, 0.0
    refine = setup_stage2(cfg, DistInfo())
    for name in ("audio_proj", "text_encoder"):
        a, b = getattr(first.model, name).state_dict(), getattr(refine.model, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} must start from the stage 2 model"
    with pytest.raises(ValueError, match="init_clap needs a stage 2 model"):
        cfg1 = stage2_config(synth, stage1_model, tmp_path / "bad")
        cfg1.init_clap = True
        setup_stage2(cfg1, DistInfo())


def test_stage1_continues_from_a_pretrained_model(synth, stage1_model, tmp_path):
    cfg = stage1_config(synth, tmp_path)
    cfg.init_from = str(stage1_model)
    model = setup_stage1(cfg, DistInfo()).model
    sd, _ = read_any(stage1_model)
    assert all(torch.equal(v, sd["encoder." + k]) for k, v in model.encoder.state_dict().items())
    assert all(torch.equal(v, sd["audio_proj." + k]) for k, v in model.audio_proj.state_dict().items())
    assert torch.equal(model.m2d.target.blocks[0].attn.qkv.weight, model.encoder.blocks[0].attn.qkv.weight)


def test_stage2_bert_trains_with_dropout_and_evaluates_without(synth, stage1_model, tmp_path):
    from m2d2_embed.text import BertTextEncoder

    trainer = setup_stage2(stage2_config(synth, stage1_model, tmp_path), DistInfo())
    text = trainer.model.text_encoder
    plain = BertTextEncoder(text.config)
    plain.load_state_dict(text.state_dict())  # same keys: dropout adds no tensors
    ids = torch.randint(1000, 2000, (3, 12))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    trainer.model.train()
    a, b = text(ids, mask), text(ids, mask)
    assert not torch.allclose(a, b), "dropout is active while training"
    trainer.model.eval()
    torch.testing.assert_close(text(ids, mask), plain.eval()(ids, mask), rtol=0, atol=0)
    # 512-token captions fit when the text encoder has 512 positions
    cfg = stage2_config(synth, stage1_model, tmp_path / "long")
    cfg.max_text_tokens = 100
    with pytest.raises(ValueError, match="exceeds the text encoder's 64 positions"):
        setup_stage2(cfg, DistInfo())
