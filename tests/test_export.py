"""`m2d2-embed export MODEL --format onnx -o DIR`: the ONNX encoder and CLAP head run in ONNX Runtime and match
torch float32, with dynamic batch and chunk width; the manifest carries the front-end settings and norm stats."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import m2d2_embed as m2d2
from m2d2_embed import cli

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    assert cli.main(["export", str(tiny_model_dir), "--format", "onnx", "-o", str(out)]) == 0
    return out, m2d2.load(tiny_model_dir, device="cpu", dtype="fp32")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("batch", "time_patches"), [(1, 62), (3, 17), (2, 1)])
def test_onnx_encoder_matches_torch_fp32(exported, batch, time_patches):
    out, model = exported
    x = torch.randn(batch, 1, 80, 16 * time_patches, generator=torch.Generator().manual_seed(time_patches))
    with torch.inference_mode():
        want = model.encoder(x).numpy()
    got = session(out / "encoder.onnx").run(["tokens"], {"lms": x.numpy()})[0]
    assert got.shape == want.shape == (batch, 5 * time_patches, 64)
    assert np.abs(got - want).max() < 1e-4


def test_onnx_pipeline_reproduces_clap_embeddings(exported):
    out, model = exported
    wav = torch.randn(2, 16000 * 4, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.inference_mode():
        lms = model.frontend(wav)  # [2, 1, 80, 401]: one chunk, zero-padded to 26 time patches (the manifest's rule)
    chunk = torch.nn.functional.pad(lms, (0, 26 * 16 - lms.shape[-1]))
    tokens = session(out / "encoder.onnx").run(None, {"lms": chunk.numpy()})[0]
    emb = session(out / "audio_head.onnx").run(["embedding"], {"tokens": tokens})[0]
    want = model.clap_audio_embeddings(wav, 16000).numpy()
    assert np.abs(emb - want).max() < 1e-4


def test_manifest_has_the_front_end_and_norm_stats(exported):
    out, model = exported
    m = json.loads((out / "m2d2_export.json").read_text())
    fe = dataclasses.asdict(model.config.frontend)
    assert {k: m["frontend"][k] for k in fe} == fe
    assert m["frontend"]["norm_mean"] == model.config.frontend.norm_mean
    assert m["encoder"]["output_shape"] == ["batch", "5 * t", 64] and m["encoder"]["time_patches_max"] == 62
    assert m["audio_head"]["file"] == "audio_head.onnx" and "redistribution" in m["licence"]
    assert not list(out.glob(".export-*"))  # no temporary folder left behind


def test_export_refuses_to_overwrite_an_existing_export(exported, tiny_model_dir, capsys):
    out, _ = exported
    assert cli.main(["export", str(tiny_model_dir), "-o", str(out)]) == 2  # bad usage: nothing done
    assert "--overwrite" in capsys.readouterr().err
