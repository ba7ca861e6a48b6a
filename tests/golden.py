"""Outputs against the golden files of the reference runtime, at the fp32 tolerances of the parity contract
(``tests/data/tolerances.json``, a copy of the table in ``shared/parity/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data"
# key -> (max abs diff, max abs diff / max abs golden, or None: not checked)
TOLERANCES: dict[str, tuple[float, float | None]] = {
    k: tuple(v) for k, v in json.loads((DATA / "tolerances.json").read_text()).items() if not k.startswith("_")
}


def to_numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_close(got, want: np.ndarray, key: str, kind: str | None = None, tolerances: dict | None = None) -> None:
    """Assert ``got`` matches the golden array ``want`` in shape and within the tolerance of ``kind`` (default:
    ``key`` itself, or ``key`` without its case prefix: ``"len10s.frames"`` -> ``"frames"``)."""
    tolerances = TOLERANCES if tolerances is None else tolerances
    kind = kind or (key if key in tolerances else key.split(".", 1)[-1])
    got = to_numpy(got)
    assert got.shape == want.shape, f"{key}: shape {got.shape} != golden {want.shape}"
    diff = float(np.abs(got.astype(np.float64) - want).max())
    abs_tol, rel_tol = tolerances[kind]
    assert diff <= abs_tol, f"{key}: max abs diff {diff:.3e} > {abs_tol}"
    if rel_tol is not None:
        scale = float(np.abs(want).max())
        assert diff <= rel_tol * scale, f"{key}: max abs diff {diff:.3e} > {rel_tol} x max|golden| ({scale:.3e})"
