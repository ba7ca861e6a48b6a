"""Files in, embeddings out: collecting files, embed_files, long-file streaming, and reading outputs back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from audio_files import BAD, GOOD, good_paths, signal
from tiny import save_tiny, tiny_config
from torch.utils.data import DataLoader

import m2d2_embed as m2d2
from m2d2_embed import audio as m2d2_audio
from m2d2_embed import files
from m2d2_embed.files import AudioFileError, NoAudioFilesError, collect_files
from m2d2_embed.outputs import EmbeddingSet, FileFailure


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """Chunks of 97 log-mel frames (about 1 s): long-file streaming is exercised on seconds of audio."""
    return m2d2.load(save_tiny(tmp_path_factory.mktemp("narrow") / "m", tiny_config(width=97)), device="cpu")


def reference(model, path: str, level: str, long_audio: str = "auto") -> np.ndarray:
    if level == "clip":
        return model.clip_embeddings(path)
    if level == "frame":
        return model.frame_embeddings(path)
    return model.clap_audio_embeddings(path, long_audio=long_audio)


# ---------------------------------------------------------------------------------------------------
# collect_files
# ---------------------------------------------------------------------------------------------------


def test_collect_takes_audio_suffixes_sorted_and_skips_hidden_and_other_files(folder):
    got = collect_files(folder)
    names = [Path(p).name for p in got]
    assert names == sorted(list(GOOD) + BAD)
    assert ".hidden.wav" not in names and "notes.txt" not in names


def test_collect_recursive_glob_wildcards_and_duplicates(folder):
    assert [Path(p).name for p in collect_files(folder, recursive=True, glob="*2s.wav")] == ["nested_2s.wav"]
    assert [Path(p).name for p in collect_files(folder, glob="*.flac")] == ["noise_3p3s.flac", "zero_bytes.flac"]
    wav = str(folder / "tone_0p5s.wav")
    assert collect_files([wav, wav, folder / "tone_0p5s.wav"]) == [wav]  # duplicates embedded once
    assert [Path(p).name for p in collect_files(str(folder / "tone_*.wav"))] == ["tone_0p5s.wav", "tone_1s_f32.wav"]
    assert collect_files(folder / "notes.txt") == [str(folder / "notes.txt")]  # named files are taken as they are


def test_collect_explains_why_nothing_was_found(folder, tmp_path):
    with pytest.raises(NoAudioFilesError, match="is empty"):
        collect_files(tmp_path)
    with pytest.raises(NoAudioFilesError, match=r"no files match --glob '\*.mp3'"):
        collect_files(folder, glob="*.mp3")
    (tmp_path / "only_sub").mkdir()
    (tmp_path / "only_sub" / "x").mkdir()
    sf.write(tmp_path / "only_sub" / "x" / "a.wav", signal(0.5, 16000, 1, 0), 16000)
    with pytest.raises(NoAudioFilesError, match="add --recursive"):
        collect_files(tmp_path / "only_sub")
    with pytest.raises(NoAudioFilesError, match="no files match"):
        collect_files(str(folder / "*.mp3"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        collect_files(folder / "missing.wav")


# ---------------------------------------------------------------------------------------------------
# embed_files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["clip", "frame", "clap"])
def test_embed_files_equals_the_per_file_methods(model, folder, level):
    es = model.embed_files(folder, level=level, num_workers=0, progress=False)
    assert es.paths == good_paths(folder)  # input order (sorted folder listing), bad files left out
    assert es.level == level and es.metadata["level"] == level
    for i, p in enumerate(es.paths):
        np.testing.assert_allclose(es.embeddings[i], reference(model, p, level), atol=2e-5, rtol=1e-4)
    if level == "frame":
        for p, ts, e in zip(es.paths, es.timestamps, es.embeddings):
            n = len(m2d2.load_audio(p))
            np.testing.assert_allclose(ts, model.frame_timestamps(n))
            assert ts.shape == (e.shape[0],)
    assert es.dim == (64 if level == "clap" else 320)
    np.testing.assert_allclose(es.durations, [GOOD[Path(p).name][0] for p in es.paths], atol=1e-3)


def test_failed_files_are_reported_and_the_rest_embedded(model, folder):
    es = model.embed_files(folder, num_workers=0, progress=False)
    reasons = {Path(f.path).name: f.reason for f in es.failures}
    assert sorted(reasons) == sorted(BAD)
    assert "cannot decode" in reasons["corrupt.wav"] and "ffmpeg" in reasons["corrupt.wav"]
    assert "zero-length" in reasons["zero_length.wav"]
    assert "0 bytes" in reasons["zero_bytes.flac"]
    assert "too short" in reasons["too_short.wav"]
    with pytest.raises(AudioFileError, match="corrupt.wav"):
        model.embed_files(folder, num_workers=0, progress=False, strict=True)


def test_opus_and_mp3_files_are_read(model, tmp_path):
    sf.write(tmp_path / "a.opus", signal(1.0, 48000, 1, 1), 48000, format="OGG", subtype="OPUS")
    sf.write(tmp_path / "b.mp3", signal(2.0, 44100, 2, 2), 44100, format="MP3", subtype="MPEG_LAYER_III")
    es = model.embed_files(tmp_path, num_workers=0, progress=False)
    assert [Path(p).name for p in es.paths] == ["a.opus", "b.mp3"] and not es.failures
    np.testing.assert_allclose(es.durations, [1.0, 2.0], atol=0.06)


def test_workers_and_small_batches_keep_input_order_and_values(model, folder):
    order = [
        str(folder / n) for n in ["tone_1s_f32.wav", "chirp_12s.ogg", "corrupt.wav", "tone_0p5s.wav", "noise_3p3s.flac"]
    ]
    ref = model.embed_files(order, num_workers=0, progress=False)
    es = model.embed_files(order, num_workers=2, batch_size=1, progress=False)
    assert es.paths == [p for p in order if "corrupt" not in p]
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5)
    assert [f.path for f in es.failures] == [order[2]]


def test_normalize_and_reduce(model, folder):
    es = model.embed_files(
        folder / "tone_0p5s.wav", level="frame", reduce="mean", normalize=True, num_workers=0, progress=False
    )
    assert es.embeddings[0].shape[1] == 64
    np.testing.assert_allclose(np.linalg.norm(es.embeddings[0], axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="level must be"):
        model.embed_files(folder, level="scene", progress=False)


@pytest.mark.parametrize("level", ["clip", "frame", "clap"])
def test_long_files_are_streamed_in_chunk_batches_with_the_same_result(narrow_model, tmp_path, monkeypatch, level):
    # 9.3 s at 44.1 kHz stereo and 7.77 s at 16 kHz: chunks of 0.97 s, steps of 2 chunks, blocks of 4096 frames
    sf.write(tmp_path / "a.flac", signal(9.3, 44100, 2, 1), 44100, subtype="PCM_24")
    sf.write(tmp_path / "b.wav", signal(7.77, 16000, 1, 2), 16000, subtype="FLOAT")
    monkeypatch.setattr(files, "STREAM_SECONDS", 2.0)
    monkeypatch.setattr(m2d2_audio, "READ_BLOCK_FRAMES", 4096)
    es = narrow_model.embed_files(tmp_path, level=level, batch_size=2, num_workers=0, progress=False)
    assert len(es) == 2 and not es.failures
    for i, p in enumerate(es.paths):
        ref = reference(narrow_model, p, level, long_audio="chunks")
        atol = 5e-4 if p.endswith(".flac") else 2e-5  # streamed resampling differs from one-shot at block edges
        np.testing.assert_allclose(es.embeddings[i], ref, atol=atol)
        if level == "frame":
            np.testing.assert_allclose(es.timestamps[i], narrow_model.frame_timestamps(len(m2d2.load_audio(p))))


def test_one_hour_file_embeds_in_bounded_memory(tiny_model_dir, tmp_path):
    path = tmp_path / "hour.wav"
    with sf.SoundFile(path, "w", 16000, 1, subtype="PCM_16") as f:
        block = signal(60.0, 16000, 1, 3)
        for _ in range(60):
            f.write(block)
    script = textwrap.dedent(f"""
        import json, resource, sys
        import m2d2_embed as m2d2
        model = m2d2.load({str(tiny_model_dir)!r}, device="cpu")
        model.clip_embeddings(m2d2.load_audio({str(path)!r})[:16000 * 20], sample_rate=16000)  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        es = model.embed_files({str(path)!r}, level="clip", progress=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"growth_mb": (after - before) / 1024, "duration": float(es.durations[0]),
                           "finite": bool(abs(es.embeddings).sum() > 0)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["duration"] == pytest.approx(3600.0)
    assert res["finite"]
    # the whole file as float32 alone is 230 MB, its spectrogram several times that
    assert res["growth_mb"] < 200, res


# ---------------------------------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npz", "npy", "parquet"])
@pytest.mark.parametrize("level", ["clip", "frame"])
def test_every_format_reads_back_the_same(model, folder, tmp_path, fmt, level):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    es = model.embed_files(folder, level=level, num_workers=0, progress=False)
    out = es.save(tmp_path / f"emb.{fmt}")
    back = m2d2.read_embeddings(out)
    assert back.paths == es.paths and back.level == level
    assert back.metadata["model"] == "tiny" and back.metadata["dim"] == 320
    assert back.metadata["sample_rate"] == 16000 and "m2d2_embed_version" in back.metadata
    np.testing.assert_allclose(back.durations, es.durations)
    assert [f.path for f in back.failures] == [f.path for f in es.failures]
    if level == "frame":
        for a, b, ta, tb in zip(back.embeddings, es.embeddings, back.timestamps, es.timestamps):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(ta, tb)
    else:
        np.testing.assert_array_equal(back.embeddings, es.embeddings)
        assert back.embeddings.dtype == np.float32


def test_parquet_schema_and_error_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    es = EmbeddingSet(
        ["a.wav", "b.wav"],
        [np.ones((3, 4), np.float32), np.zeros((2, 4), np.float32)],
        "frame",
        [np.arange(3.0), np.arange(2.0)],
        np.array([1.0, 0.5]),
        [],
        {"model": "m", "dim": 4},
    )
    es.save(tmp_path / "f.parquet")
    schema = pq.read_schema(tmp_path / "f.parquet")
    assert schema.names == ["path", "model", "level", "dim", "embedding", "timestamps", "duration", "error"]
    assert schema.field("embedding").type == pa.list_(pa.list_(pa.float32(), 4))
    # a folder of Parquet files without a manifest (as a distributed writer leaves it), with an error row
    d = tmp_path / "ray_out"
    d.mkdir()
    clip = EmbeddingSet(
        ["c.wav"], np.ones((1, 4), np.float32), "clip", None, np.array([2.0]), [], {"model": "m", "dim": 4}
    )
    clip.save(d / "0.parquet")
    t = pq.read_table(d / "0.parquet")
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    bad = t.set_column(t.schema.get_field_index("error"), "error", pa.array(["cannot decode"], pa.string()))
    bad = bad.set_column(0, "path", pa.array(["bad.wav"]))
    pq.write_table(bad, d / "1.parquet")
    back = m2d2.read_embeddings(d)
    assert back.paths == ["c.wav"] and back.failures == [FileFailure("bad.wav", "cannot decode")]
    np.testing.assert_array_equal(back.embeddings, np.ones((1, 4), np.float32))


# ---------------------------------------------------------------------------------------------------
# The file pipeline: batches stacked by length in the workers, two batches in flight
# ---------------------------------------------------------------------------------------------------

# name -> (seconds, rate, channels, subtype, seed); the 44.1 kHz 1-s file resamples to the length of the 16 kHz ones
MIXED = {
    "a_1s.wav": (1.0, 16000, 1, "PCM_16", 1),
    "b_1s.wav": (1.0, 16000, 1, "PCM_16", 2),
    "c_1s_44k.flac": (1.0, 44100, 2, "PCM_16", 3),
    "d_2s.wav": (2.0, 16000, 1, "PCM_16", 4),
    "e_2s.wav": (2.0, 16000, 1, "FLOAT", 5),
    "f_3p3s.flac": (3.3, 22050, 1, "PCM_24", 6),
    "g_10s.wav": (10.0, 16000, 1, "PCM_16", 7),
    "h_10s.wav": (10.0, 16000, 1, "PCM_16", 8),
    "i_12p5s.wav": (12.5, 16000, 1, "PCM_16", 9),
    "j_0p7s.wav": (0.7, 48000, 1, "FLOAT", 10),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """Files of mixed lengths and rates plus three that fail: at the header (corrupt), and in the decoding
    workers (NaN samples, too short). Returns (folder, all paths in order, the good ones)."""
    root = tmp_path_factory.mktemp("mixed")
    for name, (secs, sr, ch, subtype, seed) in MIXED.items():
        sf.write(root / name, signal(secs, sr, ch, seed), sr, subtype=subtype)
    (root / "k_corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    nan = signal(2.0, 16000, 1, 11)
    nan[5000] = np.nan
    sf.write(root / "l_nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "m_too_short.wav", signal(0.005, 16000, 1, 12), 16000, subtype="PCM_16")
    paths = sorted(str(p) for p in root.iterdir())
    return root, paths, sorted(str(root / n) for n in MIXED)


def in_memory(model, waves: list[np.ndarray], level: str, reduce: str = "none", normalize: bool = False):
    """The in-memory API on decoded waveforms: what embed_files must reproduce."""
    if level == "clap":
        return list(model.clap_audio_embeddings(waves, 16000, normalize=normalize))
    out = (model.frame_embeddings if level == "frame" else model.clip_embeddings)(waves, 16000, reduce=reduce)
    out = list(out)
    if normalize:
        out = [e / np.linalg.norm(e, axis=-1, keepdims=True) for e in out]
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("level", ["clip", "frame", "clap"])
def test_pipeline_equals_the_in_memory_api_on_decoded_audio(model, mixed, level, workers):
    root, _, good = mixed
    waves = [m2d2.load_audio(p) for p in good]
    want = in_memory(model, waves, level)
    # batches of at most 3 chunks: many batches, some holding two lengths, and files sharing a length
    es = model.embed_files(root, level=level, batch_size=3, num_workers=workers, progress=False)
    assert es.paths == good  # input order, whatever order the batches completed in
    assert sorted(Path(f.path).name for f in es.failures) == ["k_corrupt.wav", "l_nan.wav", "m_too_short.wav"]
    reasons = {Path(f.path).name: f.reason for f in es.failures}
    assert "NaN" in reasons["l_nan.wav"] and "too short" in reasons["m_too_short.wav"]
    assert "cannot decode" in reasons["k_corrupt.wav"]
    for got, ref in zip(es.embeddings, want):
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(es.durations, [len(w) / 16000 for w in waves])
    if level == "frame":
        for ts, w in zip(es.timestamps, waves):
            np.testing.assert_array_equal(ts, model.frame_timestamps(len(w)))


@pytest.mark.parametrize("level,reduce", [("clip", "mean"), ("frame", "mean"), ("clap", "none")])
def test_pipeline_with_normalize_and_reduce(model, mixed, level, reduce):
    root, _, good = mixed
    waves = [m2d2.load_audio(p) for p in good]
    want = in_memory(model, waves, level, reduce, normalize=True)
    es = model.embed_files(
        root, level=level, reduce=reduce, normalize=True, batch_size=4, num_workers=2, progress=False
    )
    assert es.paths == good
    for got, ref in zip(es.embeddings, want):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("staging", ["slab", "no slab", "slab too small"])
def test_workers_return_each_batch_stacked_by_length(model, mixed, staging):
    _, paths, _ = mixed
    names = [Path(p).name for p in paths]
    batch = [names.index(n) for n in ["g_10s.wav", "h_10s.wav", "a_1s.wav", "c_1s_44k.flac", "l_nan.wav", "b_1s.wav"]]
    nbytes = {"slab": 2 * 16000 * 25, "no slab": 0, "slab too small": 100_000}[staging]
    slabs = files.Slabs(1, 1, shared=True) if nbytes else None
    ds = files._AudioBatches(paths, [batch], 16000, model.frontend.min_samples(), slabs, [nbytes])
    loader = iter(DataLoader(ds, batch_size=None, num_workers=1, collate_fn=files._identity))
    decoded = next(loader)
    assert (decoded.buffer is not None) == (slabs is not None)  # a new slab goes to the main process with its batch
    groups, failures = decoded.take()
    assert [(i, names[i]) for i, _ in failures] == [(batch[4], "l_nan.wav")]
    # one tensor per distinct length (and sample type), not one per file: 16-bit mono 16-kHz files travel as
    # int16, the resampled stereo FLAC as float32
    by_kind = {(x.shape[-1], x.dtype): idx for idx, x in groups}
    assert by_kind == {
        (160000, torch.int16): batch[:2],
        (16000, torch.int16): [batch[2], batch[5]],
        (16000, torch.float32): [batch[3]],
    }
    for idx, x in groups:
        assert x.shape[0] == len(idx)
        for i, row in zip(idx, files._as_float(x, torch.device("cpu"))):
            np.testing.assert_array_equal(row.numpy(), m2d2.load_audio(paths[i]))  # bit for bit
    # in the slab when it has room (the 16-bit WAVs read straight into it), in fresh tensors otherwise
    start = slabs._mapped[0].data_ptr() if slabs else 0
    in_slab = {(x.shape[-1], x.dtype): slabs is not None and 0 <= x.data_ptr() - start < nbytes for _, x in groups}
    if staging == "slab":
        assert all(in_slab.values()) and int(slabs.busy[0]) == 1
        decoded.release()
        assert int(slabs.busy[0]) == 0
    elif staging == "slab too small":  # the two 1-s WAVs fit (64 kB), the 10-s WAVs and then the FLAC do not
        assert in_slab == {(16000, torch.int16): True, (160000, torch.int16): False, (16000, torch.float32): False}
        assert decoded.slab == 0
    else:
        assert decoded.slab is None and not any(in_slab.values())


def test_a_slab_grows_to_what_its_batches_need(model, mixed):
    _, paths, _ = mixed
    names = [Path(p).name for p in paths]
    batch = [names.index(n) for n in ["g_10s.wav", "h_10s.wav", "a_1s.wav", "c_1s_44k.flac", "b_1s.wav"]]
    slabs = files.Slabs(1, 1, shared=False)  # decoded in this process: one slab, its bookkeeping visible
    ds = files._AudioBatches(paths, [batch, batch], 16000, model.frontend.min_samples(), slabs, [100_000] * 2)
    first = ds[0]
    assert first.buffer is not None and first.buffer.numel() == 100_000
    first.take()
    first.release()
    assert slabs._grow[0] >= 2 * 16000 * 22 + 4 * 16000  # the whole batch: 2 x 10 s + 2 x 1 s int16, 1 s float32
    second = ds[1]
    assert second.buffer is not None and second.buffer.numel() == slabs._grow.get(0, second.buffer.numel())
    groups, _ = second.take()
    start = second.buffer.data_ptr() if second.buffer is not None else slabs._mapped[0].data_ptr()
    assert all(0 <= x.data_ptr() - start < slabs._mapped[0].numel() for _, x in groups)  # all of it in the slab
    second.release()
    third = ds[0]
    assert third.buffer is None  # the same slab again: nothing new to send


def test_decoding_reuses_its_slabs_and_frees_them(model, tmp_path):
    paths = []
    for i in range(24):
        paths.append(str(tmp_path / f"c{i:02d}.wav"))
        sf.write(paths[-1], signal(0.5 + 0.1 * (i % 3), 16000, 1, i), 16000, subtype="PCM_16")
    pre = files.start_decoding(paths, model.config, "cpu", batch_size=2, num_workers=2)
    slabs = pre.slabs
    assert pre.workers == 2 and len(pre.batches) == 12 and slabs.busy.numel() == 2 * (files.PREFETCH + 1)
    seen, buffers = [], set()
    for groups, failures in pre.decoded():
        assert not failures
        for idx, x in groups:
            (buf,) = [b for b in slabs._mapped.values() if 0 <= x.data_ptr() - b.data_ptr() < b.numel()]  # a slab's
            buffers.add(buf.data_ptr())
            for i, row in zip(idx, files._as_float(x, torch.device("cpu"))):
                np.testing.assert_array_equal(row.numpy(), m2d2.load_audio(paths[i]))
                seen.append(i)
    assert sorted(seen) == list(range(24))
    assert len(buffers) == 6  # 12 batches in 6 slabs: each used twice, sent to this process once
    assert int(slabs.busy.sum()) == 0  # every slab was freed once its batch was used
    pre.close()


def test_too_little_shared_memory_means_fewer_workers_with_a_warning(model, tmp_path, monkeypatch, caplog):
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"c{i}.wav"))
        sf.write(paths[-1], signal(1.0, 16000, 1, i), 16000, subtype="PCM_16")
    want = [model.clip_embeddings(p) for p in paths]
    per_worker = (files.PREFETCH + 1) * 2 * 16000 * 2  # three slabs of two 1-s 16-bit files
    for free, workers in [(None, 2), (10 * per_worker, 2), (per_worker + 1, 1), (per_worker - 1, 0)]:
        monkeypatch.setattr(files, "shared_memory_free", lambda free=free: free)
        caplog.clear()
        with caplog.at_level("WARNING", logger="m2d2_embed.files"):
            pre = files.start_decoding(paths, model.config, "cpu", batch_size=2, num_workers=2)
        assert pre.workers == workers
        warned = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
        if workers == 2:
            assert not warned
        else:
            assert len(warned) == 1 and "--shm-size" in warned[0] and "2 decoding workers" in warned[0]
            assert ("none (decoding in the main process" in warned[0]) == (workers == 0)
        got = dict(files.iter_file_embeddings(model, paths, "clip", batch_size=2, progress=False, prefetch=pre))
        for i in range(8):
            np.testing.assert_allclose(got[i].embedding, want[i], atol=1e-5, rtol=1e-5)


def test_batch_bytes_are_the_16_bit_samples_of_each_batch():
    probes = [(10.0, None, None), (1.0, None, None), (0.5, None, "truncated"), (0.0, "cannot decode", None)]
    assert files.batch_bytes([[0, 1], [2], [3]], probes, 16000) == [2 * (160000 + 16000), 2 * 8000, 0]
    assert files.batch_bytes([[1]], probes, 32000) == [2 * 32000]


@pytest.mark.skipif(files.shared_memory_free() is None, reason="no /dev/shm")
def test_shared_memory_free_follows_what_is_used():
    before = files.shared_memory_free()
    held = files._uninitialised(64 * 2**20, shared=True)  # committed at once
    assert 0 <= files.shared_memory_free() <= before - 60 * 2**20
    del held


@pytest.mark.skipif(files.shared_memory_free() is None, reason="no /dev/shm")
def test_finished_decoding_leaves_no_shared_memory_behind_even_before_close(model, tmp_path):
    # the main process lets go of the slabs once the last batch is used, before the workers stop (so that they,
    # not it, free the pages): a finished decoding holds no shared memory, without waiting for close()
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"{i:02d}.wav"))
        sf.write(paths[-1], signal(10.0, 16000, 1, i), 16000, subtype="PCM_16")
    before = files.shared_memory_free()
    pre = files.start_decoding(paths, model.config, "cpu", batch_size=2, num_workers=1)
    decoded, lowest = 0, before
    for groups, _ in pre.decoded():
        decoded += sum(len(i) for i, _ in groups)
        lowest = min(lowest, files.shared_memory_free())
    del groups  # the last batch's waveforms are views into its slab
    assert decoded == 12 and lowest <= before - 2 * 640_000  # while decoding: slabs of 2 x 10-s int16 clips
    assert files.shared_memory_free() >= before - 2**16  # afterwards: nothing held (a page or two of slack)
    pre.close()


@pytest.mark.skipif(files.shared_memory_free() is None, reason="no /dev/shm")
def test_a_worker_without_shared_memory_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"could not get \d+ MiB of shared memory.*--shm-size.*--num-workers 0"):
        files._uninitialised(2**50, shared=True)  # more than any /dev/shm: refused at once, nothing allocated


def test_stopping_early_does_not_wait_for_a_worker_waiting_for_its_slab(model, mixed):
    import time

    _, paths, _ = mixed
    slabs = files.Slabs(1, 1, shared=True)  # one slab: the worker waits for it from the second batch on
    ds = files._AudioBatches(paths, [[0], [1], [2]], 16000, model.frontend.min_samples(), slabs, [10**6] * 3)
    it = iter(DataLoader(ds, batch_size=None, num_workers=1, collate_fn=files._identity, prefetch_factor=2))
    first = next(it)
    first.take()  # kept, not released: the worker now waits for slab 0 (up to Slabs.WAIT_S)
    time.sleep(0.5)
    assert int(slabs.busy[0]) == 1
    t = time.perf_counter()
    slabs.close()
    del it  # the DataLoader stops its worker: it joins it for up to 5 s, then kills it
    assert time.perf_counter() - t < 2.0


def test_a_file_rewritten_after_probing_is_embedded_as_it_now_is(model, tmp_path):
    paths = [str(tmp_path / f"c{i}.wav") for i in range(4)]
    for i, p in enumerate(paths):
        sf.write(p, signal(1.0, 16000, 1, i), 16000, subtype="PCM_16")
    pre = files.start_decoding(paths, model.config, "cpu", batch_size=4, num_workers=0)
    sf.write(paths[1], signal(6.0, 16000, 1, 9), 16000, subtype="PCM_16")  # longer than its batch's slab
    sf.write(paths[2], signal(0.5, 16000, 1, 8), 16000, subtype="PCM_16")  # shorter
    got = dict(files.iter_file_embeddings(model, paths, "clip", batch_size=4, progress=False, prefetch=pre))
    for i, p in enumerate(paths):
        np.testing.assert_allclose(got[i].embedding, model.clip_embeddings(p), atol=1e-5, rtol=1e-5)
        assert got[i].duration == pytest.approx(sf.info(p).duration)


@pytest.mark.parametrize(
    "channels,sr,subtype,fmt",
    [
        (1, 16000, "PCM_16", "WAV"),
        (2, 16000, "PCM_16", "WAV"),
        (1, 44100, "PCM_16", "WAV"),
        (1, 16000, "PCM_16", "FLAC"),
        (1, 16000, "FLOAT", "WAV"),
        (1, 16000, "PCM_24", "FLAC"),
        (1, 22050, "VORBIS", "OGG"),
    ],
)
def test_fast_16_bit_reads_give_the_samples_of_load_audio(tmp_path, channels, sr, subtype, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    x = signal(1.3, sr, channels, 3)
    x[:4] = [[-1.0] * channels, [1.0] * channels, [0.5] * channels, [-0.99997] * channels]  # full scale ends
    sf.write(path, x, sr, subtype=subtype, format=fmt)
    got = m2d2_audio.read_audio(str(path), 16000, keep_int16=True)
    assert got.dtype == (np.int16 if (channels, sr, subtype) == (1, 16000, "PCM_16") else np.float32)
    got = got * np.float32(m2d2_audio.PCM16_SCALE) if got.dtype == np.int16 else got
    np.testing.assert_array_equal(got, m2d2.load_audio(path))
    for bad in [tmp_path / "missing.wav", tmp_path]:  # errors are load_audio's
        with pytest.raises((OSError, ValueError)) as want:
            m2d2.load_audio(bad)
        with pytest.raises(type(want.value), match=str(want.value)[:30]):
            m2d2_audio.read_audio(str(bad), 16000, keep_int16=True)


def _wav_variants(tmp_path: Path) -> dict[str, tuple[Path, bool]]:
    """WAV files -> (path, whether their samples are plain 16-bit PCM, read without libsndfile)."""
    out = {}
    for name, channels, sr, subtype, fmt in [
        ("mono", 1, 16000, "PCM_16", "WAV"),
        ("stereo", 2, 16000, "PCM_16", "WAV"),
        ("44k", 1, 44100, "PCM_16", "WAV"),
        ("extensible", 3, 16000, "PCM_16", "WAVEX"),
        ("24-bit", 1, 16000, "PCM_24", "WAV"),
        ("float", 1, 16000, "FLOAT", "WAV"),
        ("mu-law", 1, 16000, "ULAW", "WAV"),
        ("8-bit", 1, 16000, "PCM_U8", "WAV"),
    ]:
        path = tmp_path / f"{name}.wav"
        x = signal(0.7, sr, channels, 5)
        x[:3] = [[-1.0] * channels, [0.99997] * channels, [0.5] * channels]
        with sf.SoundFile(path, "w", sr, channels, subtype=subtype, format=fmt) as f:
            f.title = "a LIST chunk after the samples"
            f.write(x)
        out[name] = (path, subtype == "PCM_16")
    cut = tmp_path / "truncated.wav"  # the header promises more than the file holds (odd byte count)
    cut.write_bytes(out["stereo"][0].read_bytes()[:-3001])
    out["truncated"] = (cut, True)
    return out


@pytest.mark.parametrize("channels", [1, 2, 3, 6, 8, 9])
def test_downmix_gives_the_channel_mean_of_numpy(channels):
    rng = np.random.default_rng(channels)
    x = (rng.standard_normal((50001, channels)) * np.float32(300)).astype(np.float32)
    x[:3, 0] = [1e30, -1e30, 1e-30]  # rounding shows in the order of the sums
    got = m2d2_audio.downmix(x)
    assert got.dtype == np.float32 and got.shape == (50001,)
    np.testing.assert_array_equal(got, x.mean(axis=1))


def test_16_bit_wavs_are_read_straight_from_the_file_as_libsndfile_reads_them(tmp_path):
    for name, (path, direct) in _wav_variants(tmp_path).items():
        info = m2d2_audio.probe(str(path))
        assert (info.pcm16_at is not None) == direct, name
        want = sf.read(str(path), dtype="float32", always_2d=True)[0].T  # libsndfile's own decoding
        got = m2d2_audio.read_audio(str(path), None, mono=False)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # bit for bit
        np.testing.assert_array_equal(m2d2_audio.read_audio(str(path), None), want.mean(axis=0), err_msg=name)
        np.testing.assert_array_equal(
            m2d2_audio.read_audio(str(path), None, channel=info.channels - 1), want[-1], err_msg=name
        )
        data = path.read_bytes()  # the same file in memory (as Ray Data's read_binary_files gives it)
        assert m2d2_audio.probe(data) == info, name
        for src in [data, bytearray(data), memoryview(data)]:
            got = m2d2_audio.read_audio(src, None, mono=False)
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {type(src).__name__}")
            got.flags.writeable = True  # a copy of its own, not a read-only view of the bytes
    # into a caller's buffer: the samples of a mono file at the wanted rate land in it, nothing is allocated
    path = tmp_path / "mono.wav"
    buf = np.full(20000, 7, np.int16)
    got = m2d2_audio.read_audio(str(path), 16000, keep_int16=True, out=buf)
    assert got.dtype == np.int16 and np.shares_memory(got, buf) and got.shape == (11200,)
    np.testing.assert_array_equal(got, sf.read(str(path), dtype="int16")[0])
    assert (buf[11200:] == 7).all()  # nothing written past the samples
    for out in [np.zeros(100, np.int16), np.zeros(20000, np.float32), buf[::2]]:  # no room, wrong type, strided
        got = m2d2_audio.read_audio(str(path), 16000, keep_int16=True, out=out)
        assert not np.shares_memory(got, out)
        np.testing.assert_array_equal(got, sf.read(str(path), dtype="int16")[0])
    got = m2d2_audio.read_audio(str(path), 32000, keep_int16=True, out=buf)  # resampled: float32, a new array
    assert got.dtype == np.float32 and not np.shares_memory(got, buf)
    with pytest.raises(ValueError, match="no samples"):  # a header and no samples
        empty = tmp_path / "empty.wav"
        empty.write_bytes(path.read_bytes()[: m2d2_audio.probe(str(path)).pcm16_at])
        m2d2_audio.read_audio(str(empty), 16000)


def test_the_next_batch_is_queued_before_the_previous_one_is_collected(model, mixed, monkeypatch):
    root, _, good = mixed
    calls: list[tuple[str, int]] = []
    launch, collect = files._launch, files._collect_batch
    launched: list[files._InFlight] = []

    def spy_launch(*a, **kw):
        fl = launch(*a, **kw)
        launched.append(fl)
        calls.append(("launch", len(launched) - 1))
        return fl

    def spy_collect(m, p, fl, level):
        calls.append(("collect", next(k for k, x in enumerate(launched) if x is fl)))
        yield from collect(m, p, fl, level)

    monkeypatch.setattr(files, "_launch", spy_launch)
    monkeypatch.setattr(files, "_collect_batch", spy_collect)
    es = model.embed_files(root, batch_size=3, num_workers=0, progress=False)
    assert es.paths == good
    n = len(launched)
    assert n >= 4
    # launch 0, launch 1, collect 0, launch 2, collect 1, ..., collect n-1: at most two batches in flight
    want = [("launch", 0)] + [c for k in range(1, n) for c in [("launch", k), ("collect", k - 1)]]
    assert calls == [*want, ("collect", n - 1)]


def test_strict_yields_the_finished_batches_then_raises_at_a_decoding_failure(model, mixed):
    _, paths, _ = mixed
    paths = [p for p in paths if "corrupt" not in p]  # a header failure would raise before any batch
    got = []
    with pytest.raises(AudioFileError, match="l_nan.wav") as e:
        for _, r in files.iter_file_embeddings(
            model, paths, "clip", batch_size=3, num_workers=2, progress=False, strict=True
        ):
            got.append(Path(r.path).name)
    assert "NaN" in e.value.reason
    # longest first, 3 chunks a batch: [12.5 s, 10 s], [10 s, 3.3 s, 2 s], then [2 s, NaN, ...] raises; the two
    # batches before it were embedded and handed out first
    assert sorted(got) == ["d_2s.wav", "f_3p3s.flac", "g_10s.wav", "h_10s.wav", "i_12p5s.wav"]


@pytest.mark.parametrize(
    "subtype,channels,rate",
    [("PCM_16", 1, 16000), ("PCM_24", 2, 44100), ("FLOAT", 1, 22050), ("PCM_U8", 1, 8000), ("DOUBLE", 3, 48000)],
)
def test_wav_header_probe_agrees_with_libsndfile(tmp_path, subtype, channels, rate):
    n = 12345  # odd frame counts make odd data sizes (8-bit mono), so the pad byte rule is exercised too
    p = tmp_path / "a.wav"
    sf.write(p, np.zeros((n, channels), np.float32), rate, subtype=subtype)
    head = m2d2_audio._wav_header(str(p))
    assert (head.frames, head.sample_rate, head.channels) == (n, rate, channels)
    assert m2d2_audio.probe(str(p)) == head and head.promised is None
    info = sf.info(str(p))
    assert (info.frames, info.samplerate) == (n, rate)
    assert files.probe_file(str(p)) == (n / rate, None, None)


def test_wav_header_probe_follows_chunks_and_falls_back(tmp_path):
    import struct

    pcm = np.arange(-500, 500, dtype=np.int16).tobytes()  # 1000 frames, mono 16-bit
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    extra = b"LIST" + struct.pack("<I", 5) + b"abcde" + b"\0"  # odd-sized chunk before 'data', padded
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + extra + b"data" + struct.pack("<I", len(pcm)) + pcm
    p = tmp_path / "list.wav"
    p.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    head = m2d2_audio._wav_header(str(p))
    assert (head.frames, head.sample_rate) == (1000, 16000) == (sf.info(str(p)).frames, sf.info(str(p)).samplerate)
    truncated = tmp_path / "cut.wav"  # the header promises 1000 frames, the file holds 400
    truncated.write_bytes(p.read_bytes()[:-1200])
    head = m2d2_audio._wav_header(str(truncated))
    assert (head.frames, head.sample_rate, head.promised) == (400, 16000, 1000 / 16000)
    assert sf.info(str(truncated)).frames == 400  # what libsndfile reads too
    dur, err, warning = files.probe_file(str(truncated))
    assert (dur, err) == (0.025, None) and "promises 0.06 s" in warning and "holds 0.03 s" in warning
    flac_named_wav = tmp_path / "really_flac.wav"  # not RIFF: libsndfile reads it
    sf.write(flac_named_wav, np.zeros(800, np.float32), 16000, format="FLAC")
    assert m2d2_audio._wav_header(str(flac_named_wav)) is None
    assert files.probe_file(str(flac_named_wav)) == (0.05, None, None)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x04\x00\x00\x00WAVEnothing useful")
    assert files.probe_file(str(junk))[1].startswith("cannot decode: ")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert files.probe_file(str(empty)) == (0.0, "empty file (0 bytes)", None)


def test_collect_dedupes_through_links_and_does_not_follow_folder_links(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for rel in ("b.wav", "sub/a.wav", "a.wav"):
        (d / rel).write_bytes(b"x")
    (d / "link_to_b.wav").symlink_to(d / "b.wav")  # the same file twice: embedded once
    (d / "loop").symlink_to(d, target_is_directory=True)  # a folder link: never walked into
    (d / "dangling.wav").symlink_to(tmp_path / "missing.wav")
    got = collect_files(d, recursive=True)
    assert [os.path.relpath(p, d) for p in got] == ["a.wav", "b.wav", os.path.join("sub", "a.wav")]
    # the folder reached through a link to it: the same real files, so nothing new is added
    (tmp_path / "alias").symlink_to(d, target_is_directory=True)
    assert collect_files([d, tmp_path / "alias"], recursive=True) == got
    assert collect_files([str(d / "a.wav"), d]) == [str(d / "a.wav"), str(d / "b.wav")]  # named, then the rest


def test_probing_in_processes_gives_the_same_answers_in_order(folder, monkeypatch, caplog):
    paths = collect_files(folder, recursive=True)  # WAVs (header path) mixed with FLAC/OGG/broken (libsndfile path)
    serial = [files.probe_file(p) for p in paths]
    monkeypatch.setattr(files, "PROBE_PROCESSES_FROM", 1)
    monkeypatch.setattr(files, "_cpu_count", lambda: 3)  # two processes even on a 2-core runner
    pools = []

    class Spy(files.ProcessPoolExecutor):
        def map(self, fn, *iterables, **kw):
            pools.append(fn)
            return super().map(fn, *iterables, **kw)

    monkeypatch.setattr(files, "ProcessPoolExecutor", Spy)
    with caplog.at_level("DEBUG", logger="m2d2_embed.files"):
        assert files._probe_all(paths) == serial
    assert pools == [files._probe_many] and "probing in processes failed" not in caplog.text
    assert any(p.endswith(".wav") for p in paths) and any(not p.endswith(".wav") for p in paths)


def test_default_workers_leave_cores_to_the_main_process(monkeypatch):
    for cpus, want in [(1, 0), (2, 1), (4, 3), (8, 6), (16, 8), (64, 8)]:
        monkeypatch.setattr(files, "_cpu_count", lambda c=cpus: c)
        assert files.default_num_workers() == want


def test_a_non_finite_embedding_is_never_written_but_reported_as_a_failure(tiny_model_dir, tmp_path):
    model = m2d2.load(tiny_model_dir, device="cpu")
    sf.write(tmp_path / "a.wav", signal(1.5, 16000, 1, 1), 16000)
    sf.write(tmp_path / "b.wav", signal(2.5, 16000, 1, 2), 16000)
    with torch.no_grad():
        model.encoder.norm.weight[0] = float("nan")  # weights gone bad after loading (load refuses NaN weights)
    es = model.embed_files(tmp_path, num_workers=0, progress=False)
    assert es.paths == [] and sorted(Path(f.path).name for f in es.failures) == ["a.wav", "b.wav"]
    assert all("non-finite" in f.reason and "--verify" in f.reason for f in es.failures)
    with pytest.raises(AudioFileError, match="non-finite"):
        model.embed_files(tmp_path, num_workers=0, progress=False, strict=True)


def test_load_audio_errors_end_with_one_period(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x04\x00\x00\x00WAVEnothing useful")
    with pytest.raises(ValueError, match="cannot decode audio file") as e:
        m2d2.load_audio(junk)
    assert ".." not in str(e.value) and str(e.value).count("Readable formats") == 1
