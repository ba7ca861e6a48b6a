#!/usr/bin/env python
"""Reading a large output back, and merging the shards of a file output: time and peak memory, this checkout
against another copy of the package, interleaved.

    PYTHONPATH=. python3 benchmarks/read_outputs.py --files 65536 --rounds 3 --compare-src /tmp/before

No model. Once, with this checkout, the script writes (into ``--dir`` or a temporary folder):

- an output directory of ``--files`` clip-level results of ``--dim`` float32, in parts of ``--part`` files
  written in a shuffled order (as ``m2d2-embed embed -o DIR/`` writes them as batches complete);
- the same results as ``--shards`` complete shards of a file output (``m2d2-embed embed -o OUT.npz --devices``
  before its merge), files split round-robin as the command line splits them.

Then each round runs, each in a fresh process that imports the package from its source (the order alternating
round by round):

- ``read``: ``read_embeddings(DIR)``;
- ``merge``: ``merge_shards(OUT.npz)`` on a fresh copy of the shards (copied before the process starts).

Reported per source: median seconds and peak resident memory of the process (MB), with the memory of a process
that has only imported the package, and the peak as a multiple of the vectors' size. ``--json FILE`` saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(src: Path, what: str, where: Path) -> dict[str, Any]:
    """In this process: one ``read`` or ``merge`` with the package at ``src``."""
    sys.path.insert(0, str(src))
    import m2d2_embed
    from m2d2_embed import outputs

    assert Path(m2d2_embed.__file__).resolve().is_relative_to(src.resolve()), m2d2_embed.__file__
    base = rss_mb()
    t = time.perf_counter()
    if what == "read":
        n = len(outputs.read_embeddings(where / "out"))
    else:
        report = outputs.merge_shards(where / "merge.npz")
        n = report.added
    return {"s": time.perf_counter() - t, "rss_peak_mb": rss_mb(), "rss_base_mb": base, "files": n}


def write_inputs(where: Path, a: argparse.Namespace) -> None:
    """The output directory and the complete shards of a file output, written with this checkout."""
    import numpy as np

    from m2d2_embed import outputs

    rng = np.random.default_rng(0)
    meta = {"model": "bench", "level": "clip", "dim": a.dim, "reduce": "none", "normalize": False, "format": "npz"}
    paths = [f"/data/{i:07d}.wav" for i in range(a.files)]

    def fill(d: outputs.OutputDir, mine: list[int]) -> None:
        with d.open(meta):
            d.start(meta)
            chunks = [mine[k : k + a.part] for k in range(0, len(mine), a.part)]
            for c in rng.permutation(len(chunks)):  # parts in completion order
                idx = chunks[c]
                emb = rng.standard_normal((len(idx), a.dim), dtype=np.float32)
                d.add_part(outputs.EmbeddingSet([paths[i] for i in idx], emb, "clip", None, np.full(len(idx), 10.0)))

    fill(outputs.OutputDir(where / "out", "npz"), list(range(a.files)))
    template = where / "shards-template"
    for i in range(a.shards):
        shard = template / f"{i:05d}-of-{a.shards:05d}"
        shard.parent.mkdir(exist_ok=True)
        mine = list(range(i, a.files, a.shards))
        fill(outputs.OutputDir(shard, "npz"), mine)
        outputs.mark_complete(shard, {"shard": i, "of": a.shards, "files": len(mine)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--files", type=int, default=65536)
    p.add_argument("--dim", type=int, default=3840, help="embedding width (clip level of ViT-B: 3840)")
    p.add_argument("--part", type=int, default=4096, help="files per part of the output directory")
    p.add_argument("--shards", type=int, default=2, help="shards of the file output (e.g. --devices 2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where the outputs are written (default: a temporary folder)")
    p.add_argument("--compare-src", type=Path, default=None, help="another checkout, measured interleaved")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=3, metavar=("SRC", "WHAT", "DIR"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(Path(a.child[0]), a.child[1], Path(a.child[2]))))
        return 0
    sys.path.insert(0, str(ROOT))
    sources = {"this": ROOT} | ({"compare": a.compare_src.resolve()} if a.compare_src else {})
    mb = a.files * a.dim * 4 / 1e6
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"read": [], "merge": []} for k in sources}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        where = Path(tmp)
        t = time.perf_counter()
        write_inputs(where, a)
        print(f"wrote {a.files} x {a.dim} float32 ({mb:.0f} MB) twice in {time.perf_counter() - t:.1f} s", flush=True)
        for r in range(a.rounds):
            for name in list(sources)[:: 1 if r % 2 == 0 else -1]:
                for what in ("read", "merge"):
                    if what == "merge":  # merging consumes the shards: a fresh copy each time
                        shutil.rmtree(where / "merge.npz.shards", ignore_errors=True)
                        for f in where.glob("merge.*"):  # the merged file and its sidecar
                            f.unlink()
                        shutil.copytree(where / "shards-template", where / "merge.npz.shards")
                    cmd = [sys.executable, __file__, "--child", str(sources[name]), what, str(where)]
                    env = {**os.environ, "PYTHONPATH": str(sources[name])}
                    got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
                    assert got["files"] == a.files, got
                    runs[name][what].append(got)
                    print(
                        f"round {r + 1} {name} {what}: {got['s']:.2f} s, peak RSS {got['rss_peak_mb']:.0f} MB",
                        flush=True,
                    )
    summary: dict[str, Any] = {}
    print(f"\n{a.files} clip-level results of {a.dim} float32 ({mb:.0f} MB), medians of {a.rounds}:")
    for name, by in runs.items():
        for what, rs in by.items():
            m = {k: statistics.median(x[k] for x in rs) for k in ("s", "rss_peak_mb", "rss_base_mb")}
            m["peak_x_vectors"] = (m["rss_peak_mb"] - m["rss_base_mb"]) / mb
            summary.setdefault(name, {})[what] = m | {"rounds": rs}
            print(
                f"{name:>8} {what:>5}: {m['s']:.2f} s, peak RSS {m['rss_peak_mb']:.0f} MB "
                f"(import alone {m['rss_base_mb']:.0f} MB; growth {m['peak_x_vectors']:.2f}x the vectors)"
            )
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a), **summary}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
