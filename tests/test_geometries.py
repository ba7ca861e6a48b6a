"""Golden parity of the other M2D geometries and the EVAR tagging head with the reference runtime, fp32 CPU.

Each layout is a seed-0 synthetic checkpoint of tests/data/make_checkpoint.py with the layout of an official
release; tests/data/make_golden.py ran upstream's ``PortableM2D`` on it (tests/data/README.md):

- ``m2d2_clap_2025_20ms``: M2D2 CLAP with 80x2 patches (one frequency patch, 500 steps of 20 ms per chunk);
- ``m2d_40ms``: 16x4 patches with 2-s chunks (40 ms steps);
- ``m2d_s_608``: M2D-S, 80x2 patches with 608-frame chunks;
- ``m2d_as_32k``: a 32 kHz model (the rate is only in its folder name);
- ``evar_as_ft`` / ``evar_as_ft_3840``: EVAR fine-tuned checkpoints with a 527-class head on 768-d averaged or
  3840-d stacked features.

Long outputs are stored compactly: every step projected to 16 dimensions (x @ P / sqrt(n), P = +-1) plus a few
steps in full. Tolerances are those of tests/test_parity.py, and the same absolute bounds for the projections:
with random signs a projected difference stays within a few times the rms of the difference (measured: at most
6.1e-6 for the projections, 3.5e-6 for frames stored in full, 2.9e-6 for stacked frames), while the realistic
bugs listed in shared/parity/README.md (8e-4 and more, on every coordinate) move them far past the bounds.
The tagging logits must match within 2e-4 absolute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from golden import TOLERANCES
from golden import assert_close as assert_golden

import m2d2_embed as m2d2
from m2d2_embed import hear

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"

GEOMETRIES = ["m2d2_clap_2025_20ms", "m2d_40ms", "m2d_s_608", "m2d_as_32k", "evar_as_ft", "evar_as_ft_3840"]
HEADS = ["evar_as_ft", "evar_as_ft_3840"]
TOL = {**TOLERANCES, "logits": (2e-4, None)}  # the tagging head's logits: our own golden files (make_golden.py)
CLAP_CASES = ("len0p5s", "len10p01s")  # short, and a full chunk plus one frame: the head sees both chunks
HEAR_MAX_STEP_MS = 50.0  # the HEAR validator's limit on the timestamp interval


def _cases(variant: str) -> list[str]:
    """The case tags of a golden file, in order (collection time, so not a fixture)."""
    return list(json.loads((DATA / f"golden_{variant}.json").read_text())["cases"])


PARAMS = [(v, c) for v in GEOMETRIES for c in _cases(v)]
HEAD_PARAMS = [(v, c) for v in HEADS for c in _cases(v)]


def assert_close(got, want: np.ndarray, key: str, kind: str) -> None:
    assert_golden(got, want, key, kind, tolerances=TOL)


@pytest.fixture(scope="module")
def geometry(request, geometry_checkpoint, golden_geometry):
    """(variant, model, golden arrays, golden meta) for the variant in ``request.param``; one model at a time."""
    variant = request.param
    torch.manual_seed(0)
    model = m2d2.load(geometry_checkpoint(variant), device="cpu", dtype=torch.float32)
    arrays, meta = golden_geometry(variant)
    yield variant, model, arrays, meta
    del model


def _wav(make_golden_module, meta: dict, variant: str, case: str) -> np.ndarray:
    c = meta["cases"][case]
    wav = make_golden_module.case_inputs(variant, case, c["seconds"], c["batch"], c["silent_tail_s"])
    assert make_golden_module.input_sha256(wav) == c["input_sha256"], f"{variant}/{case}: input not reproduced"
    return wav


def _by_variant(params):
    return pytest.mark.parametrize(
        ("geometry", "case"), params, indirect=["geometry"], ids=[f"{v}-{c}" for v, c in params]
    )


# -- configuration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES, indirect=True)
def test_layout_is_recognised(geometry):
    variant, model, _, meta = geometry
    g = meta["geometry"]
    enc = model.config.encoder
    assert model.sample_rate == g["sample_rate"]
    assert model.config.frontend.hop_length == g["hop"]
    assert list(enc.input_size) == g["input_size"] and list(enc.patch_size) == g["patch_size"]
    assert model.freq_patches == g["freq_patches"] and model.frame_dim == 768 * g["freq_patches"]
    assert enc.grid[1] == g["steps_per_chunk"]
    mean, std = meta["reference"]["mean_std"]
    assert model.config.frontend.norm_mean == pytest.approx(mean, abs=1e-6)
    assert model.config.frontend.norm_std == pytest.approx(std, abs=1e-6)
    assert model.frame_hop_seconds == pytest.approx(g["frame_hop_ms"] / 1000, abs=1e-12)
    assert (model.audio_proj is not None) == (variant == "m2d2_clap_2025_20ms")


# -- embeddings --------------------------------------------------------------------------------------------------
def _stacked(model, variant: str, case: str, wav: np.ndarray, sr: int) -> np.ndarray:
    """``frame_embeddings`` (stacked, the default), computed once per case: the encoder is the expensive part."""
    key = (variant, case)
    if key not in _STACKED:
        _STACKED.clear()  # one variant at a time
        _STACKED[key] = model.frame_embeddings(wav, sample_rate=sr)
    return _STACKED[key]


_STACKED: dict[tuple[str, str], np.ndarray] = {}


@_by_variant(PARAMS)
def test_frame_embeddings_match_reference(geometry, case, make_golden_module):
    """Every case, from one encoder pass: the stacked frames, their mean over frequency patches (the reference's
    average_per_time_frame) and their mean over time (the reference's scene embedding)."""
    variant, model, g, meta = geometry
    wav = _wav(make_golden_module, meta, variant, case)
    sr = meta["geometry"]["sample_rate"]
    f = meta["geometry"]["freq_patches"]
    stacked = _stacked(model, variant, case, wav, sr)
    B, T = wav.shape[0], meta["cases"][case]["T"]
    assert isinstance(stacked, np.ndarray) and stacked.dtype == np.float32
    assert stacked.shape == (B, T, f * 768)
    p768 = g["proj.P768"]
    if f > 1:
        assert_close(stacked[:, T - 1], g[f"{case}.stacked_last"], f"{variant}/{case}.stacked_last", "encode_stacked")
        assert_close(
            make_golden_module.project_stacked(stacked, p768),
            g[f"{case}.stacked_proj"],
            f"{variant}/{case}.stacked_proj",
            "encode_stacked",
        )
    frames = stacked.reshape(B, T, f, 768).astype(np.float64).mean(2)
    assert_close(frames[:, g[f"{case}.sel"]], g[f"{case}.frames_sel"], f"{variant}/{case}.frames_sel", "frames")
    assert_close(
        make_golden_module.project(frames, p768), g[f"{case}.frames_proj"], f"{variant}/{case}.frames_proj", "frames"
    )
    assert_close(stacked.astype(np.float64).mean(1), g[f"{case}.scene"], f"{variant}/{case}.scene", "scene")


@pytest.mark.parametrize("geometry", GEOMETRIES, indirect=True)
def test_public_reductions_match_reference(geometry, make_golden_module):
    """``reduce="mean"`` frames, clip embeddings and (CLAP) the audio embedding through the public API."""
    variant, model, g, meta = geometry
    sr = meta["geometry"]["sample_rate"]
    case = "len0p5s"
    wav = _wav(make_golden_module, meta, variant, case)
    frames = model.frame_embeddings(wav, sample_rate=sr, reduce="mean")
    assert_close(frames[:, g[f"{case}.sel"]], g[f"{case}.frames_sel"], f"{variant}/{case}.frames_sel", "frames")
    assert_close(model.clip_embeddings(wav, sample_rate=sr), g[f"{case}.scene"], f"{variant}/{case}.scene", "scene")
    one = model.frame_embeddings(torch.from_numpy(wav[0]), sample_rate=sr, reduce="mean")
    assert isinstance(one, torch.Tensor) and one.shape == frames.shape[1:]
    for case in [c for c in meta["cases"] if f"{c}.clap_audio" in g and c in CLAP_CASES]:
        wav = _wav(make_golden_module, meta, variant, case)
        assert_close(
            model.clap_audio_embeddings(wav, sample_rate=sr),
            g[f"{case}.clap_audio"],
            f"{variant}/{case}.clap_audio",
            "clap_audio",
        )


# -- time axis ---------------------------------------------------------------------------------------------------
@_by_variant(PARAMS)
def test_frame_count_and_reference_timestamps(geometry, case):
    variant, model, g, meta = geometry
    c = meta["cases"][case]
    sr = c["sample_rate"]
    assert model.num_frames_for(c["samples"]) == c["T"]
    ts_ms = model.frame_timestamps(c["samples"], align="reference") * 1000
    want = g[f"{case}.timestamps"]
    assert want.shape == (c["batch"], c["T"])
    assert np.abs(ts_ms[None] - want).max() <= 1e-2
    # given at another rate, the same clip has the same steps
    other = 48000 if sr != 48000 else 16000
    ts_other = model.frame_timestamps(round(c["samples"] * other / sr), sample_rate=other, align="reference")
    assert ts_other.shape == (c["T"],)


@pytest.mark.parametrize("geometry", GEOMETRIES, indirect=True)
def test_centre_timestamps_step_by_the_frame_hop(geometry):
    """align="center": within a chunk the steps are exactly the patch width; across a chunk edge the gap is the
    frames a full chunk leaves unused (1001 % 2 = 1 frame for 80x2 patches, 9 for 16x16, none for 200/16x4)."""
    variant, model, _, meta = geometry
    g = meta["geometry"]
    case = max(meta["cases"], key=lambda k: meta["cases"][k]["T"])
    c = meta["cases"][case]
    ts = model.frame_timestamps(c["samples"])
    assert ts.shape == (c["T"],)
    hop_s = g["frame_hop_ms"] / 1000
    unused = g["input_size"][1] - g["steps_per_chunk"] * g["patch_size"][1]
    gaps = np.diff(ts)
    spc = g["steps_per_chunk"]
    edge = np.zeros_like(gaps, dtype=bool)
    edge[spc - 1 :: spc] = True
    np.testing.assert_allclose(gaps[~edge], hop_s, atol=1e-9)
    np.testing.assert_allclose(gaps[edge], hop_s + unused * g["hop"] / g["sample_rate"], atol=1e-9)
    assert ts[0] == pytest.approx((g["patch_size"][1] - 1) / 2 * g["hop"] / g["sample_rate"])
    if g["frame_hop_ms"] <= HEAR_MAX_STEP_MS:  # 20 and 40 ms models: HEAR-valid even across chunk edges
        assert gaps.max() * 1000 <= HEAR_MAX_STEP_MS


@pytest.mark.parametrize("geometry", GEOMETRIES, indirect=True)
def test_hear_timestamp_embeddings(geometry, make_golden_module):
    variant, model, g, meta = geometry
    case = "len0p5s"
    wav = _wav(make_golden_module, meta, variant, case)
    hm = hear.HearModel(model)
    assert hm.sample_rate == meta["geometry"]["sample_rate"]
    emb, ts = hear.get_timestamp_embeddings(torch.from_numpy(wav), hm)
    T = meta["cases"][case]["T"]
    assert emb.shape == (1, T, hm.timestamp_embedding_size) == (1, T, 768)
    assert ts.shape == (1, T) and ts.dtype == torch.float32
    assert_close(emb[:, g[f"{case}.sel"]], g[f"{case}.frames_sel"], f"{variant}/{case}.hear", "frames")
    steps = np.diff(ts[0].numpy())
    hop_ms = meta["geometry"]["frame_hop_ms"]
    assert np.median(steps) == pytest.approx(hop_ms, abs=1e-3)  # 20 ms for the 20-ms models
    if hop_ms <= HEAR_MAX_STEP_MS:
        assert steps.max() <= HEAR_MAX_STEP_MS
    scene = hear.get_scene_embeddings(torch.from_numpy(wav), hm)
    assert_close(scene, g[f"{case}.scene"], f"{variant}/{case}.hear_scene", "scene")


# -- the tagging head --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", HEADS, indirect=True)
def test_reference_logits_are_the_evar_head_on_our_features(geometry, geometry_checkpoint, make_golden_module):
    """What tag() / frame_tags() must compute, pinned against the goldens with the checkpoint's raw head tensors:
    BatchNorm1d in eval mode (eps 1e-5, no affine) then the Linear, on the time-mean of the frame features
    (upstream ``forward``) or on each frame (``forward_frames``); the features are 768-d frequency averages for
    a 768-input head and 3840-d stacked frames for a 3840-input head."""
    variant, model, g, meta = geometry
    sd = torch.load(geometry_checkpoint(variant), map_location="cpu", weights_only=True, mmap=True)
    mean, var = (sd[f"module.head.norm.running_{k}"].double().numpy() for k in ("mean", "var"))
    w, b = (sd[f"module.head.mlp.mlp.0.{k}"].double().numpy() for k in ("weight", "bias"))
    assert w.shape == (meta["reference"]["head"]["num_classes"], meta["reference"]["head"]["in_features"])

    def head(x: np.ndarray) -> np.ndarray:
        return (x - mean) / np.sqrt(var + 1e-5) @ w.T + b

    reduce = "mean" if w.shape[1] == 768 else "none"
    for case in ("len0p5s", "len3p3s"):
        wav = _wav(make_golden_module, meta, variant, case)
        feats = model.frame_embeddings(wav, sample_rate=16000, reduce=reduce).astype(np.float64)
        assert_close(head(feats.mean(1)), g[f"{case}.logits"], f"{variant}/{case}.head(forward)", "logits")
        frame_logits = head(feats)
        assert_close(
            frame_logits[:, g[f"{case}.sel"]],
            g[f"{case}.frame_logits_sel"],
            f"{variant}/{case}.head(forward_frames)",
            "logits",
        )
        assert_close(
            make_golden_module.project(frame_logits, g["proj.P527"]),
            g[f"{case}.frame_logits_proj"],
            f"{variant}/{case}.head(forward_frames)_proj",
            "logits",
        )


@_by_variant(HEAD_PARAMS)
def test_tag_logits_match_reference_forward(geometry, case, make_golden_module):
    variant, model, g, meta = geometry
    wav = _wav(make_golden_module, meta, variant, case)
    logits = model.tag(wav, sample_rate=16000, scores="logits")
    assert_close(logits, g[f"{case}.logits"], f"{variant}/{case}.logits", "logits")
    head = meta["reference"]["head"]
    assert model.config.classifier.in_features == head["in_features"]
    assert model.config.classifier.num_classes == head["num_classes"]
    one = model.tag(wav[0], sample_rate=16000, scores="logits")
    assert one.shape == (head["num_classes"],)
    assert np.abs(one - g[f"{case}.logits"][0]).max() <= TOL["logits"][0]


@_by_variant(HEAD_PARAMS)
def test_frame_tags_logits_match_reference_forward_frames(geometry, case, make_golden_module):
    variant, model, g, meta = geometry
    wav = _wav(make_golden_module, meta, variant, case)
    c = meta["cases"][case]
    logits = model.frame_tags(wav, sample_rate=16000, scores="logits")
    assert logits.shape == (c["batch"], c["T"], meta["reference"]["head"]["num_classes"])
    assert_close(
        logits[:, g[f"{case}.sel"]], g[f"{case}.frame_logits_sel"], f"{variant}/{case}.frame_logits_sel", "logits"
    )
    proj = make_golden_module.project(logits, g["proj.P527"])
    assert_close(proj, g[f"{case}.frame_logits_proj"], f"{variant}/{case}.frame_logits_proj", "logits")
    # aligned with frame_timestamps
    assert logits.shape[1] == model.frame_timestamps(c["samples"]).shape[0]
    one = model.frame_tags(wav[0], sample_rate=16000, scores="logits")
    assert one.shape == logits.shape[1:]
