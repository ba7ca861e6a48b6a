#!/usr/bin/env python
"""Peak memory of embedding one long file by path, through each entry point, each in a fresh process.

    python benchmarks/long_file_memory.py --minutes 60            # default model layout (synthetic weights)

Writes a mono 16-kHz WAV of ``--minutes`` of noise, then for each entry point (``clip_embeddings(path)``,
``clap_audio_embeddings(path)``, ``frame_embeddings(path)``, ``embed_files([path])``) starts a process that loads
the model and embeds the file, and reports its peak resident memory (``ru_maxrss``) next to the peak of a process
that only loads the model. Weights: the seed-0 synthetic checkpoint of ``benchmarks/bench.py`` (same cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CALLS = {
    "load only": "None",
    "clip_embeddings(path)": "model.clip_embeddings(path)",
    "clap_audio_embeddings(path)": "model.clap_audio_embeddings(path)",
    "frame_embeddings(path)": "model.frame_embeddings(path)",
    "embed_files([path])": "model.embed_files([path], num_workers=0, progress=False)",
}


def child(model_dir: str, path: str, call: str) -> None:
    import torch

    import m2d2_embed as m2d2

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = m2d2.load(model_dir, device="cpu", dtype=torch.float32)  # noqa: F841 (used by eval)
    t = time.perf_counter()
    eval(call, {"model": model, "path": path})
    print(
        json.dumps(
            {"seconds": time.perf_counter() - t, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--only", help="comma-separated subset of the entry points")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    import soundfile as sf
    from bench import default_cache, ensure_checkpoint, ensure_converted

    cache = a.cache_dir or default_cache()
    model_dir = ensure_converted(ensure_checkpoint(cache), cache)
    wav = cache / f"noise_{a.minutes:g}min.wav"
    if not wav.exists():
        n = int(a.minutes * 60 * 16000)
        with sf.SoundFile(wav, "w", 16000, 1, "PCM_16") as f:
            rng = np.random.default_rng(0)
            for k in range(0, n, 16000 * 60):
                f.write((0.1 * rng.standard_normal(min(16000 * 60, n - k))).astype(np.float32))
    wanted = a.only.split(",") if a.only else list(CALLS)
    print(f"{a.minutes:g}-minute file, default model layout, CPU fp32")
    print("| entry point | peak RSS (GiB) | seconds |\n|---|---|---|")
    for name in wanted:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(model_dir), str(wav), CALLS[name]],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {r['peak_mib'] / 1024:.2f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
