"""The command line as a user runs it: ``python -m m2d2_embed ARGS`` in a subprocess, with this checkout first on
the import path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
CLI = [sys.executable, "-m", "m2d2_embed"]


def run(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``m2d2-embed ARGS`` to the end; stdout and stderr as text."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


def start(*args: str) -> subprocess.Popen:
    """Start ``m2d2-embed ARGS`` without waiting (to signal it mid-run); stdout and stderr piped, as text."""
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
