#!/usr/bin/env python
"""One short GPU check (a few minutes on one H100): CUDA parity, bf16/fp8 agreement and throughput, in one run.

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # results in $OUT (or printed) as JSON + markdown
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke --device cpu --no-compile   # rehearsal without a GPU
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke --device cpu --no-compile --fp8-emulate  # + fp8 rows

1. generates the seed-0 synthetic checkpoint and converts it to our format;
2. fp32 parity on CUDA with TF32 off (matmuls and cuDNN) against tests/data/golden_seed0.npz: max abs diff
   per key vs the tolerances of the parity contract (tests/data/tolerances.json);
3. bf16 (the CUDA default) vs fp32: minimum cosine per embedding (frames, clip, CLAP audio, CLAP text);
4. dtype='fp8' (GPUs of compute capability 8.9+; skipped elsewhere with the loader's reason): minimum cosine per
   level against fp32 on the parity inputs and on synthetic speech-like, music-like, white- and pink-noise clips
   (bf16 on the latter for comparison), also with Hopper's fast FP8 accumulation;
5. the measured matmul peak per dtype (bf16 torch.mm; fp8 torch._scaled_mm row-wise, with and without fast
   accumulation, and tensor-wise), square n = 8192 and 16384;
6. throughput, 10-s clips (batch 256) and 60-s clips: the reference's strategy (a Python loop over 10-s chunks,
   one clip batch at a time) in fp32 and bf16 autocast, m2d2_embed in bf16 and fp8 (eager and compiled) and
   fp32, the bare encoder on precomputed log-mels per dtype (the ceiling), and (``--reference``) the upstream
   runtime; PyTorch's default TF32 settings. 10-s rows also give the encoder's model TFLOP/s and its fraction of
   the measured peak of the row's dtype;
7. bare-encoder variants (GELU, attention kernel) and a 1-hour file (memory-bounded batching), peak GPU memory.

GPU name, capability, driver (nvidia-smi) and torch version are recorded. ``--fp8-emulate`` rehearses the fp8
rows without an FP8 GPU through the float32 emulation (its numbers are the emulation's, not a GPU's).

Every section is guarded: a failure is recorded and the rest still runs; results are rewritten after each
section, so a run cut short still leaves them. Needs only torch, numpy and safetensors (+ tokenizers for text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py: checkpoint, baseline and timing helpers)
from bench import SR, cuda_tf32, log  # noqa: E402

import m2d2_embed  # noqa: E402
from m2d2_embed import fp8 as m2d2_fp8  # noqa: E402

FP8_DTYPES = ("fp8", "fp8-all")  # FP8 in the later half of the encoder's blocks / in every block

# the parity contract's fp32 tolerances: key -> (max abs diff, max abs diff / max abs golden, or None: not checked)
TOLERANCES = {
    k: tuple(v) for k, v in json.loads((bench.DATA / "tolerances.json").read_text()).items() if not k.startswith("_")
}


# ---------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def flat_tokens(model: m2d2_embed.M2D2, wav: torch.Tensor) -> np.ndarray:
    """[B, f*T, D]: patch tokens in (frequency, time) order within each chunk, chunks concatenated."""
    out = []
    for w in wav:
        tok = model.encode([w[None]])[0][0]  # (f, T, D)
        parts = tok.split([t for _, t in model.plan(w.shape[-1])], dim=1)
        out.append(torch.cat([p.reshape(-1, p.shape[-1]) for p in parts]))
    return _np(torch.stack(out))


def parity(model: m2d2_embed.M2D2, golden: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Max abs diff (and its ratio to the largest golden value) per key family, over all cases."""
    diffs: dict[str, list[tuple[float, float]]] = {}

    def add(key: str, ours: Any, ref: np.ndarray) -> None:
        ours = _np(ours)
        if ours.shape != ref.shape:
            raise AssertionError(f"{key}: shape {ours.shape}, golden {ref.shape}")
        d = float(np.abs(ours.astype(np.float64) - ref).max())
        diffs.setdefault(key, []).append((d, d / max(float(np.abs(ref).max()), 1e-12)))

    tags = sorted(k[:-4] for k in golden if k.endswith(".wav"))
    with torch.inference_mode():
        for tag in tags:
            wav = torch.from_numpy(golden[f"{tag}.wav"]).to(model.device)
            g = {k.split(".", 1)[1]: v for k, v in golden.items() if k.startswith(tag + ".")}
            add("lms", model.frontend(wav), g["lms"])
            add("encode_stacked", model.frame_embeddings(wav, SR), g["encode_stacked"])
            add("frames", model.frame_embeddings(wav, SR, reduce="mean"), g["frames"])
            add("scene", model.clip_embeddings(wav, SR), g["scene"])
            add("clap_audio", model.clap_audio_embeddings(wav, SR), g["clap_audio"])
            ts = model.frame_timestamps(wav.shape[-1], align="reference") * 1000
            add("timestamps", np.broadcast_to(ts, g["timestamps"].shape), g["timestamps"])
            if "encode_flat" in g:
                add("encode_flat", flat_tokens(model, wav), g["encode_flat"])
        if model.text_encoder is not None and "text.captions" in golden:
            caps = [str(c) for c in golden["text.captions"]]
            add("text.emb", model.clap_text_embeddings(caps), golden["text.emb"])
            single = torch.stack([model.clap_text_embeddings(c) for c in caps])
            add("text.emb_single", single, golden["text.emb_single"])
    out = {}
    for key, vals in diffs.items():
        abs_d, rel_d = max(v[0] for v in vals), max(v[1] for v in vals)
        tol_abs, tol_rel = TOLERANCES[key]
        ok = abs_d <= tol_abs and (tol_rel is None or rel_d <= tol_rel)
        out[key] = {"max_abs": abs_d, "max_rel": rel_d, "tol_abs": tol_abs, "tol_rel": tol_rel, "ok": ok}
    return out


def text_agreement(test: m2d2_embed.M2D2, ref: m2d2_embed.M2D2, golden: dict[str, np.ndarray]) -> float:
    caps = [str(c) for c in golden["text.captions"]]
    return float(bench.cosines(_np(test.clap_text_embeddings(caps)), _np(ref.clap_text_embeddings(caps))).min())


# ---------------------------------------------------------------------------------------------------
# Throughput extras
# ---------------------------------------------------------------------------------------------------


def bare_encoder_variant(model: m2d2_embed.M2D2, batch: int, name: str) -> bench.Variant:
    """The encoder alone on precomputed full-width log-mels (the ceiling): as many calls of ``batch`` chunks as
    the input has chunks, rounded up to whole calls (one batch shape, so a compiled encoder never recompiles)."""
    enc = model.config.encoder
    lms = torch.randn(
        batch, 1, enc.input_size[0], enc.grid[1] * enc.patch_size[1], device=model.device, dtype=model.dtype
    )

    @torch.inference_mode()
    def run(x: torch.Tensor) -> None:
        n = x.shape[0] * max(1, round(x.shape[1] / SR / 10))  # chunks in this input
        for _ in range(-(-n // batch)):
            model.encoder(lms)

    return bench.Variant(name, run)


def encoder_variants(
    model: m2d2_embed.M2D2, batch: int, repeats: int, compiled: bool, calls: int = 8
) -> list[dict[str, Any]]:
    """The bare encoder (bf16, ``batch`` full chunks per call) under each GELU and attention-kernel choice:
    clips/s, and max abs diff of its tokens against the default choice. Compiled variants are traced afresh
    under each setting (the attention kernel is picked at trace time)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    import m2d2_embed.encoder as E

    enc = model.config.encoder
    lms = torch.randn(
        batch, 1, enc.input_size[0], enc.grid[1] * enc.patch_size[1], device=model.device, dtype=model.dtype
    )
    configs = [
        ("GELU in the matmul epilogue (default), default attention kernel", True, None),
        ("separate erf GELU, default attention kernel", False, None),
        ("GELU in the matmul epilogue, flash attention", True, SDPBackend.FLASH_ATTENTION),
        ("GELU in the matmul epilogue, cuDNN attention", True, SDPBackend.CUDNN_ATTENTION),
        ("GELU in the matmul epilogue, memory-efficient attention", True, SDPBackend.EFFICIENT_ATTENTION),
    ]
    if compiled:
        configs = configs[:3]
    rows, ref = [], None
    try:
        for name, fused, backend in configs:
            E.FUSED_GELU = fused
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with ctx, torch.inference_mode():
                    if compiled:
                        torch.compiler.reset()
                        f = torch.compile(model.encoder)
                    else:
                        f = model.encoder
                    t0 = time.perf_counter()
                    tok = f(lms)
                    bench.sync(model.device)
                    warm = time.perf_counter() - t0
                    times = []
                    for _ in range(repeats):
                        times.append(bench.timed(lambda f=f: [f(lms) for _ in range(calls)], model.device))
            except Exception as e:  # a kernel may not support this GPU or shape: note it and go on
                rows.append({"variant": name, "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            diff = None if ref is None else float((tok.float() - ref).abs().max())
            if ref is None:
                ref = tok.float()
            best = min(times)
            rows.append(
                {
                    "variant": name,
                    "compiled": compiled,
                    "clips_per_s": batch * calls / best,
                    "ms_per_batch": 1000 * best / calls,
                    "warmup_s": warm,
                    "max_abs_diff_vs_first": diff,
                }
            )
            log(f"  encoder {'compiled' if compiled else 'eager'} {name}: {batch * calls / best:.1f} clips/s")
    finally:
        E.FUSED_GELU = True
        if compiled:
            torch.compiler.reset()
    return rows


def long_file(model: m2d2_embed.M2D2, seconds: float) -> dict[str, Any]:
    """Frame and CLAP embeddings of one long file; time and peak GPU memory."""
    x = bench.make_clips(1, seconds, model.device)
    dev = model.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t = bench.timed(lambda: model.frame_embeddings(x[0], SR), dev)
    res = {"seconds_of_audio": seconds, "frames_s": t}
    if model.audio_proj is not None:
        res["clap_s"] = bench.timed(lambda: model.clap_audio_embeddings(x[0], SR), dev)
    if dev.type == "cuda":
        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


# ---------------------------------------------------------------------------------------------------
# FP8: realistic inputs, matmul peaks, FLOPs per clip
# ---------------------------------------------------------------------------------------------------


def realistic_waves(seconds: float = 10.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic stand-ins for real audio, [1, seconds * 16 kHz] float32 at an RMS of 0.1 (numpy, no files):
    speech-like (a harmonic voice at 100-220 Hz with intonation and vibrato, three formants that move, syllables at
    about 4 Hz and pauses), music-like (a chord progression of harmonic notes with attack and decay, and a bass),
    white noise and pink (1/f) noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR

    def norm(x: np.ndarray) -> np.ndarray:
        return (0.1 * x / np.sqrt(np.mean(x**2))).astype(np.float32)[None]

    # speech-like: f0 contour, harmonics weighted by moving formant resonances, syllabic envelope with pauses
    f0 = 160 + 45 * np.sin(2 * np.pi * 0.3 * t) + 4 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    formants = [(500 + 250 * np.sin(2 * np.pi * 1.1 * t), 80), (1500 + 600 * np.sin(2 * np.pi * 0.7 * t + 1), 120)]
    formants.append((2500 + 300 * np.sin(2 * np.pi * 0.5 * t + 2), 160))
    voice = np.zeros(n)
    for k in range(1, 30):
        fk = k * f0
        gain = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.02
        voice += np.where(fk < SR / 2, gain / k**0.5, 0.0) * np.sin(k * phase)
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t), 0, None) ** 0.7
    pauses = (np.sin(2 * np.pi * 0.23 * t + 0.5) > -0.6).astype(float)
    speech = voice * syllables * pauses + 0.01 * rng.standard_normal(n)

    # music-like: I-V-vi-IV triads, one per second, harmonic notes (1/k), attack-decay envelope, a bass an octave down
    chords = [(60, 64, 67), (67, 71, 74), (69, 72, 76), (65, 69, 72)]
    music = np.zeros(n)
    for i, start in enumerate(range(0, n, SR)):
        seg = np.arange(min(SR, n - start)) / SR
        env = np.minimum(seg / 0.01, 1.0) * np.exp(-2.5 * seg)
        notes = chords[i % len(chords)]
        for midi in (*notes, notes[0] - 12):
            f = 440.0 * 2 ** ((midi - 69) / 12)
            for k in range(1, 8):
                if k * f < SR / 2:
                    music[start : start + len(seg)] += env * np.sin(2 * np.pi * k * f * seg) / k

    white = rng.standard_normal(n)
    spec = np.fft.rfft(rng.standard_normal(n))
    spec[1:] /= np.sqrt(np.arange(1, len(spec)))  # power ~ 1/f
    spec[0] = 0
    pink = np.fft.irfft(spec, n)
    return {
        "speech-like": norm(speech),
        "music-like": norm(music),
        "white noise": norm(white),
        "pink noise": norm(pink),
    }


def fp8_unavailable(device: torch.device) -> str | None:
    """Why dtype='fp8' cannot run on ``device`` (the loader's own message), or None when it can."""
    try:
        from m2d2_embed.loader import resolve_dtype

        resolve_dtype("fp8", device)
    except (ValueError, RuntimeError) as e:
        return str(e)
    return None


def _matmuls(n: int, device: torch.device) -> dict[str, Any]:
    """name -> a call of one n x n x n product in that dtype and scaling."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    calls: dict[str, Any] = {"bf16 torch.mm": partial(torch.mm, a, b)}
    if fp8_unavailable(device) is None:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # b8: column-major, as the kernel needs
        rows, cols, one = (
            torch.ones(n, 1, device=device),
            torch.ones(1, n, device=device),
            torch.ones((), device=device),
        )
        mm = partial(torch._scaled_mm, a8, b8, out_dtype=torch.bfloat16)  # noqa: SLF001 (PyTorch's FP8 matmul)
        calls["fp8 rowwise"] = partial(mm, scale_a=rows, scale_b=cols)
        calls["fp8 rowwise, fast accum"] = partial(mm, scale_a=rows, scale_b=cols, use_fast_accum=True)
        calls["fp8 tensorwise, fast accum"] = partial(mm, scale_a=one, scale_b=one, use_fast_accum=True)
    return calls


def matmul_peaks(device: torch.device, sizes: tuple[int, ...] = (8192, 16384), calls: int = 10) -> dict[str, Any]:
    """Measured dense matmul rate (TFLOP/s, best over ``sizes`` of square n x n x n products) per dtype: bf16
    ``torch.mm``, and float8 e4m3 ``torch._scaled_mm`` with row-wise scales (what FP8Linear calls), without and
    with ``use_fast_accum``, and with tensor-wise scales. Each call is 2 n^3 FLOPs."""
    out: dict[str, Any] = {}
    for n in sizes:
        for name, fn in _matmuls(n, device).items():
            try:
                fn()
                t = bench.timed(lambda fn=fn: [fn() for _ in range(calls)], device)
            except Exception as e:  # a configuration this build or GPU lacks: note it and go on
                out.setdefault(name, {"error": f"{type(e).__name__}: {e}"[:200]})
                continue
            tf = 2 * n**3 * calls / t / 1e12
            if tf > out.get(name, {}).get("tflops", 0.0):
                out[name] = {"tflops": tf, "n": n}
            log(f"  matmul peak {name} n={n}: {tf:.1f} TFLOP/s")
    return out


def gpu_environment(device: torch.device) -> dict[str, Any]:
    """GPU name, compute capability, driver and memory (nvidia-smi), CUDA of the torch build."""
    env: dict[str, Any] = {}
    if device.type != "cuda":
        return env
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import subprocess

        q = "name,driver_version,memory.total"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        env["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["nvidia_smi"] = f"unavailable: {e}"
    return env


def add_peak_fractions(rows: list[dict[str, Any]], peaks: dict[str, Any], flops: float) -> None:
    """For the 10-s rows (one full chunk per clip): the encoder's model TFLOP/s (``flops`` per chunk, see
    :func:`flops_per_chunk`) and its fraction of the measured matmul peak of the row's dtype: fp8 rows against
    row-wise ``_scaled_mm`` (the path FP8Linear takes; attention runs in bf16 even there), bf16 rows (and bf16
    autocast) against bf16 ``torch.mm``; fp32 rows get no fraction."""
    for r in rows:
        if r.get("seconds") != 10.0:
            continue
        r["model_tflops"] = r["clips_per_s"] * flops / 1e12
        name = r["variant"]
        key = "fp8 rowwise" if "fp8" in name else "bf16 torch.mm" if "bf16" in name else None
        peak = peaks.get(key, {}).get("tflops") if key else None
        if peak:
            r["peak_key"], r["x_peak"] = key, r["model_tflops"] / peak


def flops_per_chunk(model: m2d2_embed.M2D2) -> float:
    """Multiply-add FLOPs (2 per MAC) of the encoder on one full chunk: patch projection, the four Linear layers
    and the two attention products of every block (LayerNorm, softmax, GELU and the front end not counted)."""
    enc = model.config.encoder
    f, t = enc.grid
    n, d = 1 + f * t, enc.embed_dim  # tokens incl. CLS
    hidden = int(d * enc.mlp_ratio)
    linear = 2 * n * d * (3 * d + d + 2 * hidden)
    attention = 2 * 2 * n * n * d
    patch = 2 * f * t * enc.patch_size[0] * enc.patch_size[1] * d
    return float(patch + enc.depth * (linear + attention))


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(res: dict[str, Any]) -> str:
    env = res.get("environment", {})
    L = [f"# gpu_check ({env.get('date')}, torch {env.get('torch')}, {env.get('gpu', env.get('cpu'))})", ""]
    if "parity" in res:
        L += [
            "## fp32 parity on " + res.get("device", "?") + " (TF32 off)",
            "",
            "| key | max abs diff | tolerance | max diff / max golden | tolerance | ok |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for k, v in res["parity"].items():
            tr = f"{v['tol_rel']:.1e}" if v["tol_rel"] is not None else ""
            L.append(
                f"| {k} | {v['max_abs']:.2e} | {v['tol_abs']:.0e} | {v['max_rel']:.2e} | {tr} | "
                f"{'yes' if v['ok'] else '**NO**'} |"
            )
        L.append("")
    if "agreement" in res:
        L += [
            "## bf16 vs fp32: minimum cosine on the parity inputs",
            "",
            ", ".join(f"{k} {v:.5f}" for k, v in res["agreement"].items()),
            "",
        ]
    if res.get("fp8_skipped"):
        L += [f"fp8 skipped: {res['fp8_skipped']}", ""]
    if res.get("fp8_agreement"):
        levels = ("frame", "frame_mean", "clip", "clap")
        L += [
            "## fp8 (and bf16) vs fp32: minimum cosine per level"
            + (
                " (EMULATED on this device: not a GPU's numbers)"
                if "True" in res["args"].get("fp8_emulate", "")
                else ""
            ),
            "",
            "targets: frames >= 0.998, clip and CLAP >= 0.999",
            "",
            "| dtype, inputs | " + " | ".join(levels) + " |",
            "|---|" + "---:|" * len(levels),
        ]
        for k, v in res["fp8_agreement"].items():
            L.append(f"| {k} | " + " | ".join(_fmt(v.get(lv), ".5f") for lv in levels) + " |")
        L.append("")
    if res.get("matmul_peaks"):
        L += ["## Measured matmul peaks (square n x n x n)", "", "| matmul | TFLOP/s | n |", "|---|---:|---:|"]
        for k, v in res["matmul_peaks"].items():
            L.append(f"| {k} | {_fmt(v.get('tflops'), '.1f')} | {v.get('n', v.get('error', ''))} |")
        L.append("")
    if res.get("throughput"):
        L += [
            "## Throughput",
            "",
            "| clips | path | clips/s | audio-s/s | x ref fp32 | x ref bf16 | x upstream fp32 | x upstream bf16 "
            "| model TFLOP/s | x peak of its dtype | warm-up s | peak GPU MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["throughput"]:
            xs = " | ".join(
                _fmt(r.get(k), ".2f") for k in ("x_baseline", "x_ref_bf16", "x_upstream_fp32", "x_upstream_bf16")
            )
            L.append(
                f"| {r['n']} x {r['seconds']:g} s | {r['variant']} | {r['clips_per_s']:.1f} | "
                f"{r['audio_s_per_s']:.0f} | {xs} | {_fmt(r.get('model_tflops'), '.1f')} | "
                f"{_fmt(r.get('x_peak'), '.2f')} | {r['warmup_s']:.1f} | {_fmt(r.get('peak_gpu_mib'), '.0f')} |"
            )
        L.append("")
    if res.get("encoder_variants"):
        L += [
            "## Bare encoder variants (bf16, full chunks)",
            "",
            "| variant | compiled | clips/s | ms per batch | max abs diff vs first | warm-up s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in res["encoder_variants"]:
            if "error" in r:
                L.append(f"| {r['variant']} | {r['compiled']} | {r['error']} | | | |")
                continue
            L.append(
                f"| {r['variant']} | {r['compiled']} | {r['clips_per_s']:.1f} | {r['ms_per_batch']:.2f} | "
                f"{_fmt(r['max_abs_diff_vs_first'], '.2e')} | {r['warmup_s']:.1f} |"
            )
        L.append("")
    if "compiled_vs_eager_bf16_min_cosine" in res:
        L += [
            f"compiled vs eager bf16 frames: min cosine {res['compiled_vs_eager_bf16_min_cosine']:.5f}; "
            f"dynamo stats {res.get('compiled_graphs')}",
            "",
        ]
    for d in FP8_DTYPES:
        if f"compiled_vs_eager_{d}_min_cosine" in res:
            L += [f"compiled vs eager {d} frames: min cosine {res[f'compiled_vs_eager_{d}_min_cosine']:.5f}", ""]
    if "long_file" in res:
        L += ["## Long file", "", json.dumps(res["long_file"]), ""]
    if res.get("errors"):
        L += ["## Errors", ""] + [f"- {k}: {v.splitlines()[-1] if v else ''}" for k, v in res["errors"].items()] + [""]
    L.append(f"total {res.get('elapsed_s', 0):.0f} s")
    return "\n".join(L)


def save(res: dict[str, Any], out: Path | None) -> None:
    res["elapsed_s"] = time.perf_counter() - T0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(res) + "\n")


T0 = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny counts, to rehearse the script (e.g. on a CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--clips", type=int, default=2048, help="10-s clips for throughput (a multiple of --batch-size)")
    p.add_argument(
        "--clips-60s",
        type=int,
        default=340,
        help="60-s clips for throughput (340: groups of 1020 chunks, so one batch shape)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=270, help="skip remaining optional sections after this")
    p.add_argument(
        "--reference",
        type=Path,
        help="the upstream portable_m2d.py (needs nnAudio, timm, einops): "
        "also time the upstream runtime itself, fp32 and bf16 autocast",
    )
    p.add_argument(
        "--fp8-emulate",
        action="store_true",
        help="rehearsal without an FP8 GPU: run the fp8 rows through the float32 emulation (m2d2_embed.fp8.EMULATE); "
        "their numbers are the emulation's, not a GPU's",
    )
    p.add_argument("--work-dir", type=Path, help="checkpoint location (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = p.parse_args(argv)
    if a.smoke:
        a.clips, a.clips_60s, a.repeats, a.batch_size = min(a.clips, 2), min(a.clips_60s, 1), 1, min(a.batch_size, 4)
    dev = torch.device(a.device)
    if a.fp8_emulate:
        m2d2_fp8.EMULATE = True
    res: dict[str, Any] = {
        "environment": {**bench.environment(dev), **gpu_environment(dev)},
        "device": str(dev),
        "args": {k: str(v) for k, v in vars(a).items()},
        "errors": {},
    }

    def section(name: str, fn, optional: bool = False) -> Any:
        if optional and time.perf_counter() - T0 > a.budget_s:
            res["errors"][name] = f"skipped: past the {a.budget_s:.0f} s budget"
            log(f"[{name}] skipped (time budget)")
            return None
        log(f"[{name}] {time.perf_counter() - T0:.0f} s")
        try:
            return fn()
        except Exception:  # record and go on: one broken section must not lose the others
            res["errors"][name] = traceback.format_exc()
            log(res["errors"][name])
            return None
        finally:
            save(res, a.out)

    tmp = None
    if a.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="m2d2_gpu_check_")
        a.work_dir = Path(tmp.name)
    paths = section(
        "checkpoint",
        lambda: (lambda pth: (pth, bench.ensure_converted(pth, a.work_dir)))(bench.ensure_checkpoint(a.work_dir)),
    )
    if paths is None:
        print(markdown(res))
        return 1
    pth, conv = paths
    with np.load(bench.DATA / "golden_seed0.npz", allow_pickle=False) as z:
        golden = {k: z[k] for k in z.files}

    models: dict[str, m2d2_embed.M2D2] = {}

    def parity_section():
        with cuda_tf32(False):
            models["fp32"] = m2d2_embed.load(conv, device=dev, dtype="fp32")
            res["parity"] = parity(models["fp32"], golden)
        res["parity_ok"] = all(v["ok"] for v in res["parity"].values())
        log(json.dumps(res["parity"], indent=1))

    section("parity", parity_section)

    def agreement_section():
        models["bf16"] = m2d2_embed.load(conv, device=dev, dtype="bf16")
        with cuda_tf32(False):
            ref = models.get("fp32") or m2d2_embed.load(conv, device=dev, dtype="fp32")
            agr = bench.agreement(models["bf16"], ref, bench.parity_waves())
            agr["text"] = text_agreement(models["bf16"], ref, golden)
        res["agreement"] = agr
        log(json.dumps(agr))

    section("bf16 agreement", agreement_section)
    fp8_why = fp8_unavailable(dev)
    if fp8_why is not None:
        res["fp8_skipped"] = fp8_why
        log(f"[fp8] skipped on {dev}: {fp8_why}")

    def fp8_agreement_section():
        real = realistic_waves(3.3 if a.smoke else 10.0)
        with cuda_tf32(False):
            ref = models.get("fp32") or m2d2_embed.load(conv, device=dev, dtype="fp32")
            parity_in = bench.parity_waves()
            if a.smoke:  # a rehearsal (e.g. emulated on a CPU): two of the eight inputs
                parity_in = {k: parity_in[k] for k in ("len3p3s", "len10p01s")}
            agr = {}
            for d in FP8_DTYPES:  # "fp8": FP8 in the later half of the blocks; "fp8-all": in every block
                models[d] = m2d2_embed.load(conv, device=dev, dtype=d)
                agr[f"{d}, parity inputs"] = bench.agreement(models[d], ref, parity_in)
                for name, w in real.items():
                    agr[f"{d}, {name}"] = bench.agreement(models[d], ref, {name: w})
                if dev.type == "cuda" and not m2d2_fp8.EMULATE:  # Hopper's fast FP8 accumulation, same weights
                    m2d2_fp8.FAST_ACCUM = True
                    try:
                        agr[f"{d} fast accum, parity inputs"] = bench.agreement(models[d], ref, parity_in)
                        agr[f"{d} fast accum, realistic inputs"] = bench.agreement(models[d], ref, real)
                    finally:
                        m2d2_fp8.FAST_ACCUM = False
            if "bf16" in models:
                agr["bf16, realistic inputs"] = bench.agreement(models["bf16"], ref, real)
        res["fp8_agreement"] = agr
        log(json.dumps(agr, indent=1))

    if fp8_why is None:
        section("fp8 agreement", fp8_agreement_section)
    section("matmul peaks", lambda: res.update(matmul_peaks=matmul_peaks(dev, (256,) if a.smoke else (8192, 16384))))

    def encoder_section(compiled: bool):
        m = models.get("bf16") or m2d2_embed.load(conv, device=dev, dtype="bf16")
        res.setdefault("encoder_variants", []).extend(encoder_variants(m, a.batch_size, a.repeats, compiled))

    def erf_gelu(model: m2d2_embed.M2D2, x: torch.Tensor) -> Any:
        """frame_embeddings with the separate exact GELU (the default before the fused epilogue)."""
        import m2d2_embed.encoder as E

        E.FUSED_GELU = False
        try:
            return model.frame_embeddings(x, SR, batch_size=a.batch_size)
        finally:
            E.FUSED_GELU = True

    def throughput_section(compiled: bool):
        # PyTorch's default TF32 settings, as a user gets them (matmul TF32 off, cuDNN TF32 on)
        bs = a.batch_size
        fp32 = models.get("fp32") or m2d2_embed.load(conv, device=dev, dtype="fp32")
        bf16 = models.get("bf16") or m2d2_embed.load(conv, device=dev, dtype="bf16")
        V = bench.Variant
        if not compiled:
            variants = [
                V("reference strategy, fp32", lambda x: bench.reference_strategy(fp32, x, bs), baseline=True),
                V("reference strategy, bf16 autocast", lambda x: bench.reference_strategy(fp32, x, bs, torch.bfloat16)),
                V("m2d2_embed, bf16", lambda x: bf16.frame_embeddings(x, SR, batch_size=bs)),
                V("m2d2_embed, fp32", lambda x: fp32.frame_embeddings(x, SR, batch_size=bs)),
                V("m2d2_embed, bf16, erf GELU", lambda x: erf_gelu(bf16, x)),
                bare_encoder_variant(bf16, bs, "bare encoder, bf16, eager"),
            ]
            if fp8_why is None:
                for d in FP8_DTYPES:
                    q = models.get(d) or m2d2_embed.load(conv, device=dev, dtype=d)
                    variants += [
                        V(f"m2d2_embed, {d}", lambda x, q=q: q.frame_embeddings(x, SR, batch_size=bs)),
                        bare_encoder_variant(q, bs, f"bare encoder, {d}, eager"),
                    ]
            if a.reference is not None:
                variants += bench.upstream_variants(a.reference, pth, dev, bs)
        else:
            comp = m2d2_embed.load(conv, device=dev, dtype="bf16", compile=True)
            variants = [
                V(
                    "reference strategy, bf16 autocast",
                    lambda x: bench.reference_strategy(fp32, x, bs, torch.bfloat16),
                    baseline=True,
                ),
                V("m2d2_embed, bf16, compiled", lambda x: comp.frame_embeddings(x, SR, batch_size=bs)),
                V("m2d2_embed, bf16, compiled, erf GELU", lambda x: erf_gelu(comp, x)),
                bare_encoder_variant(comp, bs, "bare encoder, bf16, compiled (ceiling)"),
            ]
            comp8 = {}
            if fp8_why is None:
                for d in FP8_DTYPES:
                    comp8[d] = c8 = m2d2_embed.load(conv, device=dev, dtype=d, compile=True)
                    variants += [
                        V(f"m2d2_embed, {d}, compiled", lambda x, c8=c8: c8.frame_embeddings(x, SR, batch_size=bs)),
                        bare_encoder_variant(c8, bs, f"bare encoder, {d}, compiled (ceiling)"),
                    ]
        lengths = {"10 s": (a.clips, 10.0), "60 s": (a.clips_60s, 60.0)}
        rows = bench.run_throughput(variants, dev, lengths, a.repeats, full_warmup=True)
        if compiled:  # the compiled graph against the eager one, on a batch shape already compiled
            x = bench.make_clips(min(bs, max(a.clips, 1)), 10.0, dev, seed=1)
            got, want = comp.frame_embeddings(x, SR, batch_size=bs), bf16.frame_embeddings(x, SR, batch_size=bs)
            res["compiled_vs_eager_bf16_min_cosine"] = float(bench.cosines(_np(got), _np(want)).min())
            for d, c8 in comp8.items():
                if d in models:
                    got8, want8 = (
                        c8.frame_embeddings(x, SR, batch_size=bs),
                        models[d].frame_embeddings(x, SR, batch_size=bs),
                    )
                    res[f"compiled_vs_eager_{d}_min_cosine"] = float(bench.cosines(_np(got8), _np(want8)).min())
            from torch._dynamo.utils import counters

            res["compiled_graphs"] = dict(counters["stats"])
        done = res.setdefault("throughput", [])
        for r in rows:  # speed-ups against both reference settings (same clip length, same run)
            same = {x["variant"]: x for x in rows + done if x["clips"] == r["clips"]}
            for key, ref in (
                ("x_baseline", "reference strategy, fp32"),
                ("x_ref_bf16", "reference strategy, bf16 autocast"),
                ("x_upstream_fp32", "upstream PortableM2D, fp32"),
                ("x_upstream_bf16", "upstream PortableM2D, bf16 autocast"),
            ):
                if ref in same:
                    r[key] = r["clips_per_s"] / same[ref]["clips_per_s"]
        done.extend(rows if not compiled else [r for r in rows if "reference" not in r["variant"]])
        add_peak_fractions(done, res.get("matmul_peaks", {}), flops_per_chunk(bf16))

    section("throughput", lambda: throughput_section(False))
    if not a.no_compile:
        section("throughput, compiled", lambda: throughput_section(True), optional=True)
    section("encoder variants", lambda: encoder_section(False), optional=True)
    if not a.no_compile:
        section("encoder variants, compiled", lambda: encoder_section(True), optional=True)

    def long_section():
        m = models.get("bf16") or m2d2_embed.load(conv, device=dev, dtype="bf16")
        res["long_file"] = long_file(m, 60.0 if a.smoke else 3600.0)

    section("long file", long_section, optional=True)
    md = markdown(res)
    print(md)
    save(res, a.out)
    if tmp is not None:
        tmp.cleanup()
    return 0 if res.get("parity_ok") and not [k for k, v in res["errors"].items() if not v.startswith("skipped")] else 1


if __name__ == "__main__":
    sys.exit(main())
