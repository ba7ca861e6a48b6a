#!/usr/bin/env python
"""Peak memory and time of converting an upstream .pth to our safetensors format (``m2d2_embed.convert``).

    python benchmarks/convert_memory.py                 # the synthetic M2D2 checkpoint (757 MiB), generated once
    python benchmarks/convert_memory.py --pth PATH      # any upstream checkpoint

Each measurement runs in a fresh subprocess; peak RSS is the child's ``ru_maxrss``, reported next to the same
figure for a process that only imports torch and m2d2_embed (the baseline), and as a ratio to the weights' size.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ensure_checkpoint  # noqa: E402

CODE_BASE = "import torch, m2d2_embed"
CODE_CONVERT = "import torch, m2d2_embed, sys; m2d2_embed.convert(sys.argv[1], sys.argv[2])"


def peak_rss_mib(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``python -c code args`` in a fresh process."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code, *args], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN keeps the largest child so far: run the larger measurement after the smaller one
    return max(after, before) / 1024, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pth", type=Path, help="upstream checkpoint (default: the synthetic M2D2 one)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "m2d2_embed" / "bench")
    a = p.parse_args()
    pth = a.pth or ensure_checkpoint(a.cache_dir)
    weights_mib = pth.stat().st_size / 2**20
    base, _ = peak_rss_mib(CODE_BASE)
    with tempfile.TemporaryDirectory() as tmp:
        peak, secs = peak_rss_mib(CODE_CONVERT, str(pth), str(Path(tmp) / "converted"))
    grow = peak - base
    print(f"checkpoint {pth} ({weights_mib:.0f} MiB)")
    print(
        f"convert: {secs:.1f} s, peak RSS {peak:.0f} MiB; baseline (import torch + m2d2_embed) {base:.0f} MiB; "
        f"growth {grow:.0f} MiB = {grow / weights_mib:.2f}x the weights"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
