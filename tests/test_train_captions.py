"""Caption embeddings for stage 1: resumable batches, the transformers backend, upstream's {ytid: emb} files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from train_fixtures import get_synth

from m2d2_embed.train.__main__ import main
from m2d2_embed.train.captions import caption_embeddings
from m2d2_embed.train.data import Row, load_caption_embeddings, read_csv, read_upstream_caption_embeddings


def _hash_embed(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for a sentence embedder: 8 dims from the text's hash."""
    return np.stack(
        [np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8).astype(np.float32) for t in texts]
    )


def test_caption_embeddings_are_aligned_padded_and_resumable(tmp_path):
    rows = [Row(tmp_path / f"{i}.wav", captions=[f"clip {i} caption {k}" for k in range(1 + i % 3)]) for i in range(7)]
    out = tmp_path / "caps.npy"
    assert caption_embeddings(rows, _hash_embed, out, batch_size=2, description="h", stop_after=2) is None
    assert not out.exists() and (tmp_path / "caps.npy.partial.npy").exists()
    calls = []

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return _hash_embed(texts)

    assert caption_embeddings(rows, counting, out, batch_size=2, description="h") == out
    total = sum(len(r.captions) for r in rows)  # 13
    assert sum(calls) == total - 4, "the 4 captions done before the interruption are not embedded again"
    e = np.load(out)
    assert e.shape == (7, 3, 8) and e.dtype == np.float32
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(e[i, : len(r.captions)], _hash_embed(r.captions))
        assert np.isnan(e[i, len(r.captions) :]).all()
    assert not (tmp_path / "caps.npy.partial.npy").exists() and not (tmp_path / "caps.npy.progress.json").exists()


def test_cli_captions_with_a_local_transformers_model(tmp_path_factory, tmp_path):
    transformers = pytest.importorskip("transformers")
    from importlib.resources import files

    vocab = files("m2d2_embed") / "assets" / "bert-base-uncased-vocab.txt"
    tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    tok.save_pretrained(tmp_path / "bert")
    model.save_pretrained(tmp_path / "bert")
    synth = get_synth(tmp_path_factory)
    out = tmp_path / "caps.npy"
    assert main(["captions", str(synth.train_csv), "--embedder", str(tmp_path / "bert"), "-o", str(out)]) == 0
    e = np.load(out)
    rows = read_csv(synth.train_csv)
    assert e.shape == (len(rows), 3, 32) and not np.isnan(e).any()
    # mean pooling over the attention mask of the last hidden state, as upstream's notebooks
    b = tok([rows[0].captions[1]], return_tensors="pt")
    with torch.no_grad():
        want = model.eval()(**b).last_hidden_state.mean(1)[0].numpy()
    np.testing.assert_allclose(e[0, 1], want, rtol=1e-4, atol=1e-5)


def test_upstream_caption_dicts_align_by_youtube_id(tmp_path):
    rows = [Row(tmp_path / "audio" / f"{y}_30000.wav") for y in ("AAAAAAAAAAA", "BBBBBBBBBBB", "CCCCCCCCCCC")]
    a = {"AAAAAAAAAAA": np.ones(4, np.float32), "BBBBBBBBBBB": np.full((2, 4), 2, np.float32)}
    b = {"AAAAAAAAAAA": np.full((1, 4), 3, np.float32)}
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    assert read_upstream_caption_embeddings(tmp_path / "a.npy").keys() == a.keys()
    e = load_caption_embeddings(f"{tmp_path / 'a.npy'},{tmp_path / 'b.npy'}", rows)
    assert e.shape == (3, 2, 4)
    np.testing.assert_array_equal(e[0], [[1] * 4, [3] * 4])  # captions of both files
    np.testing.assert_array_equal(e[1], [[2] * 4, [2] * 4])
    assert np.isnan(e[2]).all()  # no caption: stage 1 leaves the clip out

    class Evil:
        def __reduce__(self):
            return (print, ("unpickling ran code",))

    np.save(tmp_path / "evil.npy", {"AAAAAAAAAAA": Evil()}, allow_pickle=True)
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_upstream_caption_embeddings(tmp_path / "evil.npy")
