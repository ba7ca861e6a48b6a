"""CUDA: fp32 parity with the reference (TF32 off), bf16 agreement with fp32, the default dtype, dtype='fp8'
(compute capability 8.9+: the kernel against its emulation, agreement per level against issue 16's targets, a clip
alone vs in a batch). Skipped without CUDA (fp8 also below capability 8.9). Also, on any device, the padded
micro-batches of the compiled-encoder path (checked without compiling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from golden import assert_close
from golden import to_numpy as to_np
from tiny import tiny_model

import m2d2_embed as m2d2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CASES = ["len0p5s", "len3p3s", "len10s", "len10p01s", "len25p7s", "batch3"]  # fp32, TF32 off: the parity tolerances


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def cuda_models(parity_checkpoint):
    return (
        m2d2.load(parity_checkpoint, device="cuda", dtype="fp32"),
        m2d2.load(parity_checkpoint, device="cuda", dtype="bf16"),
    )


def min_cosine(a, b) -> float:
    a, b = torch.as_tensor(to_np(a), dtype=torch.float64), torch.as_tensor(to_np(b), dtype=torch.float64)
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).min())


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_fp32_on_cuda_matches_reference_with_tf32_off(cuda_models, golden, no_tf32, case):
    model = cuda_models[0]
    wav = torch.from_numpy(golden[f"{case}.wav"]).cuda()
    assert_close(model.frame_embeddings(wav, 16000), golden[f"{case}.encode_stacked"], "encode_stacked")
    assert_close(model.frame_embeddings(wav, 16000, reduce="mean"), golden[f"{case}.frames"], "frames")
    assert_close(model.clip_embeddings(wav, 16000), golden[f"{case}.scene"], "scene")
    assert_close(model.clap_audio_embeddings(wav, 16000), golden[f"{case}.clap_audio"], "clap_audio")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_fp32_text_embeddings_on_cuda_match_reference(cuda_models, golden, no_tf32):
    caps = [str(c) for c in golden["text.captions"]]
    assert_close(cuda_models[0].clap_text_embeddings(caps), golden["text.emb"], "text.emb")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_agrees_with_fp32_on_cuda(cuda_models, golden, no_tf32):
    fp32, bf16 = cuda_models
    for case in CASES:
        wav = torch.from_numpy(golden[f"{case}.wav"]).cuda()
        for method, kw in [
            ("frame_embeddings", {}),
            ("frame_embeddings", {"reduce": "mean"}),
            ("clip_embeddings", {}),
            ("clap_audio_embeddings", {}),
        ]:
            c = min_cosine(getattr(bf16, method)(wav, 16000, **kw), getattr(fp32, method)(wav, 16000, **kw))
            assert c >= 0.999, f"{case} {method} {kw}: min cosine {c:.5f}"
    caps = [str(c) for c in golden["text.captions"]]
    assert min_cosine(bf16.clap_text_embeddings(caps), fp32.clap_text_embeddings(caps)) >= 0.999


@needs_cuda
@pytest.mark.gpu
def test_default_dtype_on_cuda_is_bf16_with_float32_outputs():
    model = tiny_model()
    from m2d2_embed.loader import resolve_dtype

    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    model.encoder.to("cuda", torch.bfloat16)
    model.audio_proj.to("cuda", torch.bfloat16)
    model.frontend.to("cuda")
    out = model.clip_embeddings(torch.randn(2, 16000, device="cuda"), 16000)
    assert out.dtype == torch.float32 and out.is_cuda


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_compiled_path_padding_leaves_real_rows_unchanged(device):
    # the compiled path pads full-chunk micro-batches to a bucket size and runs other widths eagerly;
    # exercised here with the eager encoder standing in for the compiled one
    model = tiny_model().to(device)
    waves = [
        torch.randn(n, generator=torch.Generator().manual_seed(n)).mul(0.1).to(device)
        for n in (160000, 160000, 411200, 52800, 320000)
    ]
    plain = model.frame_embeddings(waves, 16000, batch_size=8)
    model.compiled = True
    padded = model.frame_embeddings(waves, 16000, batch_size=8)
    for a, b in zip(plain, padded):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_embed_files_on_cuda_equals_the_in_memory_path_with_pinned_async_batches(
    tiny_model_dir, tmp_path, no_tf32, monkeypatch, workers
):
    import soundfile as sf
    from audio_files import signal

    from m2d2_embed import files

    model = m2d2.load(tiny_model_dir, device="cuda", dtype="fp32")
    specs = [(1.0, 16000, 1), (1.0, 16000, 2), (1.0, 44100, 3), (2.5, 22050, 4), (10.0, 16000, 5), (12.5, 16000, 6)]
    for k, (secs, sr, seed) in enumerate(specs):
        sf.write(tmp_path / f"{k}.wav", signal(secs, sr, 1, seed), sr, subtype="PCM_16" if k % 2 else "FLOAT")
    (tmp_path / "9_corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    good = sorted(str(p) for p in tmp_path.glob("[0-8].wav"))
    waves = [torch.from_numpy(m2d2.load_audio(p)).cuda() for p in good]
    seen = []
    launch = files._launch

    def spy(m, groups, *a, **kw):
        fl = launch(m, groups, *a, **kw)
        seen.append((all(x.is_pinned() for _, x in groups), fl.host.is_pinned(), fl.event is not None))
        return fl

    monkeypatch.setattr(files, "_launch", spy)
    refs = {
        "clip": model.clip_embeddings(waves, 16000),
        "frame": model.frame_embeddings(waves, 16000),
        "clap": model.clap_audio_embeddings(waves, 16000),
    }
    for level, ref in refs.items():
        es = model.embed_files(tmp_path, level=level, batch_size=3, num_workers=workers, progress=False)
        assert es.paths == good and [f.path for f in es.failures] == [str(tmp_path / "9_corrupt.wav")]
        for got, want in zip(es.embeddings, ref):
            np.testing.assert_allclose(got, to_np(want), atol=2e-5, rtol=1e-4)
    assert len(seen) >= 9 and all(s == (True, True, True) for s in seen), seen  # pinned in, pinned out, events


# -- dtype="fp8" (compute capability 8.9+) -----------------------------------------------------------------------


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8 = pytest.mark.skipif(
    not _fp8_gpu(), reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+)"
)
# floors vs fp32 on the random synthetic weights, under what the CPU emulation measures on all 8 parity inputs
# (frame, frame_mean, clip, clap): dtype="fp8" (FP8 in the later half of the blocks) 0.9988, 0.9991, 0.9990,
# 0.9992, within issue 16's targets (0.998 frames, 0.999 clip and CLAP; gpu_check.py reports them); "fp8-all"
# 0.9948, 0.9956, 0.9964, 0.9969, below them
FP8_FLOORS = {
    "fp8": {"frame": 0.998, "frame_mean": 0.9985, "clip": 0.9985, "clap": 0.9985},
    "fp8-all": {"frame": 0.993, "frame_mean": 0.994, "clip": 0.995, "clap": 0.995},
}


@pytest.fixture(scope="module")
def fp8_models(parity_checkpoint):
    return {d: m2d2.load(parity_checkpoint, device="cuda", dtype=d) for d in FP8_FLOORS}


@needs_fp8
@pytest.mark.gpu
@pytest.mark.slow
def test_fp8_loads_with_fp8_linears_and_bf16_elsewhere(fp8_models):
    from m2d2_embed.fp8 import FP8Linear

    for dtype, model in fp8_models.items():
        depth = model.config.encoder.depth
        first = depth // 2 if dtype == "fp8" else 0
        layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
        assert len(layers) == 4 * (depth - first) and not any(m.emulate for m in layers)
        assert all(m.weight.is_cuda and m.weight.dtype == torch.float8_e4m3fn for m in layers)
        assert model.dtype == torch.bfloat16 and model.quantization == dtype
        if first:  # the earlier blocks keep bfloat16 nn.Linear layers
            assert isinstance(model.encoder.blocks[first - 1].mlp.fc1, torch.nn.Linear)


@needs_fp8
@pytest.mark.gpu
def test_fp8_matmul_on_the_gpu_computes_what_the_emulation_computes():
    from m2d2_embed.fp8 import FP8Linear

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(768, 3072).cuda()
    x = torch.randn(311, 768, generator=g).cuda().bfloat16()
    got = FP8Linear.from_linear(lin)(x).float()
    want = FP8Linear.from_linear(lin, emulate=True)(x).float()
    assert float((got - want).abs().max()) <= 2**-7 * float(want.abs().max())  # only accumulation order differs


@needs_fp8
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(FP8_FLOORS))
def test_fp8_agrees_with_fp32_per_level_on_parity_inputs(cuda_models, fp8_models, golden, no_tf32, dtype):
    # the GPU kernel must do as well as the emulation does on these weights (see FP8_FLOORS)
    fp32, fp8_model, floors = cuda_models[0], fp8_models[dtype], FP8_FLOORS[dtype]
    got: dict[str, float] = {}
    for case in CASES:
        wav = torch.from_numpy(golden[f"{case}.wav"]).cuda()
        for level, method, kw in [
            ("frame", "frame_embeddings", {}),
            ("frame_mean", "frame_embeddings", {"reduce": "mean"}),
            ("clip", "clip_embeddings", {}),
            ("clap", "clap_audio_embeddings", {}),
        ]:
            c = min_cosine(getattr(fp8_model, method)(wav, 16000, **kw), getattr(fp32, method)(wav, 16000, **kw))
            got[level] = min(got.get(level, 1.0), c)
    assert all(got[k] >= v for k, v in floors.items()), f"{dtype}: min cosine vs fp32 {got}, floors {floors}"
    assert all(v < 0.99999 for v in got.values()), f"no quantization happened? {got}"


@needs_fp8
@pytest.mark.gpu
@pytest.mark.slow
def test_fp8_clip_alone_equals_the_clip_in_a_batch(fp8_models):
    fp8_model = fp8_models["fp8-all"]
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(5, 160000, generator=g) * torch.tensor([0.01, 1.0, 0.1, 3.0, 0.3])[:, None]).cuda()
    alone = fp8_model.frame_embeddings(batch[3], 16000)
    together = fp8_model.frame_embeddings(batch, 16000)[3]
    assert min_cosine(together, alone) >= 0.99999
    torch.testing.assert_close(together, alone, rtol=2e-2, atol=2e-2)  # bf16 kernels may pick other tilings
