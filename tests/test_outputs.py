"""The output store on its own: the format table, what an output argument names, the Arrow columns shared with
Ray, and the resumable output directory (parts, settings, lock held across processes)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from m2d2_embed import outputs
from m2d2_embed.files import FileResult


@dataclass
class Result:  # what files.iter_file_embeddings yields for an embedded file
    path: str
    embedding: np.ndarray
    duration: float
    timestamps: np.ndarray | None = None


META = {"model": "m", "dim": 4, "level": "clip", "format": "npz", "weights_fingerprint": "f"}


def test_every_format_of_the_table_writes_and_reads_back(tmp_path):
    es = outputs.EmbeddingSet(
        ["a.wav", "b.wav"],
        np.arange(8, dtype=np.float32).reshape(2, 4),
        "clip",
        None,
        np.array([1.0, 2.0]),
        [],
        {"model": "m", "dim": 4},
    )
    names = [name for name in outputs.FORMATS if name != "parquet" or _has_pyarrow()]
    for name in names:
        form = outputs.get_format(name)
        path = tmp_path / f"x.{name}"
        form.write(es, path)
        assert form.read_paths(path) == ["a.wav", "b.wav"]
        np.testing.assert_array_equal(form.read(path).embeddings, es.embeddings)
        assert all(f.exists() for f in form.files(path))
    with pytest.raises(ValueError, match="unknown format 'csv'; use one of npz, npy, parquet"):
        outputs.get_format("csv")


def _has_pyarrow() -> bool:
    try:
        outputs.require_pyarrow()
    except ImportError:
        return False
    return True


def test_output_format_tells_files_from_directories(tmp_path):
    assert outputs.output_format(tmp_path / "e.npz") == "npz"
    assert outputs.output_format(tmp_path / "emb") is None
    assert outputs.output_format(str(tmp_path / "e.txt") + "/") is None
    (tmp_path / "d.v2").mkdir()
    assert outputs.output_format(tmp_path / "d.v2") is None
    with pytest.raises(ValueError, match="not an output format"):
        outputs.output_format(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="does not match"):
        outputs.output_format(tmp_path / "e.npz", "npy")


def test_arrow_columns_make_null_rows_for_failed_files():
    pytest.importorskip("pyarrow")
    t = outputs.arrow_table(
        ["a", "b"],
        "frame",
        2,
        [np.ones((3, 2)), None],
        timestamps=[np.arange(3.0), None],
        durations=[1.5, None],
        errors=[None, "cannot decode"],
        metadata={"model": "m"},
    )
    rows = t.to_pylist()
    assert rows[0]["embedding"] == [[1.0, 1.0]] * 3 and rows[0]["timestamps"] == [0.0, 1.0, 2.0]
    assert rows[1]["embedding"] is None and rows[1]["error"] == "cannot decode" and rows[1]["duration"] is None
    emb, ts = outputs.embedding_columns("clip", 2, [None, np.array([1.0, 2.0])])
    assert emb.to_pylist() == [None, [1.0, 2.0]] and ts.null_count == 2


def test_result_writer_stores_parts_as_work_completes_and_resume_keys_are_canonical(tmp_path, monkeypatch):
    d = outputs.OutputDir(tmp_path / "out", "npz")
    with d.open(META):
        w = outputs.ResultWriter(d, "npz", META, "clip", part_size=2)
        for i, name in enumerate(["c.wav", "a.wav", "b.wav"]):
            w.add(i, Result(str(tmp_path / name), np.full(4, i, np.float32), 1.0))
        assert len(d.parts()) == 1  # two results make a part; the third waits
        w.add(3, outputs.FileFailure(str(tmp_path / "bad.wav"), "cannot decode"))
        w.save()
    assert len(d.parts()) == 2 and outputs.read_failures(d.root / outputs.FAILURES)[0].reason == "cannot decode"
    monkeypatch.chdir(tmp_path)
    assert outputs.resume_key("a.wav") in d.done_keys()  # a relative spelling of a done file
    with pytest.raises(ValueError, match="other settings .*level: 'clip' there, 'frame' now"):
        outputs.OutputDir(tmp_path / "out", "npz").open({**META, "level": "frame"})


@pytest.mark.parametrize("with_failures", [False, True])
def test_results_kept_in_rows_as_they_arrive_equal_the_results_packed_at_the_end(tmp_path, with_failures):
    # with the number of inputs known, each result goes into its row as it arrives (out of order, as batches sorted
    # by length make them): the set, and the file written from it, are those of packing the results at the end
    rng = np.random.default_rng(0)
    n = 40
    items = {
        i: FileResult(
            f"{i:02d}.wav", rng.standard_normal(4, dtype=np.float32), 0.5 + i, None, "short" if i == 7 else None
        )
        for i in range(n)
    }
    if with_failures:
        for i in (0, 13, 39):
            items[i] = outputs.FileFailure(f"{i:02d}.wav", "cannot decode")
    rows = outputs.ResultWriter(tmp_path / "rows.npz", "npz", META, "clip", expected=n)
    packed = outputs.ResultWriter(tmp_path / "packed.npz", "npz", META, "clip")
    for i in rng.permutation(n):
        rows.add(int(i), items[i])
        packed.add(int(i), items[i])
    a, b = rows.embedding_set(), packed.embedding_set()
    good = [i for i in range(n) if isinstance(items[i], FileResult)]
    assert a.paths == b.paths == [items[i].path for i in good]
    np.testing.assert_array_equal(a.embeddings, np.stack([items[i].embedding for i in good]))
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.durations, b.durations)
    assert (
        [f.path for f in a.failures] == [f.path for f in b.failures] == (["00.wav", "13.wav", "39.wav"] * with_failures)
    )
    assert [w.path for w in a.warnings] == [w.path for w in b.warnings] == ["07.wav"]
    assert [r.path for r in rows.results()] == a.paths
    rows.save()
    packed.save()
    assert (tmp_path / "rows.npz").read_bytes() == (tmp_path / "packed.npz").read_bytes()
    with pytest.raises(IndexError):  # more inputs than announced is a caller's bug, not a silent drop
        outputs.ResultWriter(None, None, META, "clip", expected=2).add(2, items[7])


def test_a_file_output_too_large_for_memory_is_refused_before_any_work_with_what_to_do():
    with pytest.raises(MemoryError, match=r"need 15,728,640\.0 GiB .* directory output \(`-o DIR/`"):
        outputs.ResultWriter(None, None, {**META, "dim": 3840}, "clip", expected=2**40)  # beyond any address space


def test_npz_files_are_byte_for_byte_those_of_np_savez(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "paths": np.asarray(["a.wav", "ü/b.flac"]),
        "embeddings": rng.standard_normal((3, 5), dtype=np.float32),
        "empty": np.zeros((0, 5), np.float32),
        "metadata": np.asarray('{"model": "m"}'),
        "lengths": np.arange(3, dtype=np.int64),
        "half": rng.standard_normal(4).astype(np.float16),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "flags": np.array([True, False]),
        "scalar": np.asarray(3.5),
    }
    outputs.savez(str(tmp_path / "ours.npz"), arrays)
    np.savez(tmp_path / "numpy.npz", **arrays)
    assert (tmp_path / "ours.npz").read_bytes() == (tmp_path / "numpy.npz").read_bytes()
    # the files' frames as a list of blocks: stored as their concatenation, which is never made
    blocks = [rng.standard_normal((t, 5), dtype=np.float32) for t in (3, 0, 7)]
    outputs.savez(str(tmp_path / "ours.npz"), {"embeddings": blocks})
    np.savez(tmp_path / "numpy.npz", embeddings=np.concatenate(blocks))
    assert (tmp_path / "ours.npz").read_bytes() == (tmp_path / "numpy.npz").read_bytes()
    with open(tmp_path / "ours.npy", "wb") as f:
        outputs.write_npy(f, blocks)
    np.save(tmp_path / "numpy.npy", np.concatenate(blocks))
    assert (tmp_path / "ours.npy").read_bytes() == (tmp_path / "numpy.npy").read_bytes()
    with pytest.raises(ValueError, match="blocks differ"), open(tmp_path / "bad.npy", "wb") as f:
        outputs.write_npy(f, [blocks[0], blocks[0][:, :4]])
    with pytest.raises(ValueError, match="empty list of blocks"), open(tmp_path / "bad.npy", "wb") as f:
        outputs.write_npy(f, [])


def test_the_lock_of_an_output_directory_is_held_against_other_processes(tmp_path):
    d = outputs.OutputDir(tmp_path / "out", "npz")
    code = (
        "import sys; from m2d2_embed import outputs\n"
        "try:\n    outputs.OutputDir(sys.argv[1]).open().close()\n"
        "except outputs.OutputInUseError as e:\n    print(e); sys.exit(3)\n"
    )
    with d.open():
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
        assert r.returncode == 3 and "another m2d2-embed run is writing to" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # released
    assert not (tmp_path / "out").exists()  # created, never written: removed again


def test_a_folder_that_is_not_an_output_is_never_written_into(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an m2d2-embed output"):
        outputs.OutputDir(tmp_path / "mine").open(overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


@pytest.mark.parametrize("level", ["clip", "frame"])
def test_join_sorts_by_path_keeps_the_first_of_each_key_and_gives_up_the_parts(level):
    rng = np.random.default_rng(1)
    parts, flat = [], []  # flat: (path, vector or frames, duration) in parts order
    for i, names in enumerate([["d", "a", "c"], ["b", "a2", "e"], [], ["c", "f"]]):
        vecs = [rng.standard_normal((2, 3) if level == "frame" else 3).astype(np.float32) for _ in names]
        durs = np.arange(len(names), dtype=np.float64) + 10 * i
        emb = vecs if level == "frame" else (np.stack(vecs) if vecs else np.zeros((0, 3), np.float32))
        ts = [np.array([0.1, 0.2])] * len(names) if level == "frame" else None
        parts.append(outputs.EmbeddingSet(names, emb, level, ts, durs, [outputs.FileFailure(f"x{i}", "bad")]))
        flat += zip(names, vecs, durs)
    key = lambda p: p.rstrip("2")  # noqa: E731 ("a2" names the file "a" names, as resume_key may)
    es, twice = outputs.join(parts, level, {"dim": 3}, key=key)
    assert parts == [None] * 4  # given up, so their memory can go as the result fills
    first = {}
    for p, v, d in flat:
        first.setdefault(key(p), (p, v, d))
    want = sorted(first.values(), key=lambda t: t[0])
    assert twice == 2 and es.paths == [p for p, _, _ in want] == ["a", "b", "c", "d", "e", "f"]
    np.testing.assert_array_equal(np.asarray(es.embeddings), np.stack([v for _, v, _ in want]))
    np.testing.assert_array_equal(es.durations, [d for _, _, d in want])  # "c" from part 0, not part 3
    assert [f.path for f in es.failures] == ["x0", "x1", "x2", "x3"]
    assert (es.timestamps is not None) == (level == "frame")


def test_reading_a_directory_output_holds_its_vectors_once_beside_the_parts_read(tmp_path):
    import tracemalloc

    n_parts, rows, dim = 6, 512, 1024  # 2-MiB parts of 4-KiB vectors (ViT-B clip: 15 KiB)
    d = outputs.OutputDir(tmp_path / "out", "npz")
    meta = {**META, "dim": dim}
    rng = np.random.default_rng(0)
    with d.open(meta):
        d.start(meta)
        for k in rng.permutation(n_parts):  # parts in completion order, paths interleaved across them
            paths = [f"{r * n_parts + k:06d}.wav" for r in range(rows)]
            emb = np.full((rows, dim), k, np.float32)
            d.add_part(outputs.EmbeddingSet(paths, emb, "clip", None, np.ones(rows), [], meta))
    size = n_parts * rows * dim * 4
    tracemalloc.start()
    try:
        es = outputs.read_embeddings(tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert es.paths == sorted(es.paths) and len(es.paths) == n_parts * rows
    np.testing.assert_array_equal(es.embeddings[:, 0], np.tile(np.arange(n_parts), rows))
    # the parts as read plus the result (before: the parts, their concatenation and its sorted copy, 3x)
    assert peak < 2.25 * size, f"peak {peak / size:.2f}x the vectors"
