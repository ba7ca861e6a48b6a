"""Upstream checkpoint layouts -> our format; safe loading; clear errors for what does not fit."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from tiny import save_upstream, tiny_config, tiny_model, upstream_state_dict

import m2d2_embed as m2d2
from m2d2_embed.convert import CheckpointError, from_state_dict, read_any

WAVE = (0.3 * np.sin(np.linspace(0, 2000, 3 * 16000))).astype(np.float32)


@pytest.mark.parametrize(
    ("layout", "folder", "head", "text"),
    [
        ("2025", "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025", "semantic", True),
        ("2024", "m2d_clap_vit_base-80x608p16x16-240128", "mlp", False),
        ("m2d", "m2d_vit_base-80x608p16x16-221006-mr7_enconly", None, False),
        ("evar", "m2d_vit_base-80x608p16x16-221006-mr7_as20k", None, False),
    ],
)
def test_upstream_layouts_load_and_match_the_model_they_hold(tmp_path, layout, folder, head, text):
    width = 1001 if "1001" in folder else 608
    cfg = tiny_config(head=head, text=text, width=width)
    path, model = save_upstream(tmp_path, layout, folder, config=cfg)
    loaded = m2d2.load(path, device="cpu")
    assert loaded.config.encoder == model.config.encoder
    assert (loaded.audio_proj is None) == (head is None)
    assert (loaded.text_encoder is None) == (not text)
    fe = loaded.config.frontend
    if layout in ("2024", "evar"):  # no norm_stats in the file: the upstream default applies
        assert (fe.norm_mean, fe.norm_std) == (-7.1, 4.2)
    else:
        assert (fe.norm_mean, fe.norm_std) == pytest.approx(
            (model.config.frontend.norm_mean, model.config.frontend.norm_std)
        )
    want = dict(model.state_dict())
    got = loaded.state_dict()
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


def test_training_only_tensors_are_dropped_and_reported(tmp_path, caplog):
    path, _ = save_upstream(
        tmp_path, "2024", "m2d_clap_vit_base-80x608p16x16-240128", config=tiny_config(head="mlp", text=False, width=608)
    )
    with caplog.at_level(logging.INFO, logger="m2d2_embed.convert"):
        m2d2.load(path, device="cpu")
    assert "ignored 3 training-only tensors (decoder_pred, logit_scale, target_blocks)" in caplog.text


def test_sample_rate_comes_from_the_folder_name(tmp_path):
    path, _ = save_upstream(
        tmp_path,
        "m2d",
        "m2d_vit_base-80x608p16x16p32k-240101_enconly",
        config=tiny_config(head=None, text=False, width=608),
    )
    cfg = read_any(path)[1]
    assert cfg.frontend.sample_rate == 32000 and cfg.frontend.n_fft == 800 and cfg.frontend.hop_length == 320


def test_missing_learned_tensor_fails(tmp_path):
    model = tiny_model(tiny_config())
    sd = upstream_state_dict(model, "2025")
    del sd["backbone.blocks.1.mlp.fc2.bias"]
    sd2, cfg = from_state_dict(sd, name="m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025")
    from m2d2_embed.loader import build_model

    with pytest.raises(CheckpointError, match="lacks 1 learned tensors.*encoder.blocks.1.mlp.fc2.bias"):
        build_model(sd2, cfg, torch.device("cpu"), torch.float32)


def test_unknown_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(CheckpointError, match="not an M2D checkpoint.*conv1.weight"):
        m2d2.load(path, device="cpu")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": logging.Formatter()}, path)  # an arbitrary class: not on the allow-list
    with pytest.raises(CheckpointError, match="not loaded.*untrusted"):
        m2d2.load(path, device="cpu")


def test_safetensors_without_our_config_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not written by m2d2_embed"):
        m2d2.load(tmp_path / "foreign.safetensors", device="cpu")


def test_converted_directory_has_readable_config(tmp_path):
    path, model = save_upstream(tmp_path, "2025")
    out = m2d2.convert(path, tmp_path / "conv")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"]["input_size"] == [80, 1001] and cfg["audio_head"]["kind"] == "semantic"
    loaded = m2d2.load(out, device="cpu")
    np.testing.assert_array_equal(
        loaded.clip_embeddings(WAVE, sample_rate=16000),
        m2d2.load(path, device="cpu").clip_embeddings(WAVE, sample_rate=16000),
    )
