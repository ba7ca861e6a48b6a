"""Text-aligned API: CLAP audio/text embeddings, zero-shot scoring and similarity on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import save_tiny, tiny_config

import m2d2_embed as m2d2

SR = 16000


def tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_zero_shot_is_softmax_of_scaled_cosine_between_clap_embeddings(model):
    waves = np.stack([tone(300), tone(2000)])
    labels = ["dog", "rain", "speech"]
    probs = model.zero_shot(waves, labels, sample_rate=SR)
    a = model.clap_audio_embeddings(waves, sample_rate=SR)
    t = model.clap_text_embeddings([f"{x} can be heard" for x in labels]).numpy()
    cos = m2d2.similarity(a, t)
    want = torch.softmax(torch.from_numpy(cos) / 0.01, dim=-1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    raw = model.zero_shot(waves, labels, sample_rate=SR, scores="cosine")
    np.testing.assert_allclose(raw, cos, atol=1e-5)
    custom = model.zero_shot(waves, labels, sample_rate=SR, scores="cosine", template="the sound of {label}")
    t2 = model.clap_text_embeddings([f"the sound of {x}" for x in labels]).numpy()
    np.testing.assert_allclose(custom, m2d2.similarity(a, t2), atol=1e-5)
    assert model.zero_shot(tone(300), labels, sample_rate=SR).shape == (3,)


def test_identical_embeddings_rank_first():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 768)).astype(np.float32)
    s = m2d2.similarity(x, x * 3.0)  # scale does not matter for cosine
    np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-6)
    assert (s.argmax(1) == np.arange(6)).all()


def test_normalize_gives_unit_vectors_in_the_same_direction(model):
    a = model.clap_audio_embeddings(tone(500), sample_rate=SR)
    an = model.clap_audio_embeddings(tone(500), sample_rate=SR, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(an), 1.0, atol=1e-6)
    np.testing.assert_allclose(an, a / np.linalg.norm(a), atol=1e-6)
    t = model.clap_text_embeddings("a dog barks", normalize=True)
    assert t.shape == (64,) and abs(float(t.norm()) - 1.0) < 1e-6


def test_text_in_a_batch_equals_text_alone(model):
    texts = ["a dog barks", "rain on a tin roof while thunder rumbles far away", ""]
    batch = model.clap_text_embeddings(texts)
    for i, s in enumerate(texts):
        torch.testing.assert_close(batch[i], model.clap_text_embeddings(s), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.clap_text_embeddings(texts, batch_size=1), batch, atol=1e-5, rtol=1e-5)


def test_chunked_long_audio_mode_averages_the_head_per_chunk(model):
    x = tone(700, 25.0)
    full = model.clap_audio_embeddings(x, sample_rate=SR, long_audio="full")
    chunks = model.clap_audio_embeddings(x, sample_rate=SR, long_audio="chunks")
    parts = [x[:160160], x[160160:320320], x[320320:]]  # 1001 log-mel frames = 160,160 samples per chunk
    assert full.shape == chunks.shape == (64,)
    assert not np.allclose(full, chunks)
    # auto is the faithful mode for clips up to 300 s
    np.testing.assert_array_equal(model.clap_audio_embeddings(x, sample_rate=SR), full)
    assert len(parts) == model.num_chunks(len(x)) == len(model.plan(len(x)))


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda m: m.clap_text_embeddings([]), ValueError, "at least one"),
        (lambda m: m.clap_text_embeddings(["ok", 3]), TypeError, r"texts\[1\]"),
        (lambda m: m.zero_shot(tone(300), [], sample_rate=SR), ValueError, "labels is empty"),
        (lambda m: m.zero_shot(tone(300), "dog", sample_rate=SR), TypeError, "list of strings"),
        (lambda m: m.zero_shot(tone(300), ["dog"], sample_rate=SR, template="dogs"), ValueError, "{label}"),
        (lambda m: m.zero_shot(tone(300), ["dog"], sample_rate=SR, scores="sigmoid"), ValueError, "scores must be"),
        (lambda m: m.clap_audio_embeddings(tone(300), sample_rate=SR, long_audio="all"), ValueError, "long_audio"),
    ],
)
def test_bad_text_side_inputs_get_clear_errors(model, call, exc, match):
    with pytest.raises(exc, match=match):
        call(model)


def test_audio_only_checkpoint_explains_why_it_has_no_clap(tmp_path):
    m = m2d2.load(save_tiny(tmp_path / "audio-only", tiny_config(head=None, text=False)), device="cpu")
    with pytest.raises(ValueError, match="no text encoder.*M2D-CLAP"):
        m.clap_text_embeddings("a dog")
    with pytest.raises(ValueError, match="no CLAP audio head.*audio-only"):
        m.clap_audio_embeddings(tone(300), sample_rate=SR)
