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


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model loaded on the CPU, once per test module (modules that need another model override it)."""
    import m2d2_embed as m2d2

    return m2d2.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``audio_files.make_audio_folder``: good and bad audio files, a sub-folder and a hidden file, once per test
    module."""
    from audio_files import make_audio_folder

    return make_audio_folder(tmp_path_factory.mktemp("audio"))


# -- other geometries and the EVAR tagging head (tests/test_geometries.py) ------------------------------------

GEOMETRY_VARIANTS = ("m2d2_clap_2025_20ms", "m2d_40ms", "m2d_s_608", "m2d_as_32k", "evar_as_ft", "evar_as_ft_3840")


@pytest.fixture(scope="session")
def geometry_checkpoint(tmp_path_factory, make_checkpoint_module):
    """``geometry_checkpoint(variant)`` -> path of the seed-0 checkpoint of a make_checkpoint.py variant, written
    once per session (0.3 to 0.75 GiB, 2 to 6 s each) and deleted at the end of the session. The content digest
    must be the one the golden files were made from."""
    out = tmp_path_factory.mktemp("geometries")
    made: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in made:
            meta = json.loads((DATA / f"golden_{variant}.json").read_text())
            path, digest = make_checkpoint_module.write_checkpoint(out, seed=0, variant=variant)
            want = meta["checkpoint"]["content_sha256"]
            assert digest == want, f"{variant}: generator does not match its golden file"
            made[variant] = Path(path)
        return made[variant]

    yield get
    for p in made.values():
        p.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def golden_geometry():
    """``golden_geometry(variant)`` -> (arrays, meta) of ``tests/data/golden_<variant>.npz`` / ``.json``."""
    cache: dict[str, tuple[dict[str, np.ndarray], dict]] = {}

    def get(variant: str) -> tuple[dict[str, np.ndarray], dict]:
        if variant not in cache:
            with np.load(DATA / f"golden_{variant}.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            cache[variant] = arrays, json.loads((DATA / f"golden_{variant}.json").read_text())
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def make_golden_module():
    """tests/data/make_golden.py (its input generator and projections; the upstream runtime is not imported)."""
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (tests/http_fixtures.py), closed after the test."""
    from http_fixtures import FakeServer

    s = FakeServer()
    yield s
    s.close()


@pytest.fixture
def online(monkeypatch):
    """No offline switch or cache location from the environment: downloads go to the test's servers and caches."""
    for var in ("M2D2_EMBED_OFFLINE", "HF_HUB_OFFLINE", "M2D2_EMBED_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
