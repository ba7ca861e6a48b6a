#!/usr/bin/env python
"""Throughput, load time and memory of m2d2_embed, against the reference's strategy measured in the same run.

The baseline is the same model run the way the upstream runtime (PortableM2D) runs it: for each batch of clips,
the log-mel of the batch, then a Python loop over its 10-s chunks, one encoder call per chunk, in float32 (on CUDA
also under bfloat16 autocast, the reference's fastest setting). "m2d2_embed" is ``model.frame_embeddings``: all
chunks of all clips grouped by width into micro-batches of ``--batch-size`` chunks.

    python benchmarks/bench.py                                   # CPU (+ CUDA when present), default dtypes
    python benchmarks/bench.py --device cuda --dtype bf16 --compile --clips 2048
    python benchmarks/bench.py --reference ~/m2d/examples/portable_m2d.py   # also time the upstream runtime

Weights: the seed-0 synthetic checkpoint (tests/data/make_checkpoint.py; the official release's layout and
size), written once to --cache-dir (default ``$M2D2_BENCH_CACHE`` or ``~/.cache/m2d2_embed/bench``), plus its
conversion to our safetensors format. Speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SR = 16000
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import m2d2_embed  # noqa: E402

DEFAULT_DTYPES = {"cpu": ["fp32", "int8"], "cuda": ["bf16", "fp32"]}


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------


def default_cache() -> Path:
    return Path(os.environ.get("M2D2_BENCH_CACHE") or Path.home() / ".cache" / "m2d2_embed" / "bench")


def ensure_checkpoint(cache: Path) -> Path:
    """The seed-0 synthetic M2D2 2025 ``checkpoint-30.pth`` (757 MiB), generated once into ``cache``."""
    spec = importlib.util.spec_from_file_location("make_checkpoint", DATA / "make_checkpoint.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    path = Path(gen.checkpoint_path(cache))
    if not path.exists():
        expected = json.loads((DATA / "golden_seed0.json").read_text())["checkpoint"]["content_sha256"]
        t = time.perf_counter()
        written, digest = gen.write_checkpoint(cache, seed=0, variant="m2d_clap_2025")
        if digest != expected:
            Path(written).unlink()
            raise RuntimeError(f"generated checkpoint digest {digest} differs from the golden files' {expected}")
        log(f"generated {written} in {time.perf_counter() - t:.1f} s")
    return path


def ensure_converted(pth: Path, cache: Path) -> Path:
    """Our safetensors format of ``pth`` (a directory), converted once."""
    dst = cache / "m2d2-seed0-converted"
    if not (dst / "model.safetensors").exists():
        m2d2_embed.convert(pth, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_peak_mib() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss is in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def make_clips(n: int, seconds: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Noise with a slow envelope, [n, seconds * 16000] float32 on ``device`` (content does not affect speed)."""
    g = torch.Generator().manual_seed(seed)
    samples = int(round(seconds * SR))
    x = torch.randn(n, samples, generator=g) * 0.1
    env = torch.sin(torch.linspace(0, 20, samples))[None] ** 2
    return (x * env).to(device)


@contextlib.contextmanager
def cuda_tf32(enabled: bool):
    """TF32 for matmuls and cuDNN on or off (legacy flags only: mixing them with fp32_precision is an error)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------------------------------------------
# The reference's strategy, on our modules
# ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def reference_strategy(
    model: m2d2_embed.M2D2, x: torch.Tensor, clip_batch: int, autocast: torch.dtype | None = None
) -> torch.Tensor:
    """Stacked frame embeddings [n, T, f*D] computed as the upstream runtime does: per batch of ``clip_batch``
    clips, one log-mel call, then one encoder call per 10-s chunk (the last padded to whole patches), chunks
    joined in time. Same numbers as ``model.frame_embeddings(x)`` in float32; only the batching differs."""
    enc = model.config.encoder
    U, pw, T = enc.chunk_frames, enc.patch_size[1], enc.grid[1]
    f = model.freq_patches
    ctx = torch.autocast(model.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    outs = []
    for b in range(0, x.shape[0], clip_batch):
        wav = x[b : b + clip_batch].to(model.device)
        lms = model.frontend(wav)  # (b, 1, n_mels, F), float32
        embs = []
        with ctx:
            for s in range(0, lms.shape[-1], U):
                c = lms[..., s : s + U]
                c = F.pad(c, (0, -c.shape[-1] % pw))[..., : T * pw]  # whole patches; never more than T of them
                tok = model.encoder(c.to(model.dtype))  # (b, f*t, D)
                t = tok.shape[1] // f
                embs.append(tok.reshape(tok.shape[0], f, t, -1).permute(0, 2, 1, 3).reshape(tok.shape[0], t, -1))
        outs.append(torch.cat(embs, dim=1).float())
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------------------


class Variant:
    """One way of computing frame embeddings for a batch of clips, with its warm-up and timings."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], Any], baseline: bool = False) -> None:
        self.name, self.fn, self.baseline = name, fn, baseline
        self.warmup_s: float | None = None
        self.times: dict[str, list[float]] = {}
        self.cpu_times: dict[str, list[float]] = {}  # process CPU seconds (all threads) per timed call
        self.peak_gpu_mib: dict[str, float] = {}


def run_throughput(
    variants: list[Variant],
    device: torch.device,
    lengths: dict[str, tuple[int, float]],
    repeats: int,
    full_warmup: bool,
) -> list[dict[str, Any]]:
    """Time every variant on every clip length, interleaved (round r runs all variants once), best of ``repeats``.

    Warm-up: one untimed call per variant and length, on the full input when ``full_warmup`` (CUDA, compile:
    every batch shape gets built) or on two clips otherwise.
    """
    rows = []
    for label, (n, seconds) in lengths.items():
        if n <= 0:
            continue
        x = make_clips(n, seconds, device)
        for v in variants:
            dt = timed(partial(v.fn, x if full_warmup else x[:2]), device)
            v.warmup_s = dt if v.warmup_s is None else v.warmup_s + dt
        for r in range(repeats):
            for v in variants:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                cpu0 = time.process_time()
                dt = timed(partial(v.fn, x), device)
                v.times.setdefault(label, []).append(dt)
                v.cpu_times.setdefault(label, []).append(time.process_time() - cpu0)
                if device.type == "cuda":
                    v.peak_gpu_mib[label] = torch.cuda.max_memory_allocated(device) / 2**20
                log(f"  {device.type} {label} {v.name}: {dt:.3f} s ({n * seconds / dt:.1f} audio-s/s) [round {r + 1}]")
        del x
        base = [v for v in variants if v.baseline]
        base_best = min(base[0].times[label]) if base else None
        base_median = float(np.median(base[0].times[label])) if base else None
        for v in variants:
            best, median = min(v.times[label]), float(np.median(v.times[label]))
            rows.append(
                {
                    "device": device.type,
                    "variant": v.name,
                    "clips": label,
                    "n": n,
                    "seconds": seconds,
                    "time_s": best,
                    "clips_per_s": n / best,
                    "audio_s_per_s": n * seconds / best,
                    "x_baseline": (base_best / best) if base_best else None,
                    "x_baseline_median": (base_median / median) if base_median else None,
                    "times_s": v.times[label],
                    "cpu_times_s": v.cpu_times[label],
                    "warmup_s": v.warmup_s,
                    "peak_gpu_mib": v.peak_gpu_mib.get(label),
                }
            )
    return rows


def build_variants(
    device: torch.device,
    source: Path,
    dtypes: list[str],
    batch_size: int | None,
    compile_: bool,
    clip_batch: int,
    reference: Path | None,
    pth: Path,
) -> list[Variant]:
    fp32 = m2d2_embed.load(source, device=device, dtype="fp32")
    variants = [Variant("reference strategy, fp32", lambda x: reference_strategy(fp32, x, clip_batch), baseline=True)]
    if device.type == "cuda":
        variants.append(
            Variant(
                "reference strategy, bf16 autocast",
                lambda x: reference_strategy(fp32, x, clip_batch, autocast=torch.bfloat16),
            )
        )
    if reference is not None:
        variants += upstream_variants(reference, pth, device, clip_batch)
    for dt in dtypes:
        for comp in [False, True] if compile_ and dt != "int8" else [False]:
            m = fp32 if (dt == "fp32" and not comp) else m2d2_embed.load(source, device=device, dtype=dt, compile=comp)
            name = f"m2d2_embed, {dt}" + (", compiled" if comp else "")
            variants.append(Variant(name, lambda x, m=m: m.frame_embeddings(x, SR, batch_size=batch_size)))
    return variants


# ---------------------------------------------------------------------------------------------------
# The upstream runtime (optional; needs the user's own portable_m2d.py with nnAudio and timm installed)
# ---------------------------------------------------------------------------------------------------


def import_upstream(path: Path):
    spec = importlib.util.spec_from_file_location("portable_m2d", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_upstream(path: Path, pth: Path, flat: bool = False):
    mod = import_upstream(path)
    kw = {"flat_features": flat} if "flat_features" in inspect.signature(mod.PortableM2D).parameters else {}
    with contextlib.redirect_stdout(sys.stderr):  # it prints its loading messages
        return mod.PortableM2D(weight_file=str(pth), **kw)


def upstream_variants(path: Path, pth: Path, device: torch.device, clip_batch: int) -> list[Variant]:
    ref = build_upstream(path, pth).to(device).eval()

    @torch.inference_mode()
    def run(x: torch.Tensor, autocast: torch.dtype | None = None) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx:
            return torch.cat([ref.encode(x[b : b + clip_batch]).float() for b in range(0, x.shape[0], clip_batch)])

    out = [Variant("upstream PortableM2D, fp32", run)]
    if device.type == "cuda":
        out.append(Variant("upstream PortableM2D, bf16 autocast", lambda x: run(x, torch.bfloat16)))
    return out


# ---------------------------------------------------------------------------------------------------
# Load time and memory (fresh subprocesses, so page cache aside nothing is shared)
# ---------------------------------------------------------------------------------------------------


def child_load(kind: str, path: str, device: str, reference: str | None) -> None:
    """Load, then one embedding of a 1-s clip and one caption (weights are memory-mapped: the first call is what
    brings them into memory). Prints the times and the peak RSS before and after as JSON."""
    dev = torch.device(device)
    base = rss_peak_mib()
    t = time.perf_counter()
    if kind == "upstream":
        m = build_upstream(Path(reference), Path(path)).to(dev)
    else:
        m = m2d2_embed.load(path, device=dev, dtype="fp32")
    sync(dev)
    load_s = time.perf_counter() - t
    rss_load = rss_peak_mib()
    wav = make_clips(1, 1.0, dev)
    t = time.perf_counter()
    with torch.inference_mode():
        if kind == "upstream":
            m.encode(wav)
        else:
            m.clip_embeddings(wav, SR)
            if m.text_encoder is not None:
                m.clap_text_embeddings(["a dog barks"])
    sync(dev)
    print(
        json.dumps(
            {
                "seconds": load_s,
                "first_call_s": time.perf_counter() - t,
                "rss_base_mib": base,
                "rss_load_mib": rss_load,
                "rss_peak_mib": rss_peak_mib(),
            }
        )
    )


def measure_load(
    pth: Path, converted: Path, device: torch.device, reference: Path | None, repeats: int = 2
) -> list[dict[str, Any]]:
    """Load time (best of ``repeats`` fresh processes, warm page cache) and peak RSS growth during the load."""
    cases = [("converted safetensors", "ours", converted), ("upstream .pth, converted on the fly", "ours", pth)]
    if reference is not None:
        cases.append(("upstream PortableM2D from .pth", "upstream", pth))
    weights_mib = (converted / "model.safetensors").stat().st_size / 2**20
    rows = []
    for label, kind, path in cases:
        best = None
        for _ in range(repeats):
            cmd = [sys.executable, __file__, "--child-load", kind, str(path), "--device", str(device)]
            if reference is not None:
                cmd += ["--reference", str(reference)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                log(f"load measurement {label!r} failed:\n{res.stderr[-2000:]}")
                break
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        if best is None:
            continue
        grow = best["rss_peak_mib"] - best["rss_base_mib"]
        rows.append(
            {
                "device": device.type,
                "source": label,
                "load_s": best["seconds"],
                "first_call_s": best["first_call_s"],
                "rss_growth_mib": grow,
                "weights_mib": weights_mib,
                "rss_growth_x_weights": grow / weights_mib,
                "rss_peak_mib": best["rss_peak_mib"],
            }
        )
        log(
            f"  load {label}: {best['seconds']:.2f} s + first call {best['first_call_s']:.2f} s, "
            f"RSS +{grow:.0f} MiB ({grow / weights_mib:.2f}x weights)"
        )
    return rows


# ---------------------------------------------------------------------------------------------------
# Agreement of a reduced-precision model with float32, on the parity inputs
# ---------------------------------------------------------------------------------------------------


def parity_waves() -> dict[str, np.ndarray]:
    with np.load(DATA / "golden_seed0.npz", allow_pickle=False) as z:
        return {k[:-4]: z[k] for k in z.files if k.endswith(".wav")}


def cosines(a: Any, b: Any) -> torch.Tensor:
    """Cosine similarity of each pair of vectors (the last axis) of two arrays of one shape, in float64."""
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1)


def agreement(test: m2d2_embed.M2D2, ref: m2d2_embed.M2D2, waves: dict[str, np.ndarray]) -> dict[str, float]:
    """Minimum cosine similarity, over all parity inputs, per embedding: stacked frames [T, 3840], frames
    averaged over frequency [T, 768], clip [3840] and CLAP audio [768]."""
    out: dict[str, float] = {}
    calls = {
        "frame": ("frame_embeddings", {}),
        "frame_mean": ("frame_embeddings", {"reduce": "mean"}),
        "clip": ("clip_embeddings", {}),
    }
    if ref.audio_proj is not None:
        calls["clap"] = ("clap_audio_embeddings", {})
    for w in waves.values():
        for k, (method, kw) in calls.items():
            c = float(cosines(getattr(test, method)(w, SR, **kw), getattr(ref, method)(w, SR, **kw)).min())
            out[k] = min(out.get(k, 1.0), c)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def environment(device: torch.device | None = None) -> dict[str, Any]:
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_flags": isa_flags(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)
        env["cuda"] = torch.version.cuda
    return env


# the ISA extensions that decide CPU speed (lscpu's names): AVX-512 and VNNI for int8, AVX512-BF16/AMX for bf16
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def isa_flags() -> dict[str, list[str]]:
    """Which of ``ISA_FLAGS`` the CPU has (``present``) and lacks (``absent``), from /proc/cpuinfo (lscpu's flags)."""
    from m2d2_embed.encoder import cpu_flags

    flags = cpu_flags()
    return {"present": [f for f in ISA_FLAGS if f in flags], "absent": [f for f in ISA_FLAGS if f not in flags]}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown(result: dict[str, Any]) -> str:
    lines = []
    env = result["environment"]
    lines.append(
        f"{env['date']}, torch {env['torch']}, {env['cpu']} ({env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads)" + (f", {env['gpu']}" if "gpu" in env else "")
    )
    lines.append(
        f"CPU ISA: {' '.join(env['isa_flags']['present']) or '-'} (absent: "
        f"{' '.join(env['isa_flags']['absent']) or '-'}); torch CPU capability {env['torch_cpu_capability']}"
    )
    if result.get("throughput"):
        lines += [
            "",
            "| device | path | clips | clips/s | audio-s/s | x baseline (best) | x baseline (median) | warm-up s |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in result["throughput"]:
            xb = f"{r['x_baseline']:.2f}" if r["x_baseline"] else ""
            xm = f"{r['x_baseline_median']:.2f}" if r.get("x_baseline_median") else ""
            lines.append(
                f"| {r['device']} | {r['variant']} | {r['n']} x {r['seconds']:g} s | {r['clips_per_s']:.2f} | "
                f"{r['audio_s_per_s']:.1f} | {xb} | {xm} | {r['warmup_s']:.1f} |"
            )
    if result.get("load"):
        lines += [
            "",
            "| device | load from | load() s | first call s | peak RSS growth MiB | x weights size |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in result["load"]:
            lines.append(
                f"| {r['device']} | {r['source']} | {r['load_s']:.2f} | {r['first_call_s']:.2f} | "
                f"{r['rss_growth_mib']:.0f} | {r['rss_growth_x_weights']:.2f} |"
            )
    for name, agr in result.get("agreement", {}).items():
        lines += [
            "",
            f"{name}: minimum cosine vs fp32 on the parity inputs: "
            + ", ".join(f"{k} {v:.5f}" for k, v in agr.items()),
        ]
    lines.append(f"\nprocess peak RSS: {result.get('rss_peak_mib', 0):.0f} MiB")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="all", help="cpu, cuda, cuda:N or all (CPU, plus CUDA when present)")
    p.add_argument(
        "--dtype", help="comma-separated: fp32, bf16, fp16, int8 (CPU); default fp32,int8 on CPU, bf16,fp32 on CUDA"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="chunks per encoder pass, also clips per reference batch (default: the model's, 32 on CPU, 256 on CUDA)",
    )
    p.add_argument("--clips", type=int, help="number of 10-s clips (default 16 on CPU, 2048 on CUDA; 0 skips)")
    p.add_argument("--clips-60s", type=int, help="number of 60-s clips (default 4 on CPU, 256 on CUDA; 0 skips)")
    p.add_argument("--compile", action="store_true", help="also time load(..., compile=True)")
    p.add_argument("--repeats", type=int, help="timed rounds, best reported (default 2 on CPU, 3 on CUDA)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--no-load", action="store_true", help="skip the load time / memory measurement")
    p.add_argument("--no-agreement", action="store_true", help="skip the int8/bf16 agreement measurement")
    p.add_argument(
        "--reference",
        type=Path,
        help="the upstream portable_m2d.py (needs nnAudio, timm, einops) to time the real upstream runtime as well",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="where the synthetic checkpoint is written")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown here")
    p.add_argument("--child-load", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child_load:
        child_load(a.child_load[0], a.child_load[1], a.device, str(a.reference) if a.reference else None)
        return {}
    if a.device == "all":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [m2d2_embed.loader.resolve_device(a.device)]
    cache = a.cache_dir or default_cache()
    pth = ensure_checkpoint(cache)
    converted = ensure_converted(pth, cache)
    result: dict[str, Any] = {
        "environment": environment(devices[-1]),
        "args": {k: str(v) for k, v in vars(a).items()},
        "throughput": [],
        "load": [],
        "agreement": {},
    }
    for dev in devices:
        cpu = dev.type == "cpu"
        dtypes = a.dtype.split(",") if a.dtype else DEFAULT_DTYPES[dev.type]
        if not cpu and "int8" in dtypes:
            dtypes.remove("int8")
            log("int8 runs on the CPU only; skipped on CUDA")
        n10 = a.clips if a.clips is not None else (16 if cpu else 2048)
        n60 = a.clips_60s if a.clips_60s is not None else (4 if cpu else 256)
        bs = a.batch_size or (32 if cpu else 256)
        log(f"{dev}: dtypes {dtypes}, batch size {bs}, {n10} x 10 s and {n60} x 60 s clips")
        if not a.no_load:
            result["load"] += measure_load(pth, converted, dev, a.reference)
        with cuda_tf32(False):
            variants = build_variants(dev, converted, dtypes, a.batch_size, a.compile, bs, a.reference, pth)
            lengths = {"10 s": (n10, 10.0), "60 s": (n60, 60.0)}
            result["throughput"] += run_throughput(
                variants, dev, lengths, a.repeats or (2 if cpu else 3), full_warmup=not cpu or a.compile
            )
        if not a.no_agreement:
            waves = parity_waves()
            ref = m2d2_embed.load(converted, device=dev, dtype="fp32")
            for dt in dtypes:
                if dt != "fp32":
                    with cuda_tf32(False):
                        agr = agreement(m2d2_embed.load(converted, device=dev, dtype=dt), ref, waves)
                    result["agreement"][f"{dev.type} {dt}"] = agr
                    log(f"  agreement {dev.type} {dt}: {agr}")
        del variants
    result["rss_peak_mib"] = rss_peak_mib()
    md = markdown(result)
    print(md)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    if a.markdown:
        a.markdown.write_text(md + "\n")
    return result


if __name__ == "__main__":
    main()
