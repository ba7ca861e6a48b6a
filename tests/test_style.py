"""Guard rails: one formatting style, and no module of the package reaching into another's private names."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_code_is_formatted_with_ruff():
    r = ruff("format", "--check", "m2d2_embed", "tests", "benchmarks")
    assert r.returncode == 0, f"run `ruff format m2d2_embed tests benchmarks`:\n{r.stdout}{r.stderr}"


def test_ruff_lint_including_private_access_is_clean():
    r = ruff("check", "m2d2_embed", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_package_imports_without_its_heavy_dependencies_loaded():
    code = (
        "import sys, m2d2_embed; heavy = [m for m in ('pyarrow', 'ray', 'transformers', 'onnxruntime', "
        "'matplotlib', 'sklearn') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
