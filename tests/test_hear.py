"""The HEAR 2021 API: attributes, shapes, dtypes, devices, timestamps, and parity with the upstream runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2d2_embed import hear


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return hear.load_model(str(tiny_model_dir), device="cpu")


def audio(n_sounds: int, seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(n_sounds, int(seconds * 16000), generator=g)).float()


def test_model_has_the_required_attributes(model):
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == 5 * 64  # frequency patches stacked (3840 for the real model)
    assert model.timestamp_embedding_size == 64  # frequency patches averaged (768 for the real model)


def test_scene_and_timestamp_embeddings_have_hear_shapes_and_units(model):
    x = audio(3, 2.5)
    scene = hear.get_scene_embeddings(x, model)
    assert scene.shape == (3, model.scene_embedding_size) and scene.dtype == torch.float32
    emb, ts = hear.get_timestamp_embeddings(x, model)
    T = model.m2d2.num_frames_for(x.shape[1])
    assert emb.shape == (3, T, model.timestamp_embedding_size) and emb.dtype == torch.float32
    assert ts.shape == (3, T) and ts.dtype == torch.float32
    # milliseconds, the centre of each 160 ms step: 16 log-mel frames of 10 ms, the first centred at 75 ms
    assert ts[0, 0].item() == pytest.approx(75.0)
    np.testing.assert_allclose(np.diff(ts[0].numpy()), 160.0, rtol=1e-5)
    assert torch.equal(ts[0], ts[2])
    # scene = the time-mean of the stacked frame embeddings; timestamps = frequency-averaged frames
    m = model.m2d2
    torch.testing.assert_close(scene, m.frame_embeddings(x, sample_rate=16000).mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb, m.frame_embeddings(x, sample_rate=16000, reduce="mean"))


def test_one_sound_in_a_batch_equals_the_sound_alone(model):
    x = audio(4, 1.3, seed=1)
    batch = hear.get_scene_embeddings(x, model)
    alone = hear.get_scene_embeddings(x[2:3], model)
    torch.testing.assert_close(batch[2:3], alone, atol=1e-5, rtol=1e-5)


def test_options_clap_scene_and_stacked_frames(tiny_model_dir):
    m = hear.load_model(str(tiny_model_dir), device="cpu", scene_embedding="clap", timestamp_reduce="none")
    assert m.scene_embedding_size == 64 and m.timestamp_embedding_size == 320
    x = audio(2, 1.0)
    assert hear.get_scene_embeddings(x, m).shape == (2, 64)
    assert hear.get_timestamp_embeddings(x, m)[0].shape[-1] == 320
    with pytest.raises(ValueError, match="timestamp_reduce"):
        hear.HearModel(m.m2d2, timestamp_reduce="max")


def test_bad_inputs_are_rejected(model):
    with pytest.raises(TypeError, match="torch.Tensor"):
        hear.get_scene_embeddings(np.zeros((1, 16000), np.float32), model)
    with pytest.raises(ValueError, match=r"\[n_sounds, n_samples\]"):
        hear.get_scene_embeddings(torch.zeros(16000), model)
    with pytest.raises(TypeError, match="load_model"):
        hear.get_scene_embeddings(torch.zeros(1, 16000), model.m2d2)
    assert hear.get_scene_embeddings(torch.zeros(0, 16000), model).shape == (0, model.scene_embedding_size)


@pytest.mark.slow
def test_full_size_model_matches_the_upstream_runtime(parity_checkpoint, golden):
    m = hear.load_model(str(parity_checkpoint), device="cpu", dtype=torch.float32)
    assert (m.scene_embedding_size, m.timestamp_embedding_size) == (3840, 768)
    x = torch.from_numpy(golden["batch3.wav"])
    scene = hear.get_scene_embeddings(x, m)
    emb, ts = hear.get_timestamp_embeddings(x, m)
    want_scene, want_frames = golden["batch3.scene"], golden["batch3.frames"]
    assert np.abs(scene.numpy() - want_scene).max() <= 1.5e-5 * np.abs(want_scene).max()
    assert np.abs(emb.numpy() - want_frames).max() <= 1.5e-5 * np.abs(want_frames).max()
    assert ts.shape == want_frames.shape[:2]
    np.testing.assert_allclose(ts[0].numpy(), m.m2d2.frame_timestamps(x.shape[1]) * 1000, rtol=1e-6)
