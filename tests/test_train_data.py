"""Training data: CSV lists, one front end for audio and .npy, reproducible crops and batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_fixtures import get_synth

from m2d2_embed.audio import LogMelSpectrogram, load_audio
from m2d2_embed.config import FrontEndConfig
from m2d2_embed.train.data import (
    ClipDataset,
    EpochBatches,
    LabelMap,
    LogMelReader,
    Row,
    load_caption_embeddings,
    make_synthetic_dataset,
    read_csv,
)

FE = FrontEndConfig()


@pytest.fixture
def synth(tmp_path_factory):
    return get_synth(tmp_path_factory)


def test_read_csv_resolves_paths_labels_and_captions(tmp_path):
    (tmp_path / "list.csv").write_text("file,label,caption\na.wav,dog;bark,a dog | barking\n/abs/b.npy,cat,\n")
    rows = read_csv(tmp_path / "list.csv")
    assert rows[0].path == tmp_path / "a.wav" and rows[0].labels == ["dog", "bark"]
    assert rows[0].captions == ["a dog", "barking"]
    assert str(rows[1].path) == "/abs/b.npy" and rows[1].captions == []
    (tmp_path / "bad.csv").write_text("path\nx.wav\n")
    with pytest.raises(ValueError, match="'file' column"):
        read_csv(tmp_path / "bad.csv")


def test_audio_and_npy_go_through_the_same_front_end(synth, tmp_path):
    wav = read_csv(synth.train_csv)[0].path
    x_wav = LogMelReader(FE)(wav)
    wave = torch.from_numpy(load_audio(wav))[None]
    expect = LogMelSpectrogram(FE)(wave)[0] * FE.norm_std + FE.norm_mean  # runtime front end, unnormalised
    torch.testing.assert_close(x_wav, expect, atol=1e-4, rtol=1e-4)
    np.save(tmp_path / "x.npy", x_wav[0].numpy())
    torch.testing.assert_close(LogMelReader(FE)(tmp_path / "x.npy"), x_wav)
    np.save(tmp_path / "bad.npy", np.zeros((64, 10), np.float32))
    with pytest.raises(ValueError, match="expected \\[80, frames\\]"):
        LogMelReader(FE)(tmp_path / "bad.npy")


def test_npy_dataset_matches_wav_dataset(tmp_path):
    wav = make_synthetic_dataset(tmp_path / "w", n_train=2, n_val=1, seed=3)
    npy = make_synthetic_dataset(tmp_path / "n", n_train=2, n_val=1, seed=3, fmt="npy")
    a = ClipDataset(read_csv(wav.train_csv), FE, 64, seed=1)[1]["x"]
    b = ClipDataset(read_csv(npy.train_csv), FE, 64, seed=1)[1]["x"]
    torch.testing.assert_close(a, b)


def test_crops_are_reproducible_per_epoch_and_padded_with_silence(synth):
    rows = read_csv(synth.train_csv)
    ds = ClipDataset(rows, FE, 64, seed=0)
    x0 = ds[0]["x"]
    assert x0.shape == (1, 80, 64)
    assert torch.equal(ds[0]["x"], x0), "same (seed, epoch, index): same crop"
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["x"], x0), "a new epoch draws a new crop"
    long = ClipDataset(rows, FE, 400, seed=0)[0]["x"]
    silence = (np.log(np.finfo(np.float32).eps) - FE.norm_mean) / FE.norm_std
    assert long.shape == (1, 80, 400) and torch.allclose(long[..., -1], torch.tensor(silence, dtype=torch.float32))


def test_caption_embedding_is_drawn_among_valid_captions(tmp_path):
    e = np.full((2, 3, 4), np.nan, np.float32)
    e[0, 0], e[0, 2], e[1, 1] = 1.0, 2.0, 3.0
    np.save(tmp_path / "c.npy", e)
    rows = [Row(tmp_path / "x.npy"), Row(tmp_path / "x.npy")]
    np.save(tmp_path / "x.npy", np.zeros((80, 70), np.float32))
    ds = ClipDataset(rows, FE, 64, caption_embs=load_caption_embeddings(tmp_path / "c.npy"))
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        seen.add(float(ds[0]["caption_emb"][0]))
        assert float(ds[1]["caption_emb"][0]) == 3.0
    assert seen == {1.0, 2.0}
    with pytest.raises(ValueError, match="aligned"):
        ClipDataset(rows[:1], FE, 64, caption_embs=e)


def test_epoch_batches_split_global_batches_across_ranks_and_resume():
    ranks = [list(EpochBatches(22, 3, r, 2, seed=0, epoch=4)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 22 // (3 * 2), remainder dropped
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == 18
    assert list(EpochBatches(22, 3, 1, 2, seed=0, epoch=4, start=2)) == ranks[1][2:]
    assert list(EpochBatches(22, 3, 0, 2, seed=0, epoch=5)) != ranks[0]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatches(5, 3, 0, 2)


def test_label_map_single_and_multi_label():
    rows = [Row(None, ["b"]), Row(None, ["a"])]
    lm = LabelMap.from_rows(rows)
    assert lm.names == ["a", "b"] and not lm.multi_label and lm.encode(["b"]).item() == 1
    multi = LabelMap.from_rows(rows + [Row(None, ["a", "c"])])
    assert multi.multi_label and multi.encode(["a", "c"]).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="not among"):
        lm.encode(["zebra"])
