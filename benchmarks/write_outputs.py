#!/usr/bin/env python
"""The end of a run: how long after the last embedding arrives a file output is on disk (``m2d2-embed embed -o
OUT.npz``), or ``embed_files`` returns its set, this checkout against another copy of the package, interleaved.

    PYTHONPATH=. python3 benchmarks/write_outputs.py --files 8192 --rounds 7 --compare-src /tmp/before

No model: each measurement feeds ``outputs.ResultWriter`` what ``files.iter_file_embeddings`` yields at clip level
(``--files`` results of ``--dim`` float32; ``--frames T``: frame level, [T, dim] per file), in batches of
``--batch`` that arrive in a shuffled order, as sorting by length makes them (each batch one fresh array, the
results views into it), then times:

- ``add_s``: all the ``add`` calls (during a real run these overlap the device's work on later batches);
- ``file_s``: ``save()`` of a ``--format`` file output (npz by default) into ``--dir``, i.e. what a user waits
  for once the last file is embedded;
- ``set_s``: what ``embed_files`` does after its last result: the in-memory set in input order;
- ``rss_peak_mb``: the process's peak resident memory up to the end of the file output (MB).

``--compare-src DIR``: a checkout of another commit (``git worktree add /tmp/before COMMIT`` or ``git archive COMMIT
m2d2_embed | tar -x -C DIR``). Each measurement runs in a fresh process importing the package from its source;
the order alternates round by round. Prints medians per source and the ratios; ``--json FILE`` saves them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(src: Path, a: argparse.Namespace) -> dict[str, Any]:
    """In this process: the three timings with the package at ``src``."""
    sys.path.insert(0, str(src))
    import numpy as np

    import m2d2_embed
    from m2d2_embed import outputs
    from m2d2_embed.files import FileResult

    assert Path(m2d2_embed.__file__).resolve().is_relative_to(src.resolve()), m2d2_embed.__file__
    rng = np.random.default_rng(0)
    n, dim, batch, frames = a.files, a.dim, a.batch, a.frames
    level = "frame" if frames else "clip"
    order = rng.permutation(n)
    meta = {"model": "bench", "level": level, "dim": dim, "reduce": "none", "normalize": False}
    shape = (n * frames, dim) if frames else (n, dim)
    ts = np.arange(frames) * 0.16 + 0.075 if frames else None

    def rows(embeddings: Any) -> int:  # vectors in a set: [N, D] at clip level, N arrays [T, D] at frame level
        return sum(len(e) for e in embeddings) if frames else len(embeddings)

    kw = {"expected": n} if "expected" in inspect.signature(outputs.ResultWriter).parameters else {}

    def feed(writer: Any) -> float:
        spent = 0.0
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            # one batch's embeddings, in fresh memory, and each file's result a view into it
            flat = rng.standard_normal((len(idx), *((frames,) if frames else ()), dim), dtype=np.float32)
            results = [(int(i), FileResult(f"/data/{i:07d}.wav", flat[k], 10.0, ts)) for k, i in enumerate(idx)]
            t = time.perf_counter()
            for i, r in results:
                writer.add(i, r)
            spent += time.perf_counter() - t
        return spent

    out = Path(a.dir) / f"bench-{os.getpid()}.{a.format}"
    writer = outputs.ResultWriter(out, a.format, meta, level, **kw)
    add_s = feed(writer)
    t = time.perf_counter()
    writer.save()
    file_s = time.perf_counter() - t
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far: the file output's run
    check = outputs.read_embeddings(out)
    assert len(check) == n and rows(check.embeddings) == shape[0]
    del check
    out.unlink()
    outputs.failures_path(out).unlink(missing_ok=True)

    collected = outputs.ResultWriter(None, None if kw else a.format, meta, level, keep=True, **kw)
    feed(collected)
    t = time.perf_counter()
    if hasattr(collected, "embedding_set"):
        es = collected.embedding_set()
    else:  # before: a dict of results packed at the end (files.results_to_set)
        es = outputs.EmbeddingSet.from_results(collected.results(), [], meta, level)
    set_s = time.perf_counter() - t
    assert rows(es.embeddings) == shape[0]
    return {"add_s": add_s, "file_s": file_s, "set_s": set_s, "rss_peak_mb": rss_mb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=8192)
    p.add_argument("--dim", type=int, default=3840, help="embedding width (clip level of ViT-B: 3840)")
    p.add_argument("--batch", type=int, default=256, help="files per arriving batch")
    p.add_argument("--frames", type=int, default=0, help="frame level with this many frames per file (10 s: 62)")
    p.add_argument("--format", default="npz", choices=["npz", "npy", "parquet"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the file output goes (default: a temporary folder)")
    p.add_argument("--compare-src", type=Path, default=None, help="another checkout, measured interleaved")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(measure(a.child, a)))
        return 0
    sources = {"this": ROOT} | ({"compare": a.compare_src.resolve()} if a.compare_src else {})
    with tempfile.TemporaryDirectory() as tmp:
        opts = (("files", a.files), ("dim", a.dim), ("batch", a.batch), ("format", a.format), ("frames", a.frames))
        args = [f"--{k}={v}" for k, v in opts]
        args.append(f"--dir={a.dir or tmp}")
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in sources}
        for r in range(a.rounds):
            for name in list(sources)[:: 1 if r % 2 == 0 else -1]:
                cmd = [sys.executable, __file__, *args, f"--child={sources[name]}"]
                got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                runs[name].append(got)
                shown = ", ".join(
                    f"{k} {v:.0f}" if k.endswith("mb") else f"{k} {1e3 * v:.0f} ms" for k, v in got.items()
                )
                print(f"round {r + 1} {name}: {shown}", flush=True)
    summary = {
        name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} | {"rounds": rs} for name, rs in runs.items()
    }
    mb = a.files * max(a.frames, 1) * a.dim * 4 / 1e6
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import isa_flags

    cpu = " ".join(isa_flags()["present"])
    what = f"[{a.frames}, {a.dim}]" if a.frames else f"{a.dim}"
    print(f"\n{a.files} results of {what} float32 ({mb:.0f} MB), {a.format}; CPU ISA: {cpu}; medians:")
    for name, m in summary.items():
        times = ", ".join(f"{k[:-2]} {1e3 * m[k]:.0f} ms" for k in ("add_s", "file_s", "set_s"))
        print(f"{name:>8}: {times}, peak RSS {m['rss_peak_mb']:.0f} MB")
    if "compare" in summary:
        for k in ("file_s", "set_s"):
            print(f"{k}: compare/this {summary['compare'][k] / summary['this'][k]:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a), **summary}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
