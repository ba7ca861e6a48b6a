#!/usr/bin/env python
"""Decoding alone: how many files per second the decoding stage of ``embed_files`` / ``m2d2-embed embed``
delivers, with no model (``files.start_decoding`` and ``Prefetch.decoded``: probing excluded, workers' start-up
included), this checkout against another copy of the package in the same run, interleaved.

    PYTHONPATH=. python3 benchmarks/decode_files.py --files 2048 --workers 1 --rounds 5 --compare-src /tmp/before

``--compare-src DIR``: a checkout of another commit (``git worktree add /tmp/before COMMIT``). Each measurement
runs in a fresh process that imports the package from its source, so the two never share a process; the order
alternates round by round. The files are 10-s clips (``--files``, written once into ``--folder`` or a temporary
folder, then read from the page cache): ``--kind wav16`` 16-kHz mono 16-bit WAVs (default), ``wav48st`` 48-kHz
stereo WAVs, ``flac44st`` 44.1-kHz stereo FLAC, ``mp3`` 44.1-kHz stereo MP3; the geometry that of the M2D2
ViT-B (16 kHz, 10-s chunks), batches as ``--batch`` clips. On a CUDA machine the batches are pinned as the CLI pins them
(``--device cuda``). Prints files/s per source (median and range of ``--rounds``), the ratio, and the CPU's ISA
flags; ``--json FILE`` saves them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SR, SECONDS = 16000, 10.0


def measure(src: Path, folder: Path, n: int, device: str, batch: int, workers: int, kind: str) -> dict[str, Any]:
    """In this process: decode the first ``n`` files of ``kind`` in ``folder`` with the package at ``src``."""
    sys.path.insert(0, str(src))
    import m2d2_embed
    from m2d2_embed import files
    from m2d2_embed.config import ModelConfig

    assert Path(m2d2_embed.__file__).resolve().is_relative_to(src.resolve()), m2d2_embed.__file__
    config = ModelConfig()  # the ViT-B geometry: 16 kHz, 10-s chunks
    paths = sorted(str(p) for p in folder.glob(f"*.{KINDS[kind][4]}"))[:n]
    probes = time.perf_counter()
    pre = files.start_decoding(paths, config, device, batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    count = first = 0
    t_first = None
    for groups, failures in pre.decoded():
        k = sum(len(i) for i, _ in groups) + len(failures)
        t_last = time.perf_counter()
        if t_first is None:
            t_first, first = t_last, k
        count += k
    t_end = time.perf_counter()
    pre.close()
    t_closed = time.perf_counter()
    assert count == len(paths), (count, len(paths))
    return {
        "files": count,
        "workers": pre.workers,
        "probe_and_start_s": t0 - probes,
        "files_per_s": count / (t_end - t0),
        "steady_files_per_s": (count - first) / (t_end - t_first) if t_first and t_end > t_first else None,
        "tail_s": t_closed - t_last,  # from the last batch to the workers stopped and the buffers let go
        "files_per_s_to_closed": count / (t_closed - t0),  # the whole run up to that point
    }


KINDS = {  # --kind: (sample rate, channels, format, subtype, suffix)
    "wav16": (16000, 1, "WAV", "PCM_16", "wav"),  # the model's rate: read straight into the batch
    "wav48st": (48000, 2, "WAV", "PCM_16", "wav"),  # downmixed and resampled
    "flac44st": (44100, 2, "FLAC", "PCM_16", "flac"),
    "mp3": (44100, 2, "MP3", "MPEG_LAYER_III", "mp3"),
}


def write_files(folder: Path, n: int, kind: str) -> None:
    import numpy as np
    import soundfile as sf

    sr, channels, fmt, subtype, suffix = KINDS[kind]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        p = folder / f"clip_{i:05d}.{suffix}"
        if not p.exists():
            x = np.random.default_rng(i).integers(-3300, 3300, (int(sr * SECONDS), channels), dtype=np.int16)
            sf.write(p, x, sr, format=fmt, subtype=subtype)


def child(src: Path, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(src), "--folder", str(a.folder), "--files", str(a.files)]
    cmd += ["--device", a.device, "--batch", str(a.batch), "--workers", str(a.workers), "--kind", a.kind]
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{src}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2048)
    p.add_argument("--workers", type=int, default=1, help="decoding workers (0: in the main process)")
    p.add_argument("--batch", type=int, default=256, help="clips per batch (default 256, the CUDA default)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda to pin the batches as the CLI does")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kind", choices=list(KINDS), default="wav16", help="the files (default: 16-kHz mono WAV)")
    p.add_argument("--compare-src", type=Path, default=None, help="another checkout, measured interleaved")
    p.add_argument("--folder", type=Path, default=None, help="where the WAVs are (written when missing)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(measure(a.child, a.folder, a.files, a.device, a.batch, a.workers, a.kind)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        a.folder = a.folder or Path(tmp) / "wavs"
        write_files(a.folder, a.files, a.kind)
        sources = {"this": ROOT} | ({"compare": a.compare_src.resolve()} if a.compare_src else {})
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sources}
        child(ROOT, a)  # warm the page cache
        for r in range(a.rounds):
            for name in list(sources) if r % 2 == 0 else list(sources)[::-1]:
                runs[name].append(child(sources[name], a))
                print(f"round {r + 1} {name}: {runs[name][-1]['files_per_s']:.0f} files/s", file=sys.stderr)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import isa_flags

    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "isa_flags": isa_flags()}
    for name, rs in runs.items():
        rates = [x["files_per_s"] for x in rs]
        tail = statistics.median(x.get("tail_s", math.nan) for x in rs)
        closed = statistics.median(x.get("files_per_s_to_closed", math.nan) for x in rs)
        summary[name] = {"median_files_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}
        summary[name] |= {"median_tail_s": tail, "median_files_per_s_to_closed": closed, "runs": rs}
        print(
            f"{name} ({sources[name]}): {statistics.median(rates):.0f} files/s median "
            f"({min(rates):.0f}-{max(rates):.0f}), {a.workers} worker(s), batch {a.batch}, {a.files} {a.kind} files; "
            f"after the last batch {1e3 * tail:.0f} ms to stop the workers and let go of the buffers "
            f"({closed:.0f} files/s up to then)"
        )
    if "compare" in runs:
        ratio = summary["this"]["median_files_per_s"] / summary["compare"]["median_files_per_s"]
        summary["ratio"] = ratio
        print(f"ratio this/compare: {ratio:.2f}x")
    print(f"CPU ISA: {' '.join(summary['isa_flags']['present'])}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
