"""Tagging and sound event detection: the classifier head of fine-tuned models (upstream's EVAR head: BatchNorm1d
without affine + Linear), ``tag``/``frame_tags``, the file engine's ``tags``/``frame_tags`` levels, and events."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_files import signal
from tiny import save_tiny, tiny_config

import m2d2_embed as m2d2
from m2d2_embed import files
from m2d2_embed import model as model_mod
from m2d2_embed.config import ClassifierConfig
from m2d2_embed.model import detect_events

SR = 16000
LABELS = ("dog", "rain", "speech")


@pytest.fixture(scope="module", params=[64, 5 * 64], ids=["mean768-like", "stacked3840-like"])
def tagger(request, tmp_path_factory):
    """A tiny model with a classifier over time-averaged (64-d, frequency-averaged) or stacked (320-d) features."""
    cfg = tiny_config(classifier=ClassifierConfig(in_features=request.param, num_classes=3, labels=LABELS))
    path = save_tiny(tmp_path_factory.mktemp("tagger") / "tiny-tagger", cfg)
    return m2d2.load(path, device="cpu", dtype=torch.float32)


def reference_logits(model, x, frames: bool):
    """Upstream's formula with the head's tensors: forward = Linear(BN(mean_t features)), forward_frames = per frame;
    features are frequency-averaged when the head is one token wide, stacked otherwise."""
    reduce = "mean" if model.config.classifier.in_features == model.embed_dim else "none"
    feats = torch.as_tensor(model.frame_embeddings(x, sample_rate=SR, reduce=reduce))
    sd = model.state_dict()
    bn = (sd["classifier.norm.running_mean"], sd["classifier.norm.running_var"])
    feats = feats if frames else feats.mean(-2)
    z = (feats - bn[0]) / torch.sqrt(bn[1] + 1e-5)
    return z @ sd["classifier.linear.weight"].T + sd["classifier.linear.bias"]


def test_tag_and_frame_tags_follow_upstreams_forward_and_forward_frames(tagger):
    x = np.stack([signal(3.3, SR, 1, s)[:, 0] for s in (1, 2)])
    logits = tagger.tag(x, sample_rate=SR, scores="logits")
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(logits, reference_logits(tagger, x, frames=False), atol=1e-5)
    frames = tagger.frame_tags(x, sample_rate=SR, scores="logits")
    T = tagger.num_frames_for(x.shape[1])
    assert frames.shape == (2, T, 3) and len(tagger.frame_timestamps(x.shape[1])) == T
    np.testing.assert_allclose(frames, reference_logits(tagger, x, frames=True), atol=1e-5)
    # scores: sigmoid by default (multi-label), softmax on request; a 1-D input loses the batch axis
    np.testing.assert_allclose(tagger.tag(x, sample_rate=SR), 1 / (1 + np.exp(-logits)), atol=1e-6)
    sm = tagger.tag(x[0], sample_rate=SR, scores="softmax")
    assert sm.shape == (3,) and abs(sm.sum() - 1) < 1e-5
    assert tagger.labels == list(LABELS) and tagger.has_classifier


def test_top_k_gives_labels_and_scores_best_first(tagger):
    x = signal(2.0, SR, 1, 3)[:, 0]
    scores = tagger.tag(x, sample_rate=SR)
    top = tagger.tag(x, sample_rate=SR, top_k=2)
    order = np.argsort(-scores)[:2]
    assert [lab for lab, _ in top] == [LABELS[j] for j in order]
    np.testing.assert_allclose([s for _, s in top], scores[order], atol=1e-6)
    assert len(tagger.tag(np.stack([x, x]), sample_rate=SR, top_k=1)) == 2
    with pytest.raises(ValueError, match="top_k"):
        tagger.tag(x, sample_rate=SR, top_k=0)
    with pytest.raises(ValueError, match="scores must be"):
        tagger.tag(x, sample_rate=SR, scores="probabilities")


def test_a_clip_alone_is_tagged_as_in_a_batch_of_other_lengths(tagger):
    a, b = signal(1.7, SR, 1, 4)[:, 0], signal(4.1, SR, 1, 5)[:, 0]
    alone = tagger.frame_tags(a, sample_rate=SR)
    batch = tagger.frame_tags([b, a], sample_rate=SR)
    np.testing.assert_allclose(batch[1], alone, atol=1e-5)


def test_models_without_a_head_say_which_models_can_tag(tmp_path):
    m = m2d2.load(save_tiny(tmp_path / "plain"), device="cpu")
    with pytest.raises(ValueError, match="no classifier head.*fine-tuned"):
        m.tag(np.zeros(SR, np.float32), sample_rate=SR)
    with pytest.raises(ValueError, match="no classifier head"):
        m.labels  # noqa: B018
    assert not m.has_classifier


def test_file_engine_tags_levels_match_the_array_api_and_stream_long_files(tagger, tmp_path, monkeypatch):
    sf.write(tmp_path / "short.wav", signal(2.2, SR, 1, 6), SR, subtype="FLOAT")
    sf.write(tmp_path / "long.wav", signal(7.3, SR, 1, 7), SR, subtype="FLOAT")
    monkeypatch.setattr(files, "STREAM_SECONDS", 5.0)  # long.wav is embedded as it streams in
    es = tagger.embed_files(tmp_path, level="tags", num_workers=0, progress=False)
    assert es.metadata["labels"] == list(LABELS) and es.embeddings.shape == (2, 3)
    for p, row in zip(es.paths, es.embeddings):
        np.testing.assert_allclose(row, tagger.tag(p), atol=2e-5)
    fr = tagger.embed_files(tmp_path, level="frame_tags", num_workers=0, progress=False)
    for p, rows, ts in zip(fr.paths, fr.embeddings, fr.timestamps):
        np.testing.assert_allclose(rows, tagger.frame_tags(p), atol=2e-5)
        np.testing.assert_allclose(ts, tagger.frame_timestamps(len(m2d2.load_audio(p))))
    with pytest.raises(ValueError, match="normalize"):
        tagger.embed_files(tmp_path, level="tags", normalize=True, progress=False)


def test_long_path_inputs_stream_through_the_array_api(tagger, tmp_path, monkeypatch):
    sf.write(tmp_path / "long.wav", signal(9.1, SR, 1, 8), SR, subtype="FLOAT")
    p = str(tmp_path / "long.wav")
    whole = tagger.frame_tags(p)
    calls = []
    real = tagger.embed_stream
    monkeypatch.setattr(model_mod, "STREAM_SECONDS", 3.0)
    monkeypatch.setattr(tagger, "embed_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    streamed = tagger.frame_tags(p)
    assert calls and streamed.shape == whole.shape
    np.testing.assert_allclose(streamed, whole, atol=2e-5)
    np.testing.assert_allclose(tagger.tag(p), tagger.tag(m2d2.load_audio(p), sample_rate=SR), atol=2e-5)
    short = str(tmp_path / "short.wav")
    sf.write(short, signal(1.3, SR, 1, 9), SR, subtype="FLOAT")
    mixed = tagger.clip_embeddings([short, p, short])  # the short ones embedded together, the long one streamed
    assert mixed.shape == (3, tagger.frame_dim)
    np.testing.assert_allclose(mixed[0], tagger.clip_embeddings(short), atol=1e-5)
    np.testing.assert_allclose(mixed[1], tagger.clip_embeddings(p), atol=1e-5)
    with pytest.raises(ValueError, match="leave sample_rate out"):
        tagger.clip_embeddings(p, sample_rate=44100)


def test_detect_events_merges_adjacent_frames_above_threshold():
    ts = np.arange(6) * 0.16 + 0.075
    s = np.array([[0.1, 0.9], [0.8, 0.95], [0.9, 0.2], [0.2, 0.1], [0.7, 0.1], [0.1, 0.1]])
    ev = detect_events(s, ts, ["dog", "rain"], threshold=0.5, hop_seconds=0.16)
    assert [(e["label"], round(e["onset"], 3), round(e["offset"], 3), e["score"]) for e in ev] == [
        ("rain", 0.0, 0.315, 0.95),
        ("dog", 0.155, 0.475, 0.9),
        ("dog", 0.635, 0.795, 0.7),
    ]
    assert detect_events(s, ts, ["dog", "rain"], threshold=0.99, hop_seconds=0.16) == []
    with pytest.raises(ValueError, match="do not match"):
        detect_events(s, ts[:3], ["dog", "rain"], threshold=0.5, hop_seconds=0.16)


@pytest.mark.parametrize("norm", [False, True])
def test_a_head_fine_tuned_with_our_trainer_tags_through_the_same_api(tmp_path, norm):
    from types import SimpleNamespace

    from m2d2_embed.train.downstream import FinetuneModel, TaskHead

    dst = save_tiny(tmp_path / "ft", tiny_config(head=None, text=False))
    torch.manual_seed(0)
    head = TaskHead(5 * 64, 2, norm=norm).eval()
    if norm:
        head.norm.running_mean.normal_(0, 0.05)
        head.norm.running_var.uniform_(0.01, 0.1)
    ft = SimpleNamespace(head=head, labels=SimpleNamespace(names=["cough", "sneeze"], multi_label=False))
    ft.classifier_config = lambda: FinetuneModel.classifier_config(ft)
    FinetuneModel.export_extra(ft, dst)  # what `m2d2_embed.train finetune` writes beside the model
    model = m2d2.load(dst, device="cpu", dtype=torch.float32)
    assert model.labels == ["cough", "sneeze"]
    x = signal(2.5, SR, 1, 9)[:, 0]
    feats = torch.as_tensor(model.clip_embeddings(x, sample_rate=SR))  # the trainer's features: stacked, time mean
    with torch.no_grad():
        want = head(feats[None])[0]
    np.testing.assert_allclose(model.tag(x, sample_rate=SR, scores="logits"), want.numpy(), atol=1e-5)
    # a single-label head scores with softmax by default in the file engine
    sf.write(tmp_path / "x.wav", x, SR, subtype="FLOAT")
    es = model.embed_files([tmp_path / "x.wav"], level="tags", num_workers=0, progress=False)
    np.testing.assert_allclose(es.embeddings[0], torch.softmax(want, -1).numpy(), atol=1e-5)
