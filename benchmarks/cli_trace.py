#!/usr/bin/env python
"""Run ``m2d2-embed ARGS`` in this process, as ``python -m m2d2_embed ARGS`` would, and say when the first batch
entered the encoder: a line ``cli_trace: first encoder call at T`` on stderr (``T``: ``time.time()``), so
that time-to-first-batch can be measured from outside (T less the time the process was started) for any version
of the package, including those that predate the start-up hook (``-vv`` lines ``startup: PHASE at T``).

    PYTHONPATH=. python benchmarks/cli_trace.py embed DIR -o OUT [--stop-at-first-batch] [-vv]

``--stop-at-first-batch``: exit (code 0) right there, writing nothing: time-to-first-batch on a slow CPU without
embedding the whole folder. Used by ``files_gpu.py``; the encoder itself is not changed.
"""

from __future__ import annotations

import os
import sys
import time

from m2d2_embed import cli
from m2d2_embed.model import M2D2


def main(argv: list[str]) -> int:
    stop = "--stop-at-first-batch" in argv
    argv = [a for a in argv if a != "--stop-at-first-batch"]
    encode = M2D2.encode
    seen = []

    def first_marked(self, groups, batch_size=None):
        if not seen:
            seen.append(time.time())
            print(f"cli_trace: first encoder call at {seen[0]:.3f}", file=sys.stderr, flush=True)
            if stop:
                os._exit(0)
        return encode(self, groups, batch_size)

    M2D2.encode = first_marked
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
