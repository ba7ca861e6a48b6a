#!/usr/bin/env python
"""One short GPU check (a few minutes on one H100): CUDA parity, bf16 agreement and throughput, in one run.

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # results in $OUT (or printed) as JSON + markdown
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke --device cpu --no-compile   # rehearsal without a GPU

1. generates the seed-0 synthetic checkpoint and converts it to our format;
2. fp32 parity on CUDA with TF32 off (matmuls and cuDNN) against tests/data/golden_seed0.npz: max abs diff
   per key vs the tolerances of tests/data/README.md;
3. bf16 (the CUDA default) vs fp32: minimum cosine per embedding (frames, clip, CLAP audio, CLAP text);
4. throughput, 10-s clips (batch 256) and 60-s clips: the reference's strategy (a Python loop over 10-s chunks,
   one clip batch at a time) in fp32 and bf16 autocast, m2d2_embed in bf16 (eager and compiled) and fp32, and
   the bare compiled encoder on precomputed log-mels (the ceiling); PyTorch's default TF32 settings;
5. a 1-hour file (memory-bounded batching), peak GPU memory.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py: checkpoint, baseline and timing helpers)
from bench import SR, cuda_tf32, log  # noqa: E402

import m2d2_embed  # noqa: E402

# tests/data/README.md: (max abs diff, max abs diff / max abs golden); None: not checked
TOLERANCES = {
    "lms": (5e-4, 2.5e-4),
    "encode_stacked": (1e-4, 2.5e-5),
    "encode_flat": (1e-4, 2.5e-5),
    "frames": (5e-5, 1.5e-5),
    "scene": (5e-5, 1.5e-5),
    "clap_audio": (5e-5, 1.5e-5),
    "text.emb": (5e-5, 1.5e-5),
    "text.emb_single": (5e-5, 1.5e-5),
    "timestamps": (1e-2, None),
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
        tok = model._encode_tokens([w])[0]  # (f, T, D)
        plan = model._chunk_plan(model.frontend.num_frames(w.shape[-1]))
        parts = tok.split([t for _, t in plan], dim=1)
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
    return float(bench._cos(_np(test.clap_text_embeddings(caps)), _np(ref.clap_text_embeddings(caps))).min())


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
                        torch._dynamo.reset()
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
            torch._dynamo.reset()
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
    if res.get("throughput"):
        L += [
            "## Throughput",
            "",
            "| clips | path | clips/s | audio-s/s | x ref fp32 | x ref bf16 | x upstream fp32 | x upstream bf16 "
            "| warm-up s | peak GPU MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in res["throughput"]:
            xs = " | ".join(
                _fmt(r.get(k), ".2f") for k in ("x_baseline", "x_ref_bf16", "x_upstream_fp32", "x_upstream_bf16")
            )
            L.append(
                f"| {r['n']} x {r['seconds']:g} s | {r['variant']} | {r['clips_per_s']:.1f} | "
                f"{r['audio_s_per_s']:.0f} | {xs} | {r['warmup_s']:.1f} | {_fmt(r.get('peak_gpu_mib'), '.0f')} |"
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
    p.add_argument("--work-dir", type=Path, help="checkpoint location (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = p.parse_args(argv)
    if a.smoke:
        a.clips, a.clips_60s, a.repeats, a.batch_size = min(a.clips, 2), min(a.clips_60s, 1), 1, min(a.batch_size, 4)
    dev = torch.device(a.device)
    res: dict[str, Any] = {
        "environment": bench.environment(dev),
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

    def encoder_section(compiled: bool):
        m = models.get("bf16") or m2d2_embed.load(conv, device=dev, dtype="bf16")
        res.setdefault("encoder_variants", []).extend(encoder_variants(m, a.batch_size, a.repeats, compiled))

    section("encoder variants", lambda: encoder_section(False))

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
        lengths = {"10 s": (a.clips, 10.0), "60 s": (a.clips_60s, 60.0)}
        rows = bench.run_throughput(variants, dev, lengths, a.repeats, full_warmup=True)
        if compiled:  # the compiled graph against the eager one, on a batch shape already compiled
            x = bench.make_clips(min(bs, max(a.clips, 1)), 10.0, dev, seed=1)
            got, want = comp.frame_embeddings(x, SR, batch_size=bs), bf16.frame_embeddings(x, SR, batch_size=bs)
            res["compiled_vs_eager_bf16_min_cosine"] = float(bench._cos(_np(got), _np(want)).min())
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

    section("throughput", lambda: throughput_section(False))
    if not a.no_compile:
        section("throughput, compiled", lambda: throughput_section(True), optional=True)
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
