"""CPU inference (issue 14): the fused oneDNN float32 path, full-range int8 on VNNI CPUs, the bf16 and
compile-on-CPU warnings, and compiled micro-batches that are not padded on the CPU."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import m2d2_embed as m2d2
from m2d2_embed import encoder as E
from m2d2_embed import loader
from m2d2_embed.model import _bucket

needs_onednn = pytest.mark.skipif(not E.onednn_linear_available(), reason="this PyTorch build lacks oneDNN linear ops")


@pytest.fixture()
def tiny(tiny_model_dir):
    return m2d2.load(tiny_model_dir, device="cpu", dtype="fp32")


def plain_copy(model):
    m = copy.deepcopy(model)
    for b in m.modules():
        if isinstance(b, E.Block):
            b.unpack()
    return m


# -- fused float32 path -----------------------------------------------------------------------------------------


@needs_onednn
def test_cpu_fp32_load_uses_the_fused_path_and_matches_the_plain_one(tiny):
    assert all(b.packed for b in tiny.encoder.blocks) and all(b.packed for b in tiny.audio_proj.sem_blocks)
    ref = plain_copy(tiny)
    x = torch.randn(3, 1, 80, 16 * 17)
    with torch.inference_mode():
        got, want = tiny.encoder(x), ref.encoder(x)
    assert (got - want).abs().max() < 1e-5
    wav = torch.randn(2, 16000 * 12) * 0.1  # two chunks: 10 s and 2 s
    assert (tiny.clap_audio_embeddings(wav, 16000) - ref.clap_audio_embeddings(wav, 16000)).abs().max() < 1e-5


@needs_onednn
def test_fused_path_follows_new_weights_moves_and_pickling(tiny):
    x = torch.randn(2, 1, 80, 16 * 62)
    enc = tiny.encoder
    sd = {k: v * 1.5 for k, v in enc.state_dict().items()}
    enc.load_state_dict(sd)  # packed again from the new weights
    assert all(b.packed for b in enc.blocks)
    with torch.inference_mode():
        got, want = enc(x), plain_copy(tiny).encoder(x)
    assert (got - want).abs().max() < 1e-5
    clone = pickle.loads(pickle.dumps(enc))
    assert all(b.packed for b in clone.blocks)
    with torch.inference_mode():
        assert (clone(x) - got).abs().max() < 1e-6
    enc.to(torch.bfloat16)
    assert not any(b.packed for b in enc.blocks)  # no stale float32 copies behind bf16 weights


@needs_onednn
def test_fused_path_is_not_used_with_autograd_or_in_training(tiny):
    x = torch.randn(1, 1, 80, 16 * 4)
    y = tiny.encoder(x)  # grad mode: the plain path, so gradients flow to the Linear weights
    y.sum().backward()
    assert tiny.encoder.blocks[0].mlp.fc1.weight.grad is not None


@needs_onednn
def test_fused_path_steps_aside_under_cpu_autocast(tiny):
    x = torch.randn(2, 1, 80, 16 * 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny.encoder(x)  # the packed float32 ops would meet bf16 activations and fail
        want = plain_copy(tiny).encoder(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- int8 --------------------------------------------------------------------------------------------------------


def test_int8_uses_full_range_activations_only_with_vnni(tiny_model_dir, monkeypatch):
    for full in (True, False):
        monkeypatch.setattr(loader, "cpu_int8_full_range", lambda full=full: full)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = m2d2.load(tiny_model_dir, device="cpu", dtype="int8")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        names = {type(m).__name__ for m in q.encoder.modules() if isinstance(m, DynamicLinear)}
        assert names == ({"FullRangeInt8Linear"} if full else {"Linear"})


@pytest.mark.skipif(not E.cpu_int8_full_range(), reason="CPU without AVX512-VNNI/AMX: 7-bit activations kept")
def test_full_range_int8_linear_is_closer_to_fp32_than_7_bit():
    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 768)
    x = torch.randn(311, 768)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
        seven = quantize_dynamic(torch.nn.Sequential(lin), spec, dtype=torch.qint8)
        full = quantize_dynamic(
            torch.nn.Sequential(lin),
            spec,
            dtype=torch.qint8,
            mapping={torch.nn.Linear: loader._full_range_int8_linear()},
        )
    with torch.no_grad():
        ref = lin(x)
        err7, err8 = (seven(x) - ref).abs().mean(), (full(x) - ref).abs().mean()
    assert err8 < 0.75 * err7


# -- precision and compile warnings -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16, "fp16"])
def test_half_precision_on_a_cpu_without_native_bf16_warns(monkeypatch, dtype):
    monkeypatch.setattr(loader, "cpu_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="without native bfloat16.*0.3x"):
        assert loader.resolve_dtype(dtype, torch.device("cpu")) in (torch.bfloat16, torch.float16)


def test_no_precision_warning_where_it_pays_or_does_not_apply(monkeypatch):
    monkeypatch.setattr(loader, "cpu_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
        monkeypatch.setattr(loader, "cpu_native_bf16", lambda: False)
        assert loader.resolve_dtype(None, torch.device("cpu")) == torch.float32
        assert loader.resolve_dtype("int8", torch.device("cpu")) == "int8"


def test_compile_on_cpu_warns_and_skips_the_fused_path(tiny_model_dir):
    with pytest.warns(RuntimeWarning, match="compile=True on the CPU"):
        m = m2d2.load(tiny_model_dir, device="cpu", dtype="fp32", compile=True)  # compiles lazily: cheap here
    assert not any(b.packed for b in m.encoder.blocks)


# -- compiled micro-batches -----------------------------------------------------------------------------------------


def test_bucket_splits_on_cpu_and_pads_on_cuda():
    assert _bucket(6, 32, None) == (4, 4)  # 6 chunks: 4 + 2, never padded to 8
    assert _bucket(2, 32, None) == (2, 2)
    assert _bucket(32, 32, None) == (32, 32)
    assert _bucket(1, 200, None) == (1, 3)  # below the smallest size (200 >> 6): padded
    assert _bucket(6, 256, 16) == (6, 16)  # CUDA: a batch below 16 costs as much as 16
    assert _bucket(40, 256, 16) == (40, 64)


def test_six_compiled_chunks_on_cpu_run_as_four_and_two(tiny):
    wav = torch.randn(16000 * 60) * 0.1  # 60 s: six full 10-s chunks
    want = tiny.frame_embeddings(wav, 16000)
    sizes: list[int] = []
    tiny.encoder.register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    tiny.compiled = True  # the compiled-encoder path of _run_encoder (the encoder itself stays eager here)
    got = tiny.frame_embeddings(wav, 16000)
    assert sizes == [4, 2]
    assert torch.allclose(got, want, atol=1e-6)
