"""dtype='fp8' without a GPU: the refusals, and the FP8Linear plumbing under its float32 emulation (``fp8.EMULATE``).

The emulation rounds weights (per output channel) and activations (per token) to float8_e4m3fn exactly as the GPU
path does and multiplies in float32; only the accumulation order differs from ``torch._scaled_mm`` on a GPU. The
agreement checked here is that of random synthetic weights (tests/test_cuda.py checks the GPU's on the same
inputs against the issue's targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

import m2d2_embed as m2d2
from m2d2_embed import fp8
from m2d2_embed.fp8 import E4M3_MAX, FP8Linear, quantize_encoder, quantize_rows
from m2d2_embed.loader import resolve_dtype

CASES = ["len3p3s", "len10p01s"]  # one short chunk; a full chunk plus a one-frame chunk
# measured on the seed-0 synthetic (random) weights with the emulation, every parity input: frames 0.9948,
# frames averaged over frequency 0.9956, clip 0.9964, CLAP 0.9969 (the GPU targets are 0.998 / 0.999)
# floors under what the float32 emulation gives on the synthetic parity weights (CASES below; frame, clip, CLAP):
# dtype="fp8" (FP8 in blocks 6-11) 0.9988 / 0.9992 / 0.9993, within the 0.998 / 0.999 / 0.999 targets;
# "fp8-all" 0.9948 / 0.9971 / 0.9972, below them
EMULATED_MIN_COSINE = {
    "fp8": {"frame": 0.998, "clip": 0.9985, "clap": 0.999},
    "fp8-all": {"frame": 0.993, "clip": 0.995, "clap": 0.995},
}


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(fp8, "EMULATE", True)


def min_cosine(a, b) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).min())


# -- refusals ----------------------------------------------------------------------------------------------------


def test_fp8_on_the_cpu_is_refused_with_what_to_use_instead(tiny_model_dir):
    for name in ("fp8", "float8", "FP8_E4M3"):
        with pytest.raises(ValueError, match=r"needs an NVIDIA GPU with FP8 tensor cores.*8\.9.*use fp32 or int8"):
            m2d2.load(tiny_model_dir, device="cpu", dtype=name)


def test_fp8_on_a_gpu_older_than_ada_names_the_gpu_and_its_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"NVIDIA A100-SXM4-80GB \(compute capability 8\.0\).*use dtype='bf16'"):
        resolve_dtype("fp8", torch.device("cuda"))


def test_fp8_with_a_pytorch_lacking_the_fp8_matmul_says_to_upgrade(monkeypatch):
    monkeypatch.delattr(torch, "_scaled_mm")
    with pytest.raises(RuntimeError, match=r"torch\._scaled_mm.*PyTorch .*upgrade"):
        resolve_dtype("fp8", torch.device("cuda"))


def test_fp8_is_accepted_on_an_fp8_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_dtype("float8", torch.device("cuda")) == "fp8"
    assert resolve_dtype("FP8-all", torch.device("cuda")) == resolve_dtype("fp8_all", torch.device("cuda")) == "fp8-all"


# -- FP8Linear ---------------------------------------------------------------------------------------------------


def test_weight_scales_are_per_output_channel_amax_over_448():
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[3].zero_()  # an all-zero channel quantizes to zeros, not NaN
    q = FP8Linear.from_linear(lin, emulate=True)
    amax = lin.weight.detach().abs().amax(dim=1)
    want = torch.where(amax > 0, amax / E4M3_MAX, torch.full_like(amax, 1e-12 / E4M3_MAX))
    torch.testing.assert_close(q.weight_scale, want[None], rtol=0, atol=0)
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.shape == (16, 32) and q.weight.is_contiguous()
    assert q.weight.float().abs().amax(dim=1)[torch.arange(16) != 3].eq(E4M3_MAX).all()  # full range per channel
    assert q.weight[3].float().eq(0).all()
    # dequantised weights within half an e4m3 step (3 mantissa bits: 2^-4 relative) of the originals
    err = (q.weight.float() * q.weight_scale.T - lin.weight.detach()).abs()
    assert (err <= lin.weight.detach().abs() * 2**-4 + q.weight_scale.T * 2**-9).all()


def test_emulated_fp8_linear_equals_a_hand_computed_quantised_matmul():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 48, generator=g))
    x = (torch.randn(2, 5, 48, generator=g) * torch.logspace(-2, 2, 5)[None, :, None]).bfloat16()  # rows of any size
    q = FP8Linear.from_linear(lin, emulate=True)
    y = q(x)
    # by hand: per-token and per-channel amax / 448, round to e4m3, multiply back, exact (float64) matmul, bias
    xf, w = x.float().reshape(10, 48), lin.weight.detach()
    sx = xf.abs().amax(1, keepdim=True) / 448
    sw = w.abs().amax(1, keepdim=True) / 448
    xd = (xf / sx).to(torch.float8_e4m3fn).double() * sx.double()
    wd = (w / sw).to(torch.float8_e4m3fn).double() * sw.double()
    want = xd @ wd.T + lin.bias.detach().bfloat16().double()
    assert y.shape == (2, 5, 32) and y.dtype == torch.bfloat16
    # equal up to the final rounding to bfloat16 (half a step: at most 2^-8 relative) and float32 accumulation
    err = (y.reshape(10, 32).double() - want).abs()
    assert (err <= 2**-8 * want.abs() + 1e-6 * want.abs().max()).all(), float(err.max())
    assert (y.float().reshape(10, 32) - x.float().reshape(10, 48) @ w.T - lin.bias.detach()).abs().max() > 0
    x8, scale = quantize_rows(x.reshape(10, 48))
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (10, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_rows_is_the_clamped_division_by_amax_over_448_bit_for_bit(dtype):
    # the three-pass quantization (no clamp) gives the same bits as the textbook one, at every magnitude a row
    # can have, and never leaves the e4m3 range: the rounding of the scale cannot push |x| / scale past 448
    g = torch.Generator().manual_seed(3)
    mags = [1e-3, 1.0, 1e3] + ([1e-30, 1e-6, 1e30] if dtype != torch.float16 else [])  # float16 overflows past 6e4
    for mag in mags:
        x = (torch.randn(256, 96, generator=g) * torch.rand(256, 1, generator=g) ** 4 * mag).to(dtype)
        x[7] = 0  # an all-zero row quantizes to zeros, not NaN
        x8, scale = quantize_rows(x)
        want_scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
        want = (x.float() / want_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        assert torch.equal(scale, want_scale) and scale.dtype == torch.float32
        assert torch.equal(x8.view(torch.uint8), want.view(torch.uint8)), mag
        above_floor = x.float().abs().amax(-1) >= 1e-12  # rows below the scale's floor stay small
        if mag >= 1e-3:  # (the tinier rows test the floor)
            assert above_floor.sum() > 200
        assert x8.float().abs().amax(-1)[above_floor].eq(E4M3_MAX).all()  # each row spans the full range
        assert not x8.float().isnan().any() and x8[7].float().eq(0).all()


def test_fp8_linear_rows_do_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(1)
    q = FP8Linear.from_linear(torch.nn.Linear(64, 32), emulate=True)
    x = torch.randn(6, 64, generator=g).bfloat16()
    loud = torch.cat([x, 1000 * torch.randn(1, 64, generator=g).bfloat16()])  # a per-tensor scale would change
    torch.testing.assert_close(q(loud)[:6], q(x), rtol=0, atol=0)


def test_the_real_fp8_matmul_call_agrees_with_the_emulation():
    # PyTorch's CPU build has a reference torch._scaled_mm: the same call as on the GPU (operand layout, scale
    # shapes, bias, output dtype) must compute what the emulation computes
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 7, 64, generator=g).bfloat16()
    try:
        got = FP8Linear.from_linear(lin)(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this PyTorch build has no CPU torch._scaled_mm with row-wise scales: {e}")
    want = FP8Linear.from_linear(lin, emulate=True)(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)


def test_torch_compile_traces_the_real_fp8_linear():
    # load(dtype="fp8", compile=True) compiles blocks holding FP8Linear: the real (not emulated) layer must trace
    # (buffers, torch._scaled_mm, the per-token quantization) and give what eager gives; checked on the CPU kernel
    g = torch.Generator().manual_seed(3)
    layer = FP8Linear.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(2, 5, 64, generator=g).bfloat16()
    try:
        eager = layer(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this PyTorch build has no CPU torch._scaled_mm with row-wise scales: {e}")
    torch.testing.assert_close(torch.compile(layer)(x), eager, rtol=0, atol=0)


def test_fp8_linear_keeps_its_dtypes_through_model_casts():
    q = FP8Linear.from_linear(torch.nn.Linear(32, 16), emulate=True)
    q.to(torch.bfloat16).float().half()
    assert (q.weight.dtype, q.weight_scale.dtype, q.bias.dtype) == (torch.float8_e4m3fn, torch.float32, torch.bfloat16)


def test_quantize_encoder_swaps_the_four_linears_of_every_block_only():
    model = tiny_model()
    assert quantize_encoder(model.encoder, emulate=True) == 4 * model.config.encoder.depth
    for blk in model.encoder.blocks:
        assert all(isinstance(m, FP8Linear) for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2))
    later = tiny_model()
    assert quantize_encoder(later.encoder, emulate=True, first_block=1) == 4 * (later.config.encoder.depth - 1)
    kinds = [[type(m) for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)] for b in later.encoder.blocks]
    assert kinds[0] == [torch.nn.Linear] * 4 and all(k == [FP8Linear] * 4 for k in kinds[1:])
    assert not any(isinstance(m, FP8Linear) for m in model.audio_proj.modules())  # the CLAP head stays bf16
    assert isinstance(model.encoder.patch_embed.proj, torch.nn.Conv2d)


# -- the whole model through load(dtype="fp8"), emulated ----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp8", "fp8-all"])
def test_emulated_fp8_model_is_bf16_with_fp8_encoder_linears(tiny_model_dir, emulate, dtype):
    model = m2d2.load(tiny_model_dir, device="cpu", dtype=dtype)
    assert model.quantization == dtype and model.dtype == torch.bfloat16 and f"quantization='{dtype}'" in repr(model)
    depth = model.config.encoder.depth
    first = depth // 2 if dtype == "fp8" else 0  # "fp8": the later half of the blocks
    for i, blk in enumerate(model.encoder.blocks):
        want = FP8Linear if i >= first else torch.nn.Linear
        assert all(type(m) is want for m in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2)), (i, want)
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == 4 * (depth - first) and all(m.emulate for m in fp8_layers)
    others = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    assert others and all(p.dtype == torch.bfloat16 for p in others)  # LayerNorm, patch embedding, heads, text
    out = model.clip_embeddings(torch.randn(2, 16000), 16000)
    assert out.dtype == torch.float32 and out.shape == (2, model.frame_dim)


def test_emulated_fp8_clip_alone_equals_the_clip_in_a_batch(tiny_model_dir, emulate):
    model = m2d2.load(tiny_model_dir, device="cpu", dtype="fp8")
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 32000, generator=g) * torch.tensor([0.01, 1.0, 0.1, 3.0])[:, None]
    alone = model.frame_embeddings(batch[2], 16000)
    torch.testing.assert_close(model.frame_embeddings(batch, 16000)[2], alone, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_emulated_fp8_agrees_with_fp32_on_parity_inputs(parity_checkpoint, golden, monkeypatch):
    ref = m2d2.load(parity_checkpoint, device="cpu", dtype="fp32")
    monkeypatch.setattr(fp8, "EMULATE", True)
    waves = [golden[f"{c}.wav"][0] for c in CASES]
    got = {}
    for dtype in EMULATED_MIN_COSINE:
        q = m2d2.load(parity_checkpoint, device="cpu", dtype=dtype)
        got[dtype] = {
            "frame": min(min_cosine(q.frame_embeddings(w, 16000), ref.frame_embeddings(w, 16000)) for w in waves),
            "clip": min_cosine(q.clip_embeddings(waves, 16000), ref.clip_embeddings(waves, 16000)),
            "clap": min_cosine(q.clap_audio_embeddings(waves, 16000), ref.clap_audio_embeddings(waves, 16000)),
        }
        assert all(got[dtype][k] >= v for k, v in EMULATED_MIN_COSINE[dtype].items()), got
        assert all(v < 0.99999 for v in got[dtype].values()), got  # the layers really are quantized
    assert all(got["fp8"][k] > got["fp8-all"][k] for k in got["fp8"]), got  # bf16 early blocks: closer everywhere


def test_cli_dtype_fp8_on_the_cpu_fails_with_the_loaders_message(tiny_model_dir, tmp_path, capsys):
    import soundfile as sf

    from m2d2_embed import cli

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    argv = ["embed", str(wav), "-o", str(tmp_path / "a.npz"), "--model", str(tiny_model_dir), "--device", "cpu"]
    assert cli.main([*argv, "--dtype", "fp8", "--num-workers", "0", "--no-progress"]) != 0
    assert "needs an NVIDIA GPU with FP8 tensor cores" in capsys.readouterr().err
    assert not (tmp_path / "a.npz").exists()
