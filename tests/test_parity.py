"""Golden parity with the reference runtime (PortableM2D) on the seed-0 synthetic M2D2 checkpoint, fp32 CPU.

Tolerances are those of shared/parity/README.md (tests/data/tolerances.json): (max abs diff, max abs diff relative
to max abs golden).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from golden import TOLERANCES, assert_close

import m2d2_embed as m2d2

CASES = ["len0p1s", "len0p5s", "len1s", "len3p3s", "len10s", "len10p01s", "len25p7s", "batch3"]


@pytest.fixture(scope="module")
def model(parity_checkpoint):
    torch.manual_seed(0)
    return m2d2.load(parity_checkpoint, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("case", CASES)
def test_log_mel_matches_reference(model, golden, case):
    lms = model.frontend(torch.from_numpy(golden[f"{case}.wav"]))
    assert_close(lms, golden[f"{case}.lms"], f"{case}.lms")


@pytest.mark.parametrize("case", CASES)
def test_frame_level_embeddings_match_reference(model, golden, case):
    wav = golden[f"{case}.wav"]
    assert_close(
        model.frame_embeddings(wav, sample_rate=16000), golden[f"{case}.encode_stacked"], f"{case}.encode_stacked"
    )
    assert_close(
        model.frame_embeddings(wav, sample_rate=16000, reduce="mean"), golden[f"{case}.frames"], f"{case}.frames"
    )


@pytest.mark.parametrize("case", CASES)
def test_clip_and_clap_embeddings_match_reference(model, golden, case):
    wav = golden[f"{case}.wav"]
    assert_close(model.clip_embeddings(wav, sample_rate=16000), golden[f"{case}.scene"], f"{case}.scene")
    assert_close(
        model.clap_audio_embeddings(wav, sample_rate=16000), golden[f"{case}.clap_audio"], f"{case}.clap_audio"
    )


@pytest.mark.parametrize("case", ["len3p3s", "len10p01s"])
def test_flat_patch_tokens_match_reference_order(model, golden, case):
    # encode_flat: tokens in (frequency, time) order per chunk, chunks concatenated
    wav = torch.from_numpy(golden[f"{case}.wav"])
    toks = [t[0] for t in model.encode([w[None] for w in wav])]  # each (f, T, D)
    T = model.config.encoder.grid[1]
    flat = [torch.cat([c.reshape(-1, c.shape[-1]) for c in t.split(T, dim=1)]) for t in toks]
    assert_close(torch.stack(flat), golden[f"{case}.encode_flat"], f"{case}.encode_flat")


@pytest.mark.parametrize("case", CASES)
def test_reference_timestamps(model, golden, case):
    wav = golden[f"{case}.wav"]
    ts_ms = model.frame_timestamps(wav.shape[-1], align="reference") * 1000
    want = golden[f"{case}.timestamps"]
    assert want.shape == (wav.shape[0], ts_ms.shape[0])
    assert np.abs(ts_ms[None] - want).max() <= 1e-2


def test_numpy_in_numpy_out_and_tensor_in_tensor_out(model, golden):
    wav = golden["len1s.wav"]
    assert isinstance(model.clip_embeddings(wav, sample_rate=16000), np.ndarray)
    out = model.clip_embeddings(torch.from_numpy(wav), sample_rate=16000)
    assert isinstance(out, torch.Tensor) and out.device == model.device and out.dtype == torch.float32
    one = model.clip_embeddings(wav[0], sample_rate=16000)
    assert one.shape == (3840,)
    frames = model.frame_embeddings(wav[0], sample_rate=16000)
    assert frames.shape == (7, 3840)


def test_clip_alone_equals_clip_in_mixed_length_batch(model, golden):
    a = golden["len3p3s.wav"][0]
    b = golden["len25p7s.wav"][0]
    c = golden["len0p5s.wav"][0]
    alone = model.clip_embeddings(a, sample_rate=16000)
    frames_alone = model.frame_embeddings(a, sample_rate=16000)
    mixed = model.clip_embeddings([b, a, c], sample_rate=16000)
    frames_mixed = model.frame_embeddings([b, a, c], sample_rate=16000)
    assert isinstance(frames_mixed, list) and [f.shape[0] for f in frames_mixed] == [160, 21, 4]
    scale = np.abs(alone).max()
    assert np.abs(mixed[1] - alone).max() <= 1e-5 * scale
    assert np.abs(frames_mixed[1] - frames_alone).max() <= 1e-5 * np.abs(frames_alone).max()
    clap_alone = model.clap_audio_embeddings(a, sample_rate=16000)
    clap_mixed = model.clap_audio_embeddings([b, a, c], sample_rate=16000)
    assert np.abs(clap_mixed[1] - clap_alone).max() <= 1e-5 * np.abs(clap_alone).max()


def test_small_batch_size_gives_the_same_result(model, golden):
    wav = golden["len25p7s.wav"]
    full = model.frame_embeddings(wav, sample_rate=16000)
    one_at_a_time = model.frame_embeddings(wav, sample_rate=16000, batch_size=1)
    assert np.abs(full - one_at_a_time).max() <= 1e-5 * np.abs(full).max()


def test_converted_safetensors_give_identical_outputs(model, golden, parity_checkpoint, tmp_path):
    out = m2d2.convert(parity_checkpoint, tmp_path / "m2d2")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    single = m2d2.convert(out, tmp_path / "one.safetensors")  # our format -> one self-describing file
    wav = golden["len10p01s.wav"]
    ref = model.clip_embeddings(wav, sample_rate=16000)
    for path in (out, single):
        again = m2d2.load(path, device="cpu")
        assert again.config == model.config
        np.testing.assert_array_equal(again.clip_embeddings(wav, sample_rate=16000), ref)


def test_the_tolerances_are_the_parity_contracts():
    # tests/data/tolerances.json is a copy of the table in shared/parity/README.md: it must not drift from it
    contract = Path(__file__).resolve().parents[2] / "shared" / "parity" / "README.md"
    if not contract.exists():
        pytest.skip(f"no parity contract at {contract} (shared/ is beside the checkout in CI)")
    table = contract.read_text().split("## Tolerances", 1)[1]
    want = {}
    for row in re.findall(r"^\|(.+)\|(.+)\|(.*)\|$", table, flags=re.M):
        keys, abs_tol, rel_tol = (c.strip() for c in row)
        if not re.match(r"[\d.]+e-\d+", abs_tol):  # the header, its rule, and the exact rows
            continue
        for key in re.findall(r"`([\w.]+)`", keys):
            want[key] = (float(abs_tol.split()[0]), float(rel_tol) if rel_tol else None)
    assert len(want) >= 9 and want == TOLERANCES
