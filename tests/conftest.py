"""Shared fixtures: the golden outputs of the reference runtime and the seed-0 synthetic checkpoint.

The golden files and the checkpoint generator are copies of ``shared/parity`` (see tests/data/README.md);
the generator writes a 757 MiB checkpoint with the exact layout of the official M2D2 release, once per
test session, into pytest's temporary directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_checkpoint", DATA / "make_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """All golden arrays of the reference runtime (keys like ``len10s.encode_stacked``)."""
    with np.load(DATA / "golden_seed0.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((DATA / "golden_seed0.json").read_text())


@pytest.fixture(scope="session")
def make_checkpoint_module():
    return _load_generator()


@pytest.fixture(scope="session")
def parity_checkpoint(tmp_path_factory, make_checkpoint_module, golden_meta) -> Path:
    """Path of the seed-0 M2D2 2025 checkpoint (``.../checkpoint-30.pth``), generated once per session."""
    out = tmp_path_factory.mktemp("parity")
    path, digest = make_checkpoint_module.write_checkpoint(out, seed=0, variant="m2d_clap_2025")
    assert digest == golden_meta["checkpoint"]["content_sha256"], "generator does not match the golden files"
    return Path(path)


@pytest.fixture(scope="session")
def parity_state_dict(parity_checkpoint) -> dict[str, torch.Tensor]:
    """The raw ``model`` state dict of the seed-0 checkpoint."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    return torch.load(parity_checkpoint, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random M2D2 (depth 2, width 64, semantic CLAP head, 2-layer BERT) saved in our format."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-m2d2")
