"""Bulk extraction on Ray Data (m2d2_embed.integrations.ray): a local two-CPU cluster embeds generated audio with
a tiny model, and the Parquet it writes equals ``model.embed_files``; bad files become error rows. The callable
class is also checked without Ray, and ``import m2d2_embed`` must never import Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from audio_files import BAD, good_paths

import m2d2_embed as m2d2
from m2d2_embed import files
from m2d2_embed.integrations.ray import M2D2Embedder

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ("clip", "clap", "frame")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'm2d2-embed[ray]' to run these tests")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'm2d2-embed[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(model, folder) -> dict[str, m2d2.EmbeddingSet]:
    return {lvl: model.embed_files(folder, level=lvl, num_workers=0, progress=False) for lvl in LEVELS}


def test_import_m2d2_embed_never_imports_ray():
    code = (
        "import sys, m2d2_embed, m2d2_embed.cli, m2d2_embed.integrations.ray; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    from m2d2_embed.integrations import ray as integration

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'm2d2-embed\[ray\]'"):
        integration.embed_dataset(tmp_path, tmp_path / "out")


def test_embedder_takes_bytes_paths_or_decoded_audio_and_keeps_bad_files_as_error_rows(
    tiny_model_dir, folder, reference
):
    import soundfile as sf

    pa = pytest.importorskip("pyarrow")
    emb = M2D2Embedder(str(tiny_model_dir), level="clip", extra_levels=("clap", "frame"), device="cpu")
    paths = files.collect_files(folder)  # good and broken files
    raw = [Path(p).read_bytes() for p in paths]
    batch = {"path": np.array(paths, dtype=object), "bytes": np.array(raw, dtype=object)}
    from_bytes = emb(batch)
    from_paths = emb(pa.table({"path": paths}))
    good = good_paths(folder)
    decoded = [sf.read(p, dtype="float32", always_2d=True) for p in good]
    from_arrays = emb(
        {
            "path": np.array(good, dtype=object),
            "amplitude": [d.T for d, _ in decoded],
            "sample_rate": np.array([sr for _, sr in decoded]),
        }
    )
    for table, expected in ((from_bytes, paths), (from_paths, paths), (from_arrays, good)):
        assert table.column("path").to_pylist() == expected  # one row per input, in input order
        rows = {r["path"]: r for r in table.to_pylist()}
        for lvl, col in (("clip", "embedding"), ("clap", "clap_embedding"), ("frame", "frame_embedding")):
            ref = reference[lvl]
            for p, e in zip(ref.paths, ref.embeddings):
                np.testing.assert_allclose(np.asarray(rows[p][col], np.float32), e, atol=2e-5)
        for p, t in zip(reference["frame"].paths, reference["frame"].timestamps):
            np.testing.assert_allclose(rows[p]["frame_timestamps"], t)
            assert rows[p]["error"] is None and rows[p]["timestamps"] is None
    rows = {r["path"]: r for r in from_bytes.to_pylist()}
    bad = {Path(p).name: r for p, r in rows.items() if r["error"] is not None}
    assert sorted(bad) == sorted(BAD)
    assert all(r["embedding"] is None and r["duration"] is None for r in bad.values())
    assert bad["zero_bytes.flac"]["error"] == "empty file (0 bytes)"
    assert "cannot decode" in bad["corrupt.wav"]["error"] and "BytesIO" not in bad["corrupt.wav"]["error"]
    assert "too short" in bad["too_short.wav"]["error"]
    with pytest.raises(ValueError, match="include_paths=True"):
        emb({"bytes": np.array(raw[:1], dtype=object)})


def test_embedder_streams_long_files_with_the_same_result(tiny_model_dir, folder, reference, monkeypatch):
    monkeypatch.setattr(files, "STREAM_SECONDS", 2.0)  # the 3.3 s and 12 s files now take the streaming path
    emb = M2D2Embedder(str(tiny_model_dir), level="frame", extra_levels=("clip",), device="cpu")
    good = good_paths(folder)
    table = emb(
        {"path": np.array(good, dtype=object), "bytes": np.array([Path(p).read_bytes() for p in good], dtype=object)}
    )
    rows = {r["path"]: r for r in table.to_pylist()}
    for p, e in zip(reference["clip"].paths, reference["clip"].embeddings):
        np.testing.assert_allclose(np.asarray(rows[p]["clip_embedding"], np.float32), e, atol=2e-5)
    for p, e in zip(reference["frame"].paths, reference["frame"].embeddings):
        np.testing.assert_allclose(np.asarray(rows[p]["embedding"], np.float32), e, atol=2e-5)


def test_embed_dataset_writes_parquet_equal_to_embed_files(ray_cluster, tiny_model_dir, folder, reference, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m2d2_embed.integrations.ray import embed_dataset

    out = tmp_path / "emb"
    uri = embed_dataset(
        folder,
        out,
        model=str(tiny_model_dir),
        level="clip",
        extra_levels=["clap"],
        concurrency=1,
        batch_size=3,
        num_gpus_per_actor=0,
    )
    assert uri == str(out)
    es = m2d2.read_embeddings(out)
    ref = reference["clip"]
    assert es.paths == ref.paths and es.level == "clip" and es.metadata["model"] == "tiny"
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5)
    np.testing.assert_allclose(es.durations, ref.durations)
    assert sorted(Path(f.path).name for f in es.failures) == sorted(BAD)  # error rows, not failed tasks
    table = pq.read_table(out)
    t = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(t) and t.list_size == es.dim and t.value_type == pa.float32()
    rows = {r["path"]: r for r in table.to_pylist()}
    for p, e in zip(reference["clap"].paths, reference["clap"].embeddings):
        np.testing.assert_allclose(np.asarray(rows[p]["clap_embedding"], np.float32), e, atol=2e-5)
    with pytest.raises(Exception, match="exists"):  # mode="error": an existing output is never appended to
        embed_dataset(folder, out, model=str(tiny_model_dir), concurrency=1, num_gpus_per_actor=0)


def test_map_embeddings_on_a_dataset_of_paths_at_frame_level(ray_cluster, tiny_model_dir, folder, reference):
    from m2d2_embed.integrations.ray import map_embeddings

    good = good_paths(folder)
    ds = ray_cluster.data.from_items([{"path": p} for p in good])
    rows = {
        r["path"]: r
        for r in map_embeddings(ds, str(tiny_model_dir), level="frame", concurrency=1, num_gpus_per_actor=0).take_all()
    }
    ref = reference["frame"]
    for p, e, t in zip(ref.paths, ref.embeddings, ref.timestamps):
        np.testing.assert_allclose(np.stack(rows[p]["embedding"]), e, atol=2e-5)
        np.testing.assert_allclose(rows[p]["timestamps"], t)
        assert rows[p]["error"] is None
