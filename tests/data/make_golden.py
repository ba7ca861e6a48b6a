#!/usr/bin/env python3
"""Golden outputs of the upstream reference runtime for the other M2D geometries and the EVAR tagging head.

Not run in CI: CI compares against the committed ``golden_<variant>.npz`` / ``.json`` files
(tests/test_geometries.py).  This script needs the upstream one-file runtime ``portable_m2d.py``
(nttcslab/m2d ``examples/portable_m2d.py``) and its dependencies (timm, einops, nnAudio) on the
Python path; see tests/data/README.md for the exact commands and versions.

For each variant of make_checkpoint.py it writes the seed-0 synthetic checkpoint into a temporary
folder, runs ``PortableM2D`` on deterministic inputs of several lengths (shorter than a patch row,
inside one chunk, exactly one chunk, and several chunks), and stores what a re-implementation must
reproduce, compactly (float32):

  <case>.sel                [S]           int32, S <= 4 time steps stored in full (first, last, a chunk edge)
  <case>.frames_sel         [B, S, 768]   encode(wav, average_per_time_frame=True), flat_features=True
  <case>.frames_proj        [B, T, 16]    all T steps of the same, projected: x @ (P768 / sqrt(768))
  <case>.stacked_last       [B, f*768]    encode(wav) with flat_features=False at the last step (f > 1 only)
  <case>.stacked_proj       [B, T, 16]    all steps of the stacked output, projected with project_stacked (f > 1)
  <case>.scene              [B, f*768]    get_scene_embeddings(wav)
  <case>.timestamps         [B, T]        get_timestamp_embeddings(wav)[1], milliseconds
  <case>.clap_audio         [B, 768]      encode_clap_audio(wav) (CLAP variants only)
  <case>.logits             [B, C]        PortableM2D(num_classes=527).forward(wav) (head variants only)
  <case>.frame_logits_sel   [B, S, C]     forward_frames(wav)[0] at the steps ``sel`` (head variants only)
  <case>.frame_logits_proj  [B, T, 16]    all steps of forward_frames(wav)[0], projected with P527
  proj.P768, proj.P527      [n, 16]       int8 +-1 (Rademacher) projection matrices; frequency block b of a
                                          stacked frame uses P768 with its columns rolled by b

With one frequency patch (80x2 patches) the stacked output equals the frame output; the script checks
that instead of storing it twice.  Inputs are not stored: ``make_input`` rebuilds them bit-exactly
(16-bit quantised chirp + tone + noise) and the JSON sidecar records the sha256 of their int16 bytes.

Usage:
  PYTHONPATH=UPSTREAM/examples:SITE python tests/data/make_golden.py --out tests/data [--variant NAME ...]
  PYTHONPATH=UPSTREAM/examples:SITE python tests/data/make_golden.py --check-seed0   # environment check
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
UPSTREAM = "nttcslab/m2d examples/portable_m2d.py @ f0c4128d4e89b1ab4e303f03141067b34aadf128"
PROJ_DIM = 16
PROJ_SEED = 20251203
N_SEL = 4

# Cases per variant: (tag, seconds, batch size, silent tail in seconds).  Seconds are converted to samples
# at the model's rate.  The comments give log-mel frames F = 1 + samples // hop and output steps T.
CASES = {
    # 80x2 patches, 1001-frame chunks: 500 steps of 20 ms per full chunk (its last frame is unused).
    "m2d2_clap_2025_20ms": [
        ("len0p5s", 0.5, 1, 0.0),  # F 51 -> padded to 52 -> T 26
        ("len3p3s", 3.3, 2, 0.3),  # F 331 -> 332 -> T 166, batch of 2, digital silence at the end
        ("len10s", 10.0, 1, 0.0),  # F 1001: one full chunk -> T 500
        ("len10p01s", 10.01, 1, 0.0),  # F 1002: 1001 + 1 (padded to 2) -> T 501
        ("len25s", 25.0, 1, 0.0),  # F 2501: 1001 + 1001 + 499 (-> 500) -> T 1250 (2.5 chunks)
    ],
    # 16x4 patches, 200-frame (2-s) chunks: 50 steps of 40 ms per chunk, no unused frame.
    "m2d_40ms": [
        ("len0p5s", 0.5, 1, 0.0),  # F 51 -> 52 -> T 13
        ("len1p99s", 1.99, 1, 0.0),  # F 200: one full chunk -> T 50
        ("len2s", 2.0, 1, 0.0),  # F 201: 200 + 1 (-> 4) -> T 51
        ("len3p3s", 3.3, 2, 0.3),  # F 331: 200 + 131 (-> 132) -> T 83, batch of 2
        ("len5s", 5.0, 1, 0.0),  # F 501: 200 + 200 + 101 (-> 104) -> T 126 (2.5 chunks)
    ],
    # M2D-S: 80x2 patches, 608-frame chunks: 304 steps of 20 ms per chunk.
    "m2d_s_608": [
        ("len0p5s", 0.5, 1, 0.0),  # F 51 -> 52 -> T 26
        ("len3p3s", 3.3, 2, 0.3),  # F 331 -> 332 -> T 166, batch of 2
        ("len6p07s", 6.07, 1, 0.0),  # F 608: one full chunk -> T 304
        ("len15p2s", 15.2, 1, 0.0),  # F 1521: 608 + 608 + 305 (-> 306) -> T 761 (2.5 chunks)
    ],
    # 32 kHz (hop 320 samples = 10 ms), 16x16 patches, 608-frame chunks: 38 steps of 160 ms per chunk.
    "m2d_as_32k": [
        ("len0p5s", 0.5, 1, 0.0),  # 16000 samples, F 51 -> 64 -> T 4
        ("len3p3s", 3.3, 2, 0.3),  # F 331 -> 336 -> T 21, batch of 2
        ("len6p07s", 6.07, 1, 0.0),  # F 608: one full chunk -> T 38
        ("len15p2s", 15.2, 1, 0.0),  # F 1521: 608 + 608 + 305 (-> 320) -> T 96 (2.5 chunks)
    ],
    # EVAR fine-tuned, 768-input head (time- and frequency-averaged features), 80x1001 16x16.
    "evar_as_ft": [
        ("len0p5s", 0.5, 1, 0.0),  # T 4
        ("len3p3s", 3.3, 2, 0.3),  # T 21, batch of 2
        ("len10s", 10.0, 1, 0.0),  # one full chunk, T 62
        ("len25p7s", 25.7, 1, 0.0),  # 1001 + 1001 + 569 (-> 576): T 160
    ],
    # The same with a 3840-input head (stacked features).
    "evar_as_ft_3840": [
        ("len0p5s", 0.5, 1, 0.0),  # T 4
        ("len3p3s", 3.3, 2, 0.3),  # T 21, batch of 2
        ("len10p01s", 10.01, 1, 0.0),  # 1001 + 1 (-> 16): T 63
    ],
}
SAMPLE_RATES = {"m2d_as_32k": 32000}
HOPS = {16000: 160, 32000: 320}
CLAP_VARIANTS = {"m2d2_clap_2025_20ms"}
HEAD_VARIANTS = {"evar_as_ft", "evar_as_ft_3840"}
NUM_CLASSES = 527


def load_make_checkpoint():
    spec = importlib.util.spec_from_file_location("make_checkpoint", HERE / "make_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------
# Inputs and projections (also used by the tests)
# ----------------------------------------------------------------------------------------------------


def case_samples(seconds: float, sample_rate: int) -> int:
    return int(round(seconds * sample_rate))


def make_input(num_samples: int, sample_rate: int, seed: int, silent_tail: float = 0.0) -> np.ndarray:
    """A deterministic float32 waveform in [-1, 1): a linear chirp from 100 Hz to 0.8 x Nyquist, a 440 Hz tone
    gated on and off every 0.25 s, and white noise, quantised to 16 bits (so it is bit-exact across platforms), with
    ``silent_tail`` seconds of digital silence at the end."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(num_samples)])))
    t = np.arange(num_samples, dtype=np.float64) / sample_rate
    dur = max(num_samples / sample_rate, 1e-3)
    f0, f1 = 100.0, 0.4 * sample_rate
    chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * dur) * t * t))
    gate = (np.floor(t * 4) % 2 == 0).astype(np.float64)
    tone = np.sin(2 * np.pi * 440.0 * t) * gate
    noise = rng.standard_normal(num_samples)
    x = 0.3 * chirp + 0.2 * tone + 0.05 * noise
    q = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    n_silent = int(round(silent_tail * sample_rate))
    if n_silent:
        q[-n_silent:] = 0
    return q.astype(np.float32) / np.float32(32768.0)


def case_inputs(variant: str, tag: str, seconds: float, batch: int, silent_tail: float) -> np.ndarray:
    """[B, samples] float32, item b seeded with (crc of variant/tag, b)."""
    sr = SAMPLE_RATES.get(variant, 16000)
    n = case_samples(seconds, sr)
    base = int.from_bytes(hashlib.sha256(f"{variant}/{tag}".encode()).digest()[:4], "little")
    return np.stack([make_input(n, sr, base + b, silent_tail) for b in range(batch)])


def input_sha256(wav: np.ndarray) -> str:
    q = np.round(np.asarray(wav, dtype=np.float64) * 32768.0).astype(np.int16)
    return hashlib.sha256(q.tobytes()).hexdigest()


def projection(n: int) -> np.ndarray:
    """int8 [n, PROJ_DIM] of +-1."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([PROJ_SEED, n])))
    return (rng.integers(0, 2, size=(n, PROJ_DIM), dtype=np.int8) * 2 - 1).astype(np.int8)


def project(x, p: np.ndarray) -> np.ndarray:
    """x [..., n] @ (p / sqrt(n)) in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x @ (p.astype(np.float64) / math.sqrt(p.shape[0]))


def project_stacked(x, p768: np.ndarray) -> np.ndarray:
    """Stacked frames x [..., f*768] -> [..., 16]: block b projected with P768's columns rolled by b (so the
    order of the frequency blocks matters), the f results summed and divided by sqrt(f)."""
    x = np.asarray(x, dtype=np.float64)
    f = x.shape[-1] // p768.shape[0]
    blocks = x.reshape(*x.shape[:-1], f, p768.shape[0])
    out = sum(project(blocks[..., b, :], np.roll(p768, b, axis=1)) for b in range(f))
    return out / math.sqrt(f)


def selected_steps(T: int, steps_per_chunk: int) -> np.ndarray:
    """Up to N_SEL steps kept in full: the first, the last, and both sides of the first chunk edge (or the
    second and the middle step when there is no edge)."""
    if T > steps_per_chunk:
        sel = {0, steps_per_chunk - 1, steps_per_chunk, T - 1}
    else:
        sel = {0, min(1, T - 1), T // 2, T - 1}
    return np.asarray(sorted(sel)[:N_SEL], dtype=np.int32)


# ----------------------------------------------------------------------------------------------------
# The reference runtime
# ----------------------------------------------------------------------------------------------------


def import_portable_m2d():
    # torchvision's PyPI wheel is a CUDA build: its C extension does not load with CPU-only torch, and
    # torchvision 0.28 then fails on an unguarded fake-kernel registration for torchvision::nms/qnms.
    # timm imports torchvision's Python parts only, so declaring the two schemas is enough.  No operator
    # of torchvision is used by PortableM2D.
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for m in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[m]
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive below)
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_portable_m2d._lib = lib
    import portable_m2d

    return portable_m2d


def build(pm, ckpt: Path, **kw):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        model = pm.PortableM2D(str(ckpt), **kw)
    return model.eval(), buf.getvalue().replace(str(ckpt.parent.parent), "DIR")


def versions() -> dict:
    import einops
    import nnAudio
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "timm": timm.__version__,
        "einops": einops.__version__,
        "nnAudio": getattr(nnAudio, "__version__", "?"),
        "torch_num_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def run_variant(pm, mc, variant: str, out_dir: Path, work: Path) -> dict:
    t0 = time.time()
    ckpt, digest = mc.write_checkpoint(work, seed=0, variant=variant)
    ckpt = Path(ckpt)
    file_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    v = mc.VARIANTS[variant]
    sr = SAMPLE_RATES.get(variant, 16000)
    hop = HOPS[sr]
    patch = tuple(v.get("patch_size", (16, 16)))
    U = v["input_size"][1]
    f = v["input_size"][0] // patch[0]
    steps_per_chunk = U // patch[1]
    logs = {}
    m_stack, logs["flat_features=False"] = build(pm, ckpt)
    m_flat, logs["flat_features=True"] = build(pm, ckpt, flat_features=True)
    m_head = None
    if variant in HEAD_VARIANTS:
        m_head, logs["num_classes=527"] = build(pm, ckpt, num_classes=NUM_CLASSES)
        assert m_head.cfg.flat_features == (v["head_in"] == 768), "upstream chose an unexpected head input"
    assert m_stack.cfg.sample_rate == sr, (m_stack.cfg.sample_rate, sr)
    p768, p527 = projection(768), projection(NUM_CLASSES)
    arrays = {"proj.P768": p768, "proj.P527": p527}
    cases = {}
    with torch.no_grad():
        for tag, seconds, batch, silent in CASES[variant]:
            wav = case_inputs(variant, tag, seconds, batch, silent)
            x = torch.from_numpy(wav)
            stacked = m_stack.encode(x).numpy()
            scene = m_stack.get_scene_embeddings(x).numpy()
            frames = m_flat.encode(x, average_per_time_frame=True).numpy()
            emb_ts, ts = m_flat.get_timestamp_embeddings(x)
            assert np.array_equal(emb_ts.numpy(), frames)
            B, T, _ = frames.shape
            assert stacked.shape == (B, T, f * 768), stacked.shape
            sel = selected_steps(T, steps_per_chunk)
            arrays[f"{tag}.sel"] = sel
            arrays[f"{tag}.frames_sel"] = frames[:, sel]
            arrays[f"{tag}.frames_proj"] = project(frames, p768).astype(np.float32)
            if f > 1:
                arrays[f"{tag}.stacked_last"] = stacked[:, T - 1]
                arrays[f"{tag}.stacked_proj"] = project_stacked(stacked, p768).astype(np.float32)
            else:
                assert np.array_equal(stacked, frames), "one frequency patch: stacked must equal frames"
            arrays[f"{tag}.scene"] = scene
            arrays[f"{tag}.timestamps"] = ts.numpy().astype(np.float32)
            if variant in CLAP_VARIANTS:
                arrays[f"{tag}.clap_audio"] = m_flat.encode_clap_audio(x).numpy()
            if m_head is not None:
                logits = m_head(x).numpy()
                frame_logits, fts = m_head.forward_frames(x)
                frame_logits = frame_logits.numpy()
                assert logits.shape == (B, NUM_CLASSES) and frame_logits.shape == (B, T, NUM_CLASSES)
                assert np.array_equal(fts.numpy(), ts.numpy())
                arrays[f"{tag}.logits"] = logits
                arrays[f"{tag}.frame_logits_sel"] = frame_logits[:, sel]
                arrays[f"{tag}.frame_logits_proj"] = project(frame_logits, p527).astype(np.float32)
            n = wav.shape[-1]
            F = 1 + n // hop
            cases[tag] = {
                "seconds": seconds,
                "samples": n,
                "sample_rate": sr,
                "batch": B,
                "silent_tail_s": silent,
                "input_sha256": input_sha256(wav),
                "frames": F,
                "chunks": [min(U, F - s) for s in range(0, F, U)],
                "T": T,
                "sel": sel.tolist(),
            }
    for k, a in arrays.items():
        if a.dtype == np.float64:
            arrays[k] = a.astype(np.float32)
    np.savez_compressed(out_dir / f"golden_{variant}.npz", **arrays)
    ref = m_stack.cfg
    meta = {
        "format": "golden outputs of the upstream M2D reference runtime (PortableM2D), fp32, CPU, eval, no_grad",
        "upstream": UPSTREAM,
        "generator": "tests/data/make_golden.py",
        "checkpoint": {
            "variant": variant,
            "file": f"{v['dirname']}/{v['filename']}",
            "seed": 0,
            "content_sha256": digest,
            "file_sha256": file_sha,
            "n_keys": len(mc.layout(variant)),
        },
        "geometry": {
            "sample_rate": sr,
            "hop": hop,
            "input_size": list(v["input_size"]),
            "patch_size": list(patch),
            "freq_patches": f,
            "steps_per_chunk": steps_per_chunk,
            "frame_hop_ms": patch[1] * hop / sr * 1000,
        },
        "reference": {
            "input_size": list(ref.input_size),
            "patch_size": list(ref.patch_size),
            "sr": ref.sr,
            "mean_std": [float(ref.mean), float(ref.std)],
            "logs": logs,
            "head": (
                {
                    "in_features": v["head_in"],
                    "num_classes": NUM_CLASSES,
                    "flat_features": bool(m_head.cfg.flat_features),
                }
                if m_head is not None
                else None
            ),
        },
        "projection": {"dim": PROJ_DIM, "seed": PROJ_SEED, "formula": "x @ (P / sqrt(n)), P int8 +-1, float64"},
        "cases": cases,
        "environment": versions(),
        "keys": {k: [list(a.shape), str(a.dtype)] for k, a in sorted(arrays.items())},
    }
    (out_dir / f"golden_{variant}.json").write_text(json.dumps(meta, indent=1) + "\n")
    ckpt.unlink()
    print(
        f"{variant}: {len(cases)} cases in {time.time() - t0:.1f} s -> "
        f"{(out_dir / f'golden_{variant}.npz').stat().st_size / 1024:.0f} KiB"
    )
    return meta


def check_seed0(pm, mc, work: Path) -> None:
    """Reproduce a few keys of golden_seed0.npz, to check this environment against the original goldens."""
    ckpt, _ = mc.write_checkpoint(work, seed=0, variant="m2d_clap_2025")
    with np.load(HERE / "golden_seed0.npz") as z:
        g = {k: z[k] for k in ("len3p3s.wav", "len3p3s.encode_stacked", "len3p3s.frames", "len3p3s.clap_audio")}
    m_stack, _ = build(pm, Path(ckpt))
    m_flat, _ = build(pm, Path(ckpt), flat_features=True)
    x = torch.from_numpy(g["len3p3s.wav"])
    with torch.no_grad():
        got = {
            "len3p3s.encode_stacked": m_stack.encode(x).numpy(),
            "len3p3s.frames": m_flat.encode(x, average_per_time_frame=True).numpy(),
            "len3p3s.clap_audio": m_flat.encode_clap_audio(x).numpy(),
        }
    for k, a in got.items():
        print(f"{k}: max abs diff to golden_seed0 {np.abs(a - g[k]).max():.2e}")
    Path(ckpt).unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE), help="folder for golden_<variant>.npz/.json (default: beside this file)")
    p.add_argument("--variant", action="append", choices=sorted(CASES), help="default: all")
    p.add_argument("--work", help="scratch folder for the checkpoints (default: a temporary folder)")
    p.add_argument("--check-seed0", action="store_true", help="compare this environment with golden_seed0.npz")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    pm = import_portable_m2d()
    mc = load_make_checkpoint()
    with tempfile.TemporaryDirectory(dir=a.work) as work:
        if a.check_seed0:
            check_seed0(pm, mc, Path(work))
            return 0
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for variant in a.variant or list(CASES):
            run_variant(pm, mc, variant, out, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
