#!/usr/bin/env python
"""Where the time of ``frame_embeddings`` goes: front end, encoder, pooling and Python, stage by stage.

    PYTHONPATH=. python3 benchmarks/breakdown.py                     # CUDA, bf16, 2048 x 10-s clips, batch 256
    PYTHONPATH=. python3 benchmarks/breakdown.py --device cpu --clips 16 --batch-size 16 --dtype fp32

Each stage is timed alone (synchronised, best of ``--repeats``) on the synthetic checkpoint, then the whole call;
with ``--trace`` a torch.profiler table of the whole call (top CUDA/CPU ops) is printed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import SR, default_cache, ensure_checkpoint, ensure_converted, make_clips, timed  # noqa: E402

import m2d2_embed  # noqa: E402
from m2d2_embed.audio import prepare_audio  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--clips", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--trace", action="store_true")
    a = p.parse_args()
    dev = torch.device(a.device)
    cache = default_cache()
    model = m2d2_embed.load(
        ensure_converted(ensure_checkpoint(cache), cache), device=dev, dtype=a.dtype, compile=a.compile
    )
    x = make_clips(a.clips, a.seconds, dev)
    bs, T, pw = a.batch_size, model.config.encoder.grid[1], model.config.encoder.patch_size[1]

    def best(fn):
        fn()
        return min(timed(fn, dev) for _ in range(a.repeats))

    with torch.inference_mode():
        lms = model.frontend(x[:bs])
        chunk = lms[..., : T * pw].to(model.dtype).contiguous()
        tok = model.encode([x[:bs]], batch_size=bs)[0]  # [bs, f, T, D] float32
        stages = {
            "prepare_audio (checks, list)": lambda: prepare_audio(
                x, SR, model.sample_rate, model.frontend.min_samples(), model.device
            ),
            "front end (log-mel), all clips": lambda: [
                model.frontend(x[k : k + 4 * bs]) for k in range(0, a.clips, 4 * bs)
            ],
            "encoder only, all chunks": lambda: [model.encoder(chunk) for _ in range(0, a.clips, bs)],
            "pooling to frames, all clips": lambda: [model.pool(tok, "frame") for _ in range(0, a.clips, bs)],
            "frame_embeddings (whole call)": lambda: model.frame_embeddings(x, SR, batch_size=bs),
        }
        for name, fn in stages.items():
            s = best(fn)
            print(f"{name:45s} {s * 1000:9.1f} ms  ({a.clips / s:9.1f} clips/s)")
        if a.trace:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                model.frame_embeddings(x, SR, batch_size=bs)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
