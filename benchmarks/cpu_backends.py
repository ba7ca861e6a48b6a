#!/usr/bin/env python
"""CPU inference of m2d2_embed against ONNX Runtime and OpenVINO, all in the same run (issue 14).

Contenders, interleaved round-robin (round r times every contender once, batch 1 then batch 4), medians and min-max:

- m2d2_embed fp32: the default CPU path (fused oneDNN blocks, ``load(..., dtype="fp32")``);
- m2d2_embed fp32, plain nn.Linear: the same model with the fused path switched off (the path before issue 14);
- m2d2_embed int8: ``dtype="int8"`` (full 8-bit activations on VNNI CPUs), and int8 with 7-bit activations
  (PyTorch's default ``reduce_range``, the path before issue 14);
- m2d2_embed bf16 and compile (``--no-bf16``, ``--no-compile`` leave them out; compile's warm-up is reported);
- ONNX Runtime fp32, and its dynamic int8 quantization with QUInt8 and QInt8 per-channel weights (CPU EP);
- OpenVINO fp32 (``INFERENCE_PRECISION_HINT=f32``, latency hint);
  these runtimes run the package's cached export with the package's own session settings
  (``m2d2_embed.backends``); their end-to-end rows are ``load(backend=...)`` (on VNNI CPUs the QInt8 row is
  ``load(dtype="int8", backend="onnxruntime")``);
- the GEMM ceilings: fp32 ``torch.mm`` and fbgemm's dynamic int8 Linear on the encoder's matmul shapes.

Encoder only: the same normalised log-mel input [B, 1, 80, 992] to each contender. End to end: a 10-s waveform
batch [B, 160000] -> ``clip_embeddings`` (front end, encoder, pooling); ONNX Runtime and OpenVINO run there as the
encoder inside the same pipeline. Every row is also given as a fraction of its ceiling (encoder FLOPs / time /
ceiling rate: fp32 rows against torch.mm, int8 rows against the int8 Linear).

    python benchmarks/cpu_backends.py                       # 5 rounds, batch 1 and 4
    python benchmarks/cpu_backends.py --rounds 3 --no-compile --markdown out.md --json out.json

Installs nothing: needs onnxruntime, onnx, onnxscript and openvino (see benchmarks/README.md). Weights: the seed-0
synthetic checkpoint of bench.py (same size and layout as the release; speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402  (benchmarks/bench.py: weights, clips, environment)

import m2d2_embed  # noqa: E402
from m2d2_embed import backends  # noqa: E402
from m2d2_embed.encoder import Block  # noqa: E402

SR = 16000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------


def cpu_environment() -> dict[str, Any]:
    env = bench.environment()  # with isa_flags (present/absent) and torch_cpu_capability
    env["env"] = {
        k: os.environ[k]
        for k in (
            "ATEN_CPU_CAPABILITY",
            "ONEDNN_MAX_CPU_ISA",
            "DNNL_MAX_CPU_ISA",
            "MKL_ENABLE_INSTRUCTIONS",
            "FBGEMM_ENABLE_INSTRUCTIONS",
            "OMP_NUM_THREADS",
            "OMP_WAIT_POLICY",
        )
        if k in os.environ
    }
    for mod in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        env["lscpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        env["lscpu_model"] = None
    return env


# ---------------------------------------------------------------------------------------------------
# FLOPs and ceilings
# ---------------------------------------------------------------------------------------------------


def encoder_flops(cfg, batch: int, t: int) -> float:
    """Multiply-adds x 2 of the encoder on [batch, 1, n_mels, 16 t]: patch projection, the blocks' matmuls
    (qkv, proj, fc1, fc2) and attention (QK^T and AV)."""
    f = cfg.grid[0]
    D, H = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    n = f * t + 1
    linear = n * (3 * D * D + D * D + 2 * D * H)
    attn = 2 * n * n * D
    patch = f * t * cfg.patch_size[0] * cfg.patch_size[1] * D
    return 2.0 * batch * (cfg.depth * (linear + attn) + patch)


def gemm_shapes(cfg) -> list[tuple[int, int]]:
    D, H = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    return [(D, 3 * D), (D, D), (D, H), (H, D)]


class Ceiling:
    """The encoder's matmuls alone: its four Linear shapes at M = tokens rows, ``depth`` times (as many as the
    encoder runs), through fp32 ``torch.mm`` or fbgemm's dynamic int8 Linear (the package's)."""

    def __init__(self, cfg, kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.kind, self.cfg = kind, cfg
        self.layers = []
        for K, N in gemm_shapes(cfg):
            w = torch.randn(N, K, generator=g) * 0.02
            if kind == "int8":
                lin = torch.nn.Linear(K, N)
                with torch.no_grad():
                    lin.weight.copy_(w)
                self.layers.append(quantized_linear(lin))
            else:
                self.layers.append(w.t().contiguous())  # [K, N]: x @ w
        self.inputs: dict[int, list[torch.Tensor]] = {}

    def flops(self, rows: int) -> float:
        return 2.0 * rows * sum(K * N for K, N in gemm_shapes(self.cfg)) * self.cfg.depth

    def run(self, rows: int) -> None:
        if rows not in self.inputs:
            g = torch.Generator().manual_seed(1)
            self.inputs[rows] = [torch.randn(rows, K, generator=g) for K, _ in gemm_shapes(self.cfg)]
        with torch.inference_mode():
            for _ in range(self.cfg.depth):
                for x, layer in zip(self.inputs[rows], self.layers):
                    layer(x) if self.kind == "int8" else torch.mm(x, layer)


def quantized_linear(lin: torch.nn.Linear) -> torch.nn.Module:
    """The package's int8 Linear (``dtype="int8"``'s), for the int8 ceiling."""
    from m2d2_embed.loader import quantize_linears_int8

    return quantize_linears_int8(lin)


# ---------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------


class Contender:
    def __init__(self, name: str, kind: str, encode=None, model=None, ceiling: str = "fp32") -> None:
        self.name, self.kind, self.ceiling = name, kind, ceiling
        self.encode = encode  # lms [B, 1, 80, 992] float32 -> tokens [B, f*t, D]
        self.model = model  # for the end-to-end rows (None: encoder-only contender)
        self.times: dict[str, list[float]] = {}
        self.warmup: dict[str, float] = {}
        self.agreement: dict[str, Any] = {}


def with_runner(source: Path, cache: Path, run, name: str) -> m2d2_embed.M2D2:
    """The package's pipeline with ``run`` (a runner of ``backends.open_runner``) as its encoder."""
    m = m2d2_embed.load(source, device="cpu", backend="onnxruntime", cache_dir=cache)
    m.set_encoder_runner(run, name)
    return m


def ensure_export(model: m2d2_embed.M2D2, cache: Path) -> tuple[Path, float | None]:
    """The full-size ONNX export, the one ``load(backend=...)`` makes and caches under ``cache/onnx/<digest>``;
    (encoder.onnx, export seconds or None when it was cached)."""
    t = time.perf_counter()
    cached = (cache / "onnx" / backends.encoder_digest(model) / backends.FILES_RECORD).exists()
    path = backends.cached_export(model, cache)
    dt = None if cached else time.perf_counter() - t
    if dt is not None:
        log(f"ONNX export of the full-size model: {dt:.1f} s")
    return path, dt


def plain(model: m2d2_embed.M2D2) -> m2d2_embed.M2D2:
    for b in model.modules():
        if isinstance(b, Block):
            b.unpack()
    return model


def int8_7bit(source: Path) -> m2d2_embed.M2D2:
    """dtype='int8' as before issue 14: PyTorch's dynamic Linear, activations quantized to 7 bits."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    m = m2d2_embed.load(source, device="cpu", dtype="fp32")
    plain(m)
    spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.encoder = quantize_dynamic(m.encoder, spec, dtype=torch.qint8)
        if m.audio_proj is not None:
            m.audio_proj = quantize_dynamic(m.audio_proj, spec, dtype=torch.qint8)
    return m


def build(a: argparse.Namespace, source: Path, cache: Path) -> tuple[list[Contender], dict]:
    info: dict[str, Any] = {}
    fp32 = m2d2_embed.load(source, device="cpu", dtype="fp32")
    before = plain(m2d2_embed.load(source, device="cpu", dtype="fp32"))
    cs = [Contender("m2d2_embed fp32, plain nn.Linear (before)", "torch", before.encoder, before)]
    cs.append(Contender("m2d2_embed fp32 (fused oneDNN, default)", "torch", fp32.encoder, fp32))
    onnx_path = None
    if not a.torch_only:
        onnx_path, info["export_s"] = ensure_export(fp32, cache)
        # encoder rows: the runtime itself on the export; end-to-end rows: the package with load(backend=...)
        ort_model = m2d2_embed.load(source, device="cpu", backend="onnxruntime", cache_dir=cache)
        run = backends.open_runner("onnxruntime", onnx_path)  # the same session settings as load(backend=...)
        cs.append(Contender(f"ONNX Runtime {bench_version('onnxruntime')} fp32", "ort", run, ort_model))
    if onnx_path is not None and not a.no_openvino:
        ov_model = m2d2_embed.load(source, device="cpu", backend="openvino", cache_dir=cache)
        run = backends.open_runner("openvino", onnx_path)
        cs.append(Contender(f"OpenVINO {bench_version('openvino')} fp32", "ov", run, ov_model))
    if not a.no_compile:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the compile-on-CPU warning
            comp = m2d2_embed.load(source, device="cpu", dtype="fp32", compile=True)
        cs.append(Contender("m2d2_embed fp32 compile=True", "torch", comp.encoder, comp))
    if not a.no_bf16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the no-native-bf16 warning, where it applies
            bf = m2d2_embed.load(source, device="cpu", dtype="bf16")
        cs.append(Contender("m2d2_embed bf16", "torch-bf16", lambda x, e=bf.encoder: e(x.bfloat16()).float(), bf))
    q = m2d2_embed.load(source, device="cpu", dtype="int8")
    cs.append(Contender("m2d2_embed int8 (default)", "torch", q.encoder, q, ceiling="int8"))
    q7 = int8_7bit(source)
    cs.append(Contender("m2d2_embed int8, 7-bit activations (before)", "torch", q7.encoder, q7, ceiling="int8"))
    signed = backends.int8_signed_weights()  # what load(dtype="int8", backend="onnxruntime") picks here
    for wt in ("QUInt8", "QInt8") if onnx_path is not None else ():
        run = backends.open_runner("onnxruntime", backends.cached_int8(fp32, cache, signed=wt == "QInt8"))
        ours = (wt == "QInt8") == signed  # end to end: the package's own load(dtype="int8", backend="onnxruntime")
        model = (
            m2d2_embed.load(source, device="cpu", dtype="int8", backend="onnxruntime", cache_dir=cache)
            if ours
            else with_runner(source, cache, run, f"onnxruntime {wt}")
        )
        name = f"ORT dynamic int8, {wt} per-channel weights" + (" (= backend='onnxruntime', int8)" if ours else "")
        cs.append(Contender(name, "ort", run, model, ceiling="int8"))
    cfg = fp32.config.encoder
    for kind in ("fp32", "int8"):
        c = Ceiling(cfg, kind)
        cs.append(
            Contender(
                f"ceiling: {'fp32 torch.mm' if kind == 'fp32' else 'fbgemm int8 Linear'}",
                "ceiling",
                c,
                None,
                ceiling=kind,
            )
        )
    return cs, info


def bench_version(mod: str) -> str:
    try:
        return str(__import__(mod).__version__).split("-")[0]
    except ImportError:
        return "?"


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def call(c: Contender, what: str, x: torch.Tensor, tokens_per_chunk: int) -> Any:
    if c.kind == "ceiling":
        return c.encode.run(x.shape[0] * tokens_per_chunk) if what == "enc" else None
    if what == "enc":
        with torch.inference_mode():
            return c.encode(x)
    return c.model.clip_embeddings(x, SR)


def run_rounds(
    cs: list[Contender], inputs: dict[str, torch.Tensor], rounds: int, gap: float, tokens_per_chunk: int
) -> None:
    keys = list(inputs)
    for c in cs:  # warm-up: one untimed call per input (compile: the compilation of that batch size)
        for k in keys:
            what = k.split()[0]
            if what == "e2e" and c.model is None:
                continue
            t = time.perf_counter()
            call(c, what, inputs[k], tokens_per_chunk)
            c.warmup[k] = time.perf_counter() - t
        log(f"warm-up {c.name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in c.warmup.items()))
    for r in range(rounds):
        for k in keys:
            what = k.split()[0]
            for c in cs:
                if what == "e2e" and c.model is None:
                    continue
                time.sleep(gap)  # let the previous runtime's spinning worker threads go idle
                t = time.perf_counter()
                call(c, what, inputs[k], tokens_per_chunk)
                c.times.setdefault(k, []).append(time.perf_counter() - t)
        log(f"round {r + 1}/{rounds}: " + "; ".join(f"{c.name[:28]} {c.times[keys[0]][-1]:.3f}" for c in cs))


def measure_agreement(cs: list[Contender], ref_encoder, lms: torch.Tensor, waves: torch.Tensor, ref_model) -> None:
    """fp32: max abs difference of the tokens from the plain fp32 encoder; all: min token cosine; e2e: min clip
    embedding cosine."""
    with torch.inference_mode():
        ref = ref_encoder(lms).double()
        ref_clip = ref_model.clip_embeddings(waves, SR).double()
    for c in cs:
        if c.kind == "ceiling":
            continue
        out = torch.as_tensor(np.asarray(call(c, "enc", lms, 0))).double()
        cos = F.cosine_similarity(out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1)
        c.agreement = {"max_abs": float((out - ref).abs().max()), "token_cos_min": float(cos.min())}
        if c.model is not None:
            clip = torch.as_tensor(np.asarray(c.model.clip_embeddings(waves, SR))).double()
            c.agreement["clip_cos_min"] = float(F.cosine_similarity(clip, ref_clip, dim=-1).min())


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def summarise(cs: list[Contender], inputs: dict[str, torch.Tensor], cfg, t_patches: int) -> list[dict[str, Any]]:
    ceil = {c.ceiling: c for c in cs if c.kind == "ceiling"}
    rows = []
    tokens = cfg.grid[0] * t_patches + 1
    for k, x in inputs.items():
        B = x.shape[0]
        base = next(c for c in cs if c.name.endswith("(before)") and c.ceiling == "fp32")
        base_med = float(np.median(base.times[k]))
        for c in cs:
            if k not in c.times:
                continue
            ts = c.times[k]
            med = float(np.median(ts))
            row = {
                "input": k,
                "batch": B,
                "contender": c.name,
                "median_s": med,
                "min_s": min(ts),
                "max_s": max(ts),
                "times_s": ts,
                "x_plain_fp32": base_med / med if c.kind != "ceiling" else None,
                "warmup_s": c.warmup.get(k),
            }
            if k.startswith("enc"):
                cl = ceil.get(c.ceiling)
                if c.kind == "ceiling":
                    row["rate_gflops"] = c.encode.flops(B * tokens) / med / 1e9
                elif cl is not None:
                    rate = encoder_flops(cfg, B, t_patches) / med
                    ceil_rate = cl.encode.flops(B * tokens) / float(np.median(cl.times[k]))
                    row["rate_gflops"] = rate / 1e9
                    row["of_ceiling"] = rate / ceil_rate
            row.update({f"agreement_{a}": v for a, v in c.agreement.items()})
            rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets from the medians: encoder only (the runtimes alone on the export) and end to end (the
    package's pipeline with ``load(backend=...)``, so the ratio says when a backend pays)."""
    out = []
    for k in sorted({r["input"] for r in rows}):
        by = {r["contender"]: r for r in rows if r["input"] == k}

        def med(prefix: str, by: dict = by) -> float | None:
            r = next((r for n, r in by.items() if n.startswith(prefix)), None)
            return r["median_s"] if r else None

        ours, q = med("m2d2_embed fp32 (fused"), med("m2d2_embed int8 (default)")
        others = [v for v in (med("ONNX Runtime"), med("OpenVINO")) if v is not None]
        qu = med("ORT dynamic int8, QUInt8")
        qrow = next((r for n, r in by.items() if n.startswith("m2d2_embed int8 (default)")), {})
        qurow = next((r for n, r in by.items() if n.startswith("ORT dynamic int8, QUInt8")), None)
        out.append(
            {
                "input": k,
                "fp32_vs_fastest_other": min(others) / ours if others else None,
                "int8_vs_ort_quint8": qu / q if qu else None,
                "int8_token_cos_min": qrow.get("agreement_token_cos_min"),
                "ort_quint8_token_cos_min": qurow.get("agreement_token_cos_min") if qurow else None,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"{env['date']}, {env['lscpu_model'] or env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} "
        f"threads; torch {env['torch']} (CPU capability {env['torch_cpu_capability']}), onnxruntime "
        f"{env['onnxruntime']}, openvino {env['openvino']}",
        f"ISA flags present: {' '.join(env['isa_flags']['present']) or '-'}; absent: "
        f"{' '.join(env['isa_flags']['absent'])}" + (f"; env {env['env']}" if env["env"] else ""),
        f"{result['rounds']} rounds, contenders interleaved, medians (min-max); load average at start "
        f"{env['load_average']}",
        "",
        "| input | contender | median s | min-max s | x plain fp32 | GFLOP/s | of ceiling | agreement |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        agr = []
        if "agreement_max_abs" in r and r["agreement_max_abs"] < 1e-3:
            agr.append(f"max abs {r['agreement_max_abs']:.1e}")
        if "agreement_token_cos_min" in r and r["input"].startswith("enc"):
            agr.append(f"token cos min {r['agreement_token_cos_min']:.5f}")
        if "agreement_clip_cos_min" in r and r["input"].startswith("e2e"):
            agr.append(f"clip cos min {r['agreement_clip_cos_min']:.6f}")
        rate = f"{r['rate_gflops']:.0f}" if "rate_gflops" in r else ""
        ofc = f"{r['of_ceiling']:.2f}" if "of_ceiling" in r else ""
        lines.append(
            f"| {r['input']} | {r['contender']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} "
            f"| {'' if r['x_plain_fp32'] is None else format(r['x_plain_fp32'], '.2f')} | {rate} | {ofc} "
            f"| {', '.join(agr)} |"
        )
    lines += [
        "",
        "| input | ours fp32 (torch) vs faster of ORT/OpenVINO fp32 (e2e: load(backend=...)) | ours int8 vs "
        "ORT QUInt8 | int8 token cos min (ours / ORT QUInt8) |",
        "|---|---:|---:|---|",
    ]
    for t in result["targets"]:
        f = f"{t['fp32_vs_fastest_other']:.2f}x" if t["fp32_vs_fastest_other"] else ""
        q = f"{t['int8_vs_ort_quint8']:.2f}x" if t["int8_vs_ort_quint8"] else ""
        c = (
            f"{t['int8_token_cos_min']:.5f} / {t['ort_quint8_token_cos_min']:.5f}"
            if t["ort_quint8_token_cos_min"] is not None
            else ""
        )
        lines.append(f"| {t['input']} | {f} | {q} | {c} |")
    warm = [r for r in result["rows"] if "compile" in r["contender"] and r.get("warmup_s")]
    if warm:
        lines.append(
            "\ncompile=True warm-up (first call, compilation included): "
            + ", ".join(f"{r['input']} {r['warmup_s']:.0f} s" for r in warm)
        )
    if result.get("export_s"):
        lines.append(f"\nfull-size ONNX export of the encoder: {result['export_s']:.1f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's)")
    p.add_argument("--gap", type=float, default=0.2, help="seconds of idle before each timed call (default 0.2)")
    p.add_argument("--no-e2e", action="store_true", help="encoder-only rows only")
    p.add_argument("--no-compile", action="store_true", help="leave out compile=True (its warm-up is minutes)")
    p.add_argument("--no-bf16", action="store_true", help="leave out bf16")
    p.add_argument("--no-openvino", action="store_true", help="leave out OpenVINO")
    p.add_argument(
        "--torch-only",
        action="store_true",
        help="leave out ONNX Runtime and OpenVINO (e.g. under "
        "ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA caps, which those runtimes do not follow)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="weights and exports (default: bench.py's cache)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    cache = a.cache_dir or bench.default_cache()
    source = bench.ensure_converted(bench.ensure_checkpoint(cache), cache)
    env = cpu_environment()
    log(f"CPU: {env['lscpu_model']}; ISA {env['isa_flags']}; torch capability {env['torch_cpu_capability']}")
    cs, info = build(a, source, cache)
    ref_model = next(c for c in cs if c.name.endswith("(before)")).model
    cfg = ref_model.config.encoder
    T = cfg.grid[1]
    waves = bench.make_clips(max(int(b) for b in a.batches.split(",")), 10.0, torch.device("cpu"))
    with torch.inference_mode():
        lms = ref_model.frontend(waves)[..., : T * cfg.patch_size[1]].contiguous()  # [B, 1, 80, 992]
    inputs: dict[str, torch.Tensor] = {}
    for b in (int(b) for b in a.batches.split(",")):
        inputs[f"enc B={b}"] = lms[:b].clone()
    if not a.no_e2e:
        for b in (int(b) for b in a.batches.split(",")):
            inputs[f"e2e B={b}"] = waves[:b].clone()
    tokens = cfg.grid[0] * T + 1
    run_rounds(cs, inputs, a.rounds, a.gap, tokens)
    measure_agreement(cs, ref_model.encoder, lms, waves, ref_model)
    rows = summarise(cs, inputs, cfg, T)
    result = {
        "environment": env,
        "rounds": a.rounds,
        "threads": threads,
        "rows": rows,
        "targets": targets(rows),
        **info,
        "rss_peak_mib": bench.rss_peak_mib(),
    }
    md = markdown(result)
    print(md)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    if a.markdown:
        a.markdown.write_text(md + "\n")
    return result


if __name__ == "__main__":
    main()
