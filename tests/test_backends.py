"""``load(backend="onnxruntime"|"openvino")``: the encoder runs in the other runtime from a cached ONNX export, and
every output matches the PyTorch float32 path in shape and value; the export cache is reused, survives damage and
never keeps a half-written export; bad settings and missing runtimes get clear errors."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import m2d2_embed as m2d2
import m2d2_embed.files  # noqa: F401
from m2d2_embed import backends, cli, loader
from m2d2_embed.encoder import cpu_flags

pytest.importorskip("onnxscript")

RUNTIMES = [
    pytest.param(
        "onnxruntime",
        marks=pytest.mark.skipif(not backends.runtime_installed("onnxruntime"), reason="onnxruntime not installed"),
    ),
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(not backends.runtime_installed("openvino"), reason="openvino not installed"),
    ),
]


@pytest.fixture(scope="module")
def export_cache(tiny_model_dir, tmp_path_factory):
    """A cache holding the tiny model's export, made once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    model = m2d2.load(tiny_model_dir, device="cpu", dtype="fp32")
    folder = backends.cached_export(model, cache).parent
    return cache, folder, model


def waves(n=3, seconds=12.5, seed=0):
    return torch.randn(n, int(16000 * seconds), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_backend_outputs_match_torch_fp32(tiny_model_dir, export_cache, runtime):
    cache, _, ref = export_cache
    model = m2d2.load(tiny_model_dir, device="cpu", backend=runtime, cache_dir=cache)
    assert model.backend == runtime and ref.backend == "torch"
    x = waves()  # 12.5 s: a full 10-s chunk and a short last one (two encoder widths)
    for method in ("frame_embeddings", "clip_embeddings", "clap_audio_embeddings"):
        want, got = getattr(ref, method)(x, 16000), getattr(model, method)(x, 16000)
        assert got.shape == want.shape and got.dtype == torch.float32, method
        assert (got - want).abs().max().item() < 1e-4, method
    # a clip alone equals the same clip in a batch
    alone = model.clip_embeddings(x[1], 16000)
    assert (alone - model.clip_embeddings(x, 16000)[1]).abs().max().item() < 1e-5
    # numpy in, numpy out, as with the torch backend
    assert isinstance(model.clip_embeddings(x[0].numpy(), 16000), np.ndarray)


def test_export_is_cached_and_reused(tiny_model_dir, export_cache, caplog):
    cache, folder, _ = export_cache
    record = (folder / backends.FILES_RECORD).stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="m2d2_embed"):
        m2d2.load(tiny_model_dir, device="cpu", backend="onnxruntime", cache_dir=cache)
    assert "exporting" not in caplog.text
    assert (folder / backends.FILES_RECORD).stat().st_mtime_ns == record
    assert [p.name for p in (cache / "onnx").iterdir()] == [folder.name]  # no temporary folders left
    manifest = json.loads((folder / "m2d2_export.json").read_text())
    assert manifest["encoder"]["file"] == "encoder.onnx"


def test_other_weights_get_their_own_export(tiny_model_dir, export_cache):
    _, folder, model = export_cache
    other = m2d2.load(tiny_model_dir, device="cpu", dtype="fp32")
    with torch.no_grad():
        other.encoder.blocks[0].mlp.fc2.weight[0, 0] += 1e-3  # one weight: a different encoder
    assert backends.encoder_digest(other) != backends.encoder_digest(model) == folder.name


@pytest.mark.parametrize("damage", ["truncate", "same_size", "delete_record"])
def test_damaged_export_is_made_again(tiny_model_dir, export_cache, tmp_path, caplog, damage):
    src_cache, folder, ref = export_cache
    cache = tmp_path / "cache"
    shutil.copytree(src_cache / "onnx", cache / "onnx")
    data = cache / "onnx" / folder.name / "encoder.onnx.data"
    raw = bytearray(data.read_bytes())
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "same_size":  # flipped bytes, new mtime: caught by the SHA-256
        raw[100:200] = bytes(100)
        data.write_bytes(raw)
        os.utime(data, ns=(1, 1))
    else:
        (cache / "onnx" / folder.name / backends.FILES_RECORD).unlink()
    with caplog.at_level(logging.INFO, logger="m2d2_embed"):
        model = m2d2.load(tiny_model_dir, device="cpu", backend="onnxruntime", cache_dir=cache)
    assert "exporting again" in caplog.text
    x = waves(1)
    assert (model.clip_embeddings(x, 16000) - ref.clip_embeddings(x, 16000)).abs().max().item() < 1e-4


def test_bad_settings_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match=r"unknown backend 'ort'; use one of torch, onnxruntime, openvino"):
        m2d2.load(tiny_model_dir, device="cpu", backend="ort")
    with pytest.raises(ValueError, match=r"backend='onnxruntime' runs float32 \(and onnxruntime int8\).*'fp32'"):
        m2d2.load(tiny_model_dir, device="cpu", dtype="bf16", backend="onnxruntime")
    with pytest.raises(ValueError, match=r"backend='openvino' runs float32 only .*backend='onnxruntime'"):
        m2d2.load(tiny_model_dir, device="cpu", dtype="int8", backend="openvino")
    with pytest.raises(ValueError, match=r"compile=True compiles the PyTorch encoder"):
        m2d2.load(tiny_model_dir, device="cpu", compile=True, backend="openvino")
    with pytest.raises(ValueError, match=r"runs the encoder on the CPU; it cannot run on meta"):
        backends.check_backend("onnxruntime", torch.device("meta"), torch.float32, False)


def test_missing_runtime_names_the_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(ImportError, match=r"backend='openvino' needs openvino: pip install 'm2d2-embed\[openvino\]'"):
        m2d2.load(tiny_model_dir, device="cpu", backend="openvino")


def test_cli_backend(tiny_model_dir, export_cache, tmp_path, capsys):
    cache, _, ref = export_cache
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(wav, waves(1, 3.0)[0].numpy() * 0.1, 16000)
    out = tmp_path / "out.npz"
    argv = ["embed", str(wav), "--model", str(tiny_model_dir), "--device", "cpu", "--cache-dir", str(cache)]
    assert cli.main([*argv, "--backend", "onnxruntime", "-o", str(out)]) == 0
    got = m2d2.read_embeddings(out)
    assert got.metadata["encoder_backend"] == "onnxruntime"
    want = ref.clip_embeddings(str(wav))
    assert np.abs(got.embeddings[0] - want).max() < 1e-4
    assert cli.main([*argv, "--backend", "openvino", "--dtype", "bf16", "-o", str(tmp_path / "x.npz")]) != 0
    assert "runs float32" in capsys.readouterr().err


def test_cache_clear_removes_the_exports(export_cache, tmp_path):
    src_cache, folder, _ = export_cache
    cache = tmp_path / "cache"
    shutil.copytree(src_cache / "onnx", cache / "onnx")
    summary = loader.cache_summary(cache)
    assert "onnx" in [e["name"] for e in summary["entries"]]
    assert cache / "onnx" in loader.clear_cache(None, cache)
    assert not (cache / "onnx").exists()


@pytest.mark.skipif(not backends.runtime_installed("onnxruntime"), reason="onnxruntime not installed")
def test_onnxruntime_int8(tiny_model_dir, export_cache):
    cache, folder, ref = export_cache
    model = m2d2.load(tiny_model_dir, device="cpu", dtype="int8", backend="onnxruntime", cache_dir=cache)
    assert (model.backend, model.quantization) == ("onnxruntime", "int8")
    signed = backends.int8_signed_weights()
    assert signed == bool(cpu_flags() & {"avx512_vnni", "amx_int8"}) or "avx_vnni" in cpu_flags()
    assert (cache / "onnx" / f"{folder.name}-int8-{'s8' if signed else 'u8'}" / "encoder.onnx").is_file()
    x = waves(2)
    want, got = ref.frame_embeddings(x, 16000), model.frame_embeddings(x, 16000)
    assert got.shape == want.shape
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1)
    assert 0.99 < cos.min().item() < 1 - 1e-7  # quantized (not the float32 graph), and close to it
    assert m2d2_embed.files.embedding_metadata(model, "clip")["compute_dtype"] == "int8"


@pytest.mark.skipif(not backends.runtime_installed("openvino"), reason="openvino not installed")
def test_ray_embedder_passes_the_backend(tiny_model_dir, export_cache, tmp_path):
    pytest.importorskip("pyarrow")
    from m2d2_embed.integrations.ray import M2D2Embedder

    cache, _, ref = export_cache
    emb = M2D2Embedder(str(tiny_model_dir), device="cpu", backend="openvino", cache_dir=cache)
    assert emb.model.backend == "openvino"
    x = waves(1, 2.0)[0].numpy() * 0.1
    table = emb({"path": np.array(["a"], dtype=object), "amplitude": [x[None]], "sample_rate": np.array([16000])})
    got = np.asarray(table.column("embedding").to_pylist()[0], np.float32)
    assert np.abs(got - ref.clip_embeddings(x, 16000)).max() < 1e-4


def test_unwritable_cache_says_what_to_do(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "onnx").write_text("not a folder")  # unwritable for root too, unlike a chmod
    with pytest.raises(OSError, match=r"cannot write the ONNX export .*pass cache_dir= .*a writable folder"):
        m2d2.load(tiny_model_dir, device="cpu", backend="onnxruntime", cache_dir=cache)


def test_two_processes_export_at_once(tiny_model_dir, tmp_path):
    """Two processes that load the same model with a backend at the same time both work, and the cache ends with
    one whole export and no temporary folders."""
    code = (
        "import sys, torch, m2d2_embed as m2d2; "
        "m = m2d2.load(sys.argv[1], device='cpu', backend='onnxruntime', cache_dir=sys.argv[2]); "
        "print(float(m.clip_embeddings(torch.ones(16000) * 0.1, 16000).sum()))"
    )
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tiny_model_dir), str(cache)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and outs[0].strip()
    entries = sorted(p.name for p in (cache / "onnx").iterdir())
    assert len(entries) == 1 and not entries[0].startswith(".")
    assert backends.cached_export(m2d2.load(tiny_model_dir, device="cpu"), cache).parent.name == entries[0]


def test_import_never_imports_the_runtimes():
    code = (
        "import sys, m2d2_embed, m2d2_embed.cli, m2d2_embed.backends; "
        "bad = [m for m in ('onnxruntime', 'openvino', 'onnx', 'onnxscript') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not backends.runtime_installed("openvino"), reason="openvino not installed")
def test_hear_load_model_passes_the_backend(tiny_model_dir, export_cache, monkeypatch):
    from m2d2_embed import hear

    cache, _, ref = export_cache
    monkeypatch.setenv("M2D2_EMBED_CACHE", str(cache))
    m = hear.load_model(str(tiny_model_dir), device="cpu", backend="openvino")
    assert m.m2d2.backend == "openvino"
    x = waves(2, 3.0) * 0.1
    want = ref.clip_embeddings(x, 16000)
    np.testing.assert_allclose(hear.get_scene_embeddings(x, m).numpy(), want.numpy(), atol=1e-4)
