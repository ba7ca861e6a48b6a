"""Input handling: every bad input gets a clear error; resampling, integer PCM, output kinds and shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import m2d2_embed as m2d2


def tone(seconds: float, sr: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_shapes_follow_the_input(model):
    x = tone(2.0)
    T = model.num_frames_for(len(x))
    assert T == 13
    assert model.frame_embeddings(x, sample_rate=16000).shape == (T, 5 * 64)
    assert model.frame_embeddings(x[None], sample_rate=16000).shape == (1, T, 5 * 64)
    assert model.frame_embeddings(x, sample_rate=16000, reduce="mean").shape == (T, 64)
    assert model.clip_embeddings(np.stack([x, x]), sample_rate=16000).shape == (2, 320)
    assert model.clip_embeddings(np.stack([x, x]), sample_rate=16000, reduce="mean").shape == (2, 64)
    assert model.clap_audio_embeddings(x, sample_rate=16000).shape == (64,)
    assert model.frame_timestamps(len(x)).shape == (T,)


def test_timestamps_are_frame_window_centres(model):
    ts = model.frame_timestamps(16000 * 25)  # 2501 frames: chunks of 1001, 1001, 499 frames
    assert ts[0] == pytest.approx(7.5 * 0.01)
    assert ts[1] - ts[0] == pytest.approx(0.16)
    assert ts[62] == pytest.approx((1001 + 7.5) * 0.01)  # the second chunk starts at frame 1001
    assert np.all(np.diff(ts) > 0)
    # the same clip described at another sample rate gives the same times
    np.testing.assert_allclose(model.frame_timestamps(44100 * 25, sample_rate=44100), ts)


def test_last_chunk_longer_than_the_position_embedding_is_cut_like_a_full_chunk(model):
    # 1001 + 996 frames: the reference crashes (63 time patches > 62); we ignore the frames past 62 patches
    n = (1001 + 995) * 160
    out = model.frame_embeddings(tone(n / 16000), sample_rate=16000)
    assert out.shape[0] == 62 + 62 == model.num_frames_for(n)


def test_other_sample_rates_are_resampled(model):
    x16 = tone(1.0, 16000)
    x44 = tone(1.0, 44100)
    e16 = model.clip_embeddings(x16, sample_rate=16000)
    e44 = model.clip_embeddings(x44, sample_rate=44100)
    cos = float(np.dot(e16, e44) / np.linalg.norm(e16) / np.linalg.norm(e44))
    assert cos > 0.999
    assert model.frame_embeddings(x44, sample_rate=44100).shape[0] == model.num_frames_for(16000)


def test_integer_pcm_is_scaled_by_full_scale(model):
    x = tone(1.0)
    pcm16 = np.round(x * 32767).astype(np.int16)
    np.testing.assert_allclose(
        model.clip_embeddings(pcm16, sample_rate=16000),
        model.clip_embeddings(pcm16.astype(np.float32) / 32768, sample_rate=16000),
        atol=1e-6,
    )


def test_tensor_input_gives_tensor_on_model_device(model):
    out = model.clip_embeddings(torch.from_numpy(tone(1.0)), sample_rate=16000)
    assert isinstance(out, torch.Tensor) and out.device == model.device


@pytest.mark.parametrize(
    ("audio", "kwargs", "exc", "match"),
    [
        (np.zeros(0, np.float32), {"sample_rate": 16000}, ValueError, "empty"),
        (np.zeros(100, np.float32), {"sample_rate": 16000}, ValueError, "too short"),
        (np.array([0.0, np.nan] * 200, np.float32), {"sample_rate": 16000}, ValueError, "NaN or Inf"),
        (np.array([0.0, np.inf] * 200, np.float32), {"sample_rate": 16000}, ValueError, "NaN or Inf"),
        (np.zeros((2, 2, 16000), np.float32), {"sample_rate": 16000}, ValueError, "expected \\[samples\\]"),
        (np.zeros(16000, np.float32), {}, ValueError, "sample_rate= is required"),
        (np.zeros(16000, np.float32), {"sample_rate": 0}, ValueError, "not a plausible audio sample rate"),
        (np.zeros(16000, np.complex64), {"sample_rate": 16000}, TypeError, "not supported"),
        (np.zeros(16000, bool), {"sample_rate": 16000}, TypeError, "not supported"),
        ([], {"sample_rate": 16000}, ValueError, "empty list"),
        ([np.zeros((2, 16000), np.float32)], {"sample_rate": 16000}, ValueError, "1-D waveforms"),
        ("/no/such/file.wav", {}, FileNotFoundError, "not found"),
        (12345, {"sample_rate": 16000}, TypeError, "unsupported audio input"),
        (np.zeros((0, 16000), np.float32), {"sample_rate": 16000}, ValueError, "empty"),
    ],
)
def test_bad_audio_gets_a_clear_error(model, audio, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.clip_embeddings(audio, **kwargs)


def test_bad_options_get_clear_errors(model):
    x = tone(1.0)
    with pytest.raises(ValueError, match="reduce must be"):
        model.frame_embeddings(x, sample_rate=16000, reduce="max")
    with pytest.raises(ValueError, match="batch_size must be"):
        model.clip_embeddings(x, sample_rate=16000, batch_size=0)
    with pytest.raises(ValueError, match="align must be"):
        model.frame_timestamps(16000, align="left")
    with pytest.raises(ValueError, match="num_samples must be positive"):
        model.frame_timestamps(0)


def test_unreadable_file_is_a_clear_error(model, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio")
    with pytest.raises(ValueError, match="cannot decode audio file .*ffmpeg"):
        model.clip_embeddings(str(bad))


def test_file_paths_are_accepted(model, tmp_path):
    import soundfile as sf

    x = tone(1.5, 22050)
    sf.write(tmp_path / "a.wav", x, 22050, subtype="FLOAT")
    from_file = model.clip_embeddings(str(tmp_path / "a.wav"))
    from_array = model.clip_embeddings(x, sample_rate=22050)
    np.testing.assert_allclose(from_file, from_array, atol=1e-4)
    assert model.clip_embeddings([tmp_path / "a.wav", tmp_path / "a.wav"]).shape == (2, 320)


def test_unknown_model_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'nope'.*m2d2-clap-2025"):
        m2d2.load("nope", device="cpu")


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        m2d2.load(tmp_path / "missing.pth", device="cpu")


def test_bad_device_and_dtype_are_clear_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="invalid device"):
        m2d2.load(tiny_model_dir, device="tpu9")
    with pytest.raises(ValueError, match="unsupported dtype"):
        m2d2.load(tiny_model_dir, device="cpu", dtype="int4")


def test_similarity_is_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    b = np.array([[3.0, 0.0], [1.0, 1.0]], np.float32)
    s = m2d2.similarity(a, b)
    np.testing.assert_allclose(s, [[1.0, 2**-0.5], [0.0, 2**-0.5]], atol=1e-6)
    assert isinstance(m2d2.similarity(torch.from_numpy(a), b), torch.Tensor)
    with pytest.raises(ValueError, match="widths differ"):
        m2d2.similarity(a, np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("rate", "exc", "match"),
    [
        (True, TypeError, "integer number of samples per second"),  # was taken as 1 Hz: hours of audio
        (16000.0, TypeError, "integer number of samples per second"),
        (2, ValueError, "not a plausible audio sample rate"),
        (999, ValueError, "not a plausible"),
        (1_000_000, ValueError, "not a plausible"),
    ],
)
def test_implausible_sample_rates_are_refused_before_any_work(model, rate, exc, match):
    with pytest.raises(exc, match=match):
        model.clip_embeddings(tone(2.0), sample_rate=rate)
    assert model.clip_embeddings(tone(2.0, sr=8000), sample_rate=np.int64(8000)).shape == (320,)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.uint32, np.uint64])
def test_ambiguous_integer_audio_is_refused_not_silenced(model, dtype):
    pcm = np.array((tone(1.0) * 20000).astype(np.int64), dtype=dtype)  # what np.array of Python ints gives
    with pytest.raises(TypeError, match="ambiguous.*int16"):
        model.clip_embeddings(pcm, sample_rate=16000)
    ok = model.clip_embeddings(pcm.astype(np.int16), sample_rate=16000)  # the advice works
    np.testing.assert_allclose(ok, model.clip_embeddings(pcm.astype(np.int16) / 32768.0, sample_rate=16000), atol=1e-5)


def test_soundfile_layout_stereo_is_named_not_called_too_short(model):
    stereo = np.stack([tone(1.0), tone(1.0)], axis=1)  # (samples, channels), as soundfile.read gives
    with pytest.raises(ValueError, match="2-channel audio in soundfile's .samples, channels. layout"):
        model.clip_embeddings(stereo, sample_rate=16000)


def test_a_bad_item_of_a_list_is_named_by_index(model):
    with pytest.raises(ValueError, match=r"audio\[2\]: .*NaN"):
        model.clip_embeddings([tone(1.0), tone(2.0), np.full(16000, np.nan, np.float32)], sample_rate=16000)
    with pytest.raises(ValueError, match=r"audio\[1\]: .*too short"):
        model.clip_embeddings([tone(1.0), tone(0.001)], sample_rate=16000)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"labels": None}, TypeError, "labels must be a list of strings"),
        ({"labels": ["dog"], "template": "a {label} and a {thing}"}, ValueError, r"no other \(found \{thing\}\)"),
        ({"labels": ["dog"], "template": "a {0}"}, ValueError, r"placeholder \{label\}"),
        ({"labels": ["dog"], "template": "a {label"}, ValueError, "not a valid format string"),
    ],
)
def test_zero_shot_labels_and_template_errors_say_what_is_allowed(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.zero_shot(tone(1.0), sample_rate=16000, **kwargs)


def test_zero_shot_scores_of_precomputed_embeddings_equal_zero_shot(model):
    x = np.stack([tone(1.0), tone(2.0, freq=880)[:16000]])
    emb = model.clap_audio_embeddings(x, sample_rate=16000)
    want = model.zero_shot(x, ["dog", "rain"], sample_rate=16000)
    np.testing.assert_allclose(model.zero_shot_scores(emb, ["dog", "rain"]).cpu().numpy(), want, atol=1e-6)


def test_similarity_of_one_and_many_drops_the_single_axis():
    a, b = np.ones(3), np.eye(3)[:2]
    assert m2d2.similarity(a, b).shape == (2,) and m2d2.similarity(b, a).shape == (2,)
    assert m2d2.similarity(b, b).shape == (2, 2) and m2d2.similarity(a, a).shape == ()
