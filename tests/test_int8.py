"""dtype='int8' (dynamic int8 quantization of the Linear layers, CPU) agrees with float32 on the parity inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m2d2_embed as m2d2
from m2d2_embed.loader import resolve_dtype

CASES = ["len3p3s", "len10p01s"]  # one short chunk; a full chunk plus a one-frame chunk


@pytest.fixture(scope="module")
def fp32_and_int8(parity_checkpoint):
    return (
        m2d2.load(parity_checkpoint, device="cpu", dtype="fp32"),
        m2d2.load(parity_checkpoint, device="cpu", dtype="int8"),
    )


def min_cosine(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).min())


def test_int8_replaces_the_encoder_and_head_linears_with_quantized_ones(fp32_and_int8):
    _, q = fp32_and_int8
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    linears = [m for m in q.encoder.modules() if isinstance(m, torch.nn.Linear | DynamicLinear)]
    assert linears and all(isinstance(m, DynamicLinear) for m in linears)  # incl. the full-range subclass (VNNI)
    assert any("quantized" in type(m).__module__ for m in q.audio_proj.modules())
    assert q.dtype == torch.float32  # position embedding etc. stay float32; outputs are float32


def test_int8_embeddings_agree_with_fp32_on_parity_inputs(fp32_and_int8, golden):
    ref, q = fp32_and_int8
    waves = [golden[f"{c}.wav"][0] for c in CASES]
    assert min_cosine(q.clip_embeddings(waves, 16000), ref.clip_embeddings(waves, 16000)) >= 0.998
    assert min_cosine(q.clap_audio_embeddings(waves, 16000), ref.clap_audio_embeddings(waves, 16000)) >= 0.998
    short = waves[0]
    assert min_cosine(q.frame_embeddings(short, 16000), ref.frame_embeddings(short, 16000)) >= 0.997


def test_int8_is_cpu_only_and_not_compiled(parity_checkpoint):
    with pytest.raises(ValueError, match="CPU only"):
        resolve_dtype("int8", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile"):
        m2d2.load(parity_checkpoint, device="cpu", dtype="int8", compile=True)


def test_int8_outputs_record_int8_and_do_not_resume_a_float32_directory(tiny_model_dir, tmp_path, capsys):
    """A float32 output directory refuses an int8 run: int8 outputs used to be recorded as float32 and mixed in."""
    from m2d2_embed import cli
    from m2d2_embed.files import embedding_metadata

    q = m2d2.load(tiny_model_dir, device="cpu", dtype="int8")
    assert q.quantization == "int8" and embedding_metadata(q, "clip")["compute_dtype"] == "int8"
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    out = tmp_path / "out"
    base = ["embed", str(tmp_path / "a.wav"), "--model", str(tiny_model_dir), "--device", "cpu", "-o", str(out)]
    assert cli.main([*base, "--format", "npy"]) == 0
    assert cli.main([*base, "--format", "npy", "--dtype", "int8"]) != 0
    assert "compute_dtype: 'float32' there, 'int8' now" in capsys.readouterr().err
