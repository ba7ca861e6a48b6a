"""Embedding files: the in-memory result of ``embed_files`` and the formats it is saved in and read back from.

Formats (all hold the paths, the embeddings, the durations, frame timestamps for frame level, and metadata:
model, level, dim, sample rate, package version):

- ``.npz``: arrays ``paths`` [N] str, ``embeddings`` [N, D] float32 (frame level: all frames of all files
  concatenated, [sum T_i, D]), ``lengths`` [N] int64 (frames per file; frame level only), ``timestamps``
  [sum T_i] float64 seconds (frame level only), ``durations`` [N] float64 seconds, ``metadata`` (a JSON string).
- ``.npy`` + ``.json`` sidecar: the ``embeddings`` array above in ``X.npy``; paths, durations, lengths,
  timestamps and metadata in ``X.json``.
- ``.parquet`` (needs pyarrow): one row per file with the columns ``path`` (string), ``model`` (string),
  ``level`` (string), ``dim`` (int32), ``embedding`` (clip/clap: fixed-size list of ``dim`` float32; frame:
  list of fixed-size lists, one per frame), ``timestamps`` (list of float64 seconds, frame level; else null),
  ``duration`` (float64 seconds) and ``error`` (string, null when the file was embedded). The metadata is
  also in the schema metadata under ``m2d2_embed``.
- a directory: ``manifest.json`` plus ``part-NNNNN.<format>`` shards written as work completes (resumable),
  and a directory of Parquet files without a manifest (as distributed writers produce).

Failed files go to a ``failures.jsonl`` sidecar (``X.failures.jsonl`` beside a single file), one JSON object
``{"path": ..., "error": ...}`` per line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("npz", "npy", "parquet")
LEVELS = ("clip", "frame", "clap")
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
FORMAT_VERSION = 1
SHARD_PREFIX = "part-"


@dataclass(frozen=True)
class FileFailure:
    """A file that could not be embedded, and why."""

    path: str
    reason: str


@dataclass
class EmbeddingSet:
    """Embeddings of a set of files (or texts), as returned by ``embed_files`` and ``read_embeddings``.

    Attributes:
        paths: one per embedded item, in order (the texts for level ``"text"``).
        embeddings: ``[N, D]`` float32 for levels ``"clip"``, ``"clap"`` and ``"text"``; for ``"frame"`` a
            list of ``[T_i, D]`` float32 arrays, one per file.
        level: ``"clip"``, ``"frame"``, ``"clap"`` or ``"text"``.
        timestamps: frame level only: a list of float64 ``[T_i]`` arrays, the centre of each frame in seconds.
        durations: float64 ``[N]``, seconds of audio per file (at the model's sample rate).
        failures: files that were not embedded, with the reason.
        metadata: model, level, dim, sample_rate, m2d2_embed_version and the settings used.
    """

    paths: list[str]
    embeddings: np.ndarray | list[np.ndarray]
    level: str
    timestamps: list[np.ndarray] | None = None
    durations: np.ndarray = field(default_factory=lambda: np.zeros(0))
    failures: list[FileFailure] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (f"EmbeddingSet(level={self.level!r}, files={len(self)}, dim={self.dim}, "
                f"failures={len(self.failures)}, model={self.metadata.get('model')!r})")

    @property
    def dim(self) -> int:
        """Width D of one embedding vector."""
        if "dim" in self.metadata:
            return int(self.metadata["dim"])
        if isinstance(self.embeddings, np.ndarray):
            return int(self.embeddings.shape[-1])
        return int(self.embeddings[0].shape[-1]) if self.embeddings else 0

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write to one file, atomically (``format`` defaults to the suffix: npz, npy or parquet).

        Overwrites ``path``; failures, if any, go to ``<path minus suffix>.failures.jsonl``."""
        path = Path(path)
        fmt = format or format_for(path)
        write_file(self, path, fmt)
        write_failures(self.failures, failures_path(path))
        return path


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------

def format_for(path: str | os.PathLike, default: str | None = None) -> str:
    """The format implied by a path's suffix (``.npz``, ``.npy``, ``.parquet``), else ``default``."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    if default is None:
        raise ValueError(f"cannot tell the format of {path}: use a .npz, .npy or .parquet suffix")
    return default


def failures_path(path: Path) -> Path:
    """Sidecar listing the failures of a single-file output: ``out.npz`` -> ``out.failures.jsonl``."""
    return path.with_name(path.stem + ".failures.jsonl")


def sidecar_path(path: Path) -> Path:
    """JSON sidecar of an ``.npy`` output: ``out.npy`` -> ``out.json``."""
    return path.with_suffix(".json")


def require_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Parquet output needs pyarrow: pip install 'm2d2-embed[parquet]' (or pip install pyarrow); "
                          "npz and npy outputs work without it") from e
    return pa, pq


def atomic_write(dst: Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Write through a temporary file in ``dst``'s directory, then rename it over ``dst``.

    ``write`` receives the temporary path (ending in ``suffix``, for writers that insist on one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp" + suffix, dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flat(es: EmbeddingSet) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(embeddings [N or sum T, D], lengths [N] or None, timestamps [sum T] or None)."""
    if es.level == "frame":
        embs = list(es.embeddings)
        lengths = np.asarray([len(e) for e in embs], dtype=np.int64)
        flat = np.concatenate(embs).astype(np.float32, copy=False) if embs else np.zeros((0, es.dim), np.float32)
        ts = (np.concatenate(es.timestamps) if es.timestamps else np.zeros(0)).astype(np.float64)
        return flat, lengths, ts
    emb = np.asarray(es.embeddings, dtype=np.float32)
    if emb.ndim != 2:
        emb = emb.reshape(len(es.paths), -1)
    return emb, None, None


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return list(np.split(flat, np.cumsum(lengths)[:-1])) if len(lengths) else []


def _meta(es: EmbeddingSet) -> dict[str, Any]:
    return {**es.metadata, "level": es.level, "dim": es.dim, "format_version": FORMAT_VERSION}


# ---------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------

def write_file(es: EmbeddingSet, path: Path, fmt: str) -> None:
    """Write ``es`` to ``path`` in ``fmt`` atomically (npy: the ``.npy`` and then its ``.json`` sidecar)."""
    flat, lengths, ts = _flat(es)
    meta = _meta(es)
    durations = np.asarray(es.durations, dtype=np.float64)
    key = "texts" if es.level == "text" else "paths"
    if fmt == "npz":
        arrays: dict[str, np.ndarray] = {key: np.asarray(es.paths, dtype=str) if es.paths else np.zeros(0, "<U1"),
                                         "embeddings": flat, "metadata": np.asarray(json.dumps(meta))}
        if es.level != "text":
            arrays["durations"] = durations
        if lengths is not None:
            arrays["lengths"] = lengths
            arrays["timestamps"] = ts

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write_npz)
    elif fmt == "npy":
        side: dict[str, Any] = {"metadata": meta, key: list(es.paths)}
        if es.level != "text":
            side["durations"] = durations.tolist()
        if lengths is not None:
            side["lengths"] = lengths.tolist()
            side["timestamps"] = ts.tolist()

        def write_npy(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, flat)

        atomic_write(path, write_npy)
        atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(side)))
    elif fmt == "parquet":
        pa, pq = require_pyarrow()
        table = _to_table(es, flat, lengths, ts, meta, pa)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp), suffix=".parquet")
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _to_table(es: EmbeddingSet, flat, lengths, ts, meta, pa):
    n, d = len(es.paths), es.dim
    values = pa.array(flat.reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(values, d)
    if lengths is not None:
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        embedding = pa.ListArray.from_arrays(offsets, vectors)
        timestamps = pa.ListArray.from_arrays(offsets, pa.array(ts, type=pa.float64()))
    else:
        embedding = vectors
        timestamps = pa.nulls(n, type=pa.list_(pa.float64()))
    cols = {
        "path": pa.array(es.paths, type=pa.string()),
        "model": pa.array([str(meta.get("model", ""))] * n, type=pa.string()),
        "level": pa.array([es.level] * n, type=pa.string()),
        "dim": pa.array([d] * n, type=pa.int32()),
        "embedding": embedding,
        "timestamps": timestamps,
        "duration": pa.array(np.asarray(es.durations, dtype=np.float64), type=pa.float64()),
        "error": pa.nulls(n, type=pa.string()),
    }
    return pa.table(cols).replace_schema_metadata({"m2d2_embed": json.dumps(meta)})


def write_failures(failures: Sequence[FileFailure], path: Path) -> None:
    """Write the failures sidecar atomically; remove a stale one when there are no failures."""
    if not failures:
        path.unlink(missing_ok=True)
        return
    text = "".join(json.dumps({"path": f.path, "error": f.reason}) + "\n" for f in failures)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_failures(path: Path) -> list[FileFailure]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(FileFailure(d["path"], d.get("error", "")))
    return out


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------

def read_embeddings(path: str | os.PathLike) -> EmbeddingSet:
    """Read any output of ``m2d2-embed embed`` or ``EmbeddingSet.save`` back into numpy.

    Args:
        path: an ``.npz``, ``.npy`` (with its ``.json`` sidecar) or ``.parquet`` file, or an output directory
            (``manifest.json`` with ``part-*`` shards, or a folder of Parquet files).
    Returns:
        an :class:`EmbeddingSet`. A directory's rows are sorted by path (shards are written in completion
        order); a single file keeps the order it was written in.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no embeddings at {p}")
    if p.is_dir():
        return _read_dir(p)
    fmt = format_for(p)
    es = _read_file(p, fmt)
    es.failures = read_failures(failures_path(p)) + es.failures
    return es


def _read_file(p: Path, fmt: str) -> EmbeddingSet:
    if fmt == "npz":
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
            paths = [str(s) for s in z["paths" if "paths" in z.files else "texts"]]
            flat = z["embeddings"]
            durations = z["durations"] if "durations" in z.files else np.full(len(paths), np.nan)
            lengths = z["lengths"] if "lengths" in z.files else None
            ts = z["timestamps"] if "timestamps" in z.files else None
    elif fmt == "npy":
        side_p = sidecar_path(p)
        if not side_p.exists():
            raise FileNotFoundError(f"{p} has no {side_p.name} sidecar (paths and metadata); was it written by "
                                    "m2d2_embed?")
        side = json.loads(side_p.read_text())
        meta = side.get("metadata", {})
        flat = np.load(p, allow_pickle=False)
        paths = list(side.get("paths", side.get("texts", [])))
        durations = np.asarray(side.get("durations", [np.nan] * len(paths)), dtype=np.float64)
        lengths = np.asarray(side["lengths"], dtype=np.int64) if "lengths" in side else None
        ts = np.asarray(side["timestamps"], dtype=np.float64) if "timestamps" in side else None
    elif fmt == "parquet":
        return _read_parquet([p])
    else:
        raise ValueError(f"unknown format {fmt!r}")
    level = meta.get("level", "frame" if lengths is not None else "clip")
    if lengths is not None:
        embeddings: np.ndarray | list[np.ndarray] = _split(flat, lengths)
        timestamps = _split(ts, lengths) if ts is not None else None
    else:
        embeddings, timestamps = flat, None
    return EmbeddingSet(paths, embeddings, level, timestamps, np.asarray(durations, np.float64), [], meta)


def _read_parquet(files: Sequence[Path]) -> EmbeddingSet:
    pa, pq = require_pyarrow()
    tables = [pq.read_table(f) for f in files]
    meta: dict[str, Any] = {}
    for t in tables:
        raw = (t.schema.metadata or {}).get(b"m2d2_embed")
        if raw:
            meta = json.loads(raw)
            break
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    cols = table.column_names
    paths_all = table.column("path").to_pylist()
    errors = table.column("error").to_pylist() if "error" in cols else [None] * len(paths_all)
    ok = np.asarray([e is None for e in errors], dtype=bool)
    failures = [FileFailure(p, e) for p, e, good in zip(paths_all, errors, ok) if not good]
    table = table.filter(pa.array(ok)) if not ok.all() else table
    paths = table.column("path").to_pylist()
    if not meta:
        for k in ("model", "level", "dim"):
            if k in cols and table.num_rows:
                meta[k] = table.column(k)[0].as_py()
    emb = table.column("embedding").combine_chunks()
    level = meta.get("level") or ("frame" if pa.types.is_list(emb.type) and
                                  pa.types.is_fixed_size_list(emb.type.value_type) else "clip")
    dim = int(meta.get("dim") or 0)
    if level == "frame":
        lengths = np.asarray(emb.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
        inner = emb.flatten()  # fixed-size lists, one per frame
        dim = dim or inner.type.list_size
        flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        embeddings: np.ndarray | list[np.ndarray] = _split(flat, lengths)
        ts_col = table.column("timestamps").combine_chunks()
        ts = ts_col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        timestamps = _split(ts, lengths) if len(ts) == int(lengths.sum()) else None
    else:
        dim = dim or (emb.type.list_size if pa.types.is_fixed_size_list(emb.type) else 0)
        values = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        embeddings = values.reshape(len(paths), dim if dim else -1) if len(paths) else np.zeros((0, dim), np.float32)
        timestamps = None
    durations = (np.asarray(table.column("duration").to_pylist(), dtype=np.float64) if "duration" in cols
                 else np.full(len(paths), np.nan))
    meta.setdefault("level", level)
    meta.setdefault("dim", dim)
    return EmbeddingSet(paths, embeddings, level, timestamps, durations, failures, meta)


def shard_files(d: Path, fmt: str) -> list[Path]:
    """Complete shards of an output directory, in name order (an ``.npy`` shard needs its ``.json`` too)."""
    shards = sorted(d.glob(f"{SHARD_PREFIX}*.{fmt}"))
    if fmt == "npy":
        shards = [s for s in shards if sidecar_path(s).exists()]
    return shards


def _read_dir(d: Path) -> EmbeddingSet:
    manifest = d / MANIFEST
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        fmt = meta.get("format", "npz")
        parts = [(_read_parquet([s]) if fmt == "parquet" else _read_file(s, fmt)) for s in shard_files(d, fmt)]
    else:
        pq_files = sorted(d.rglob("*.parquet"))
        if not pq_files:
            raise FileNotFoundError(f"{d} holds no m2d2-embed output ({MANIFEST} or .parquet files)")
        one = _read_parquet(pq_files)
        meta, parts = one.metadata, [one]
    es = concat(parts, level=meta.get("level", "clip"), metadata=meta)
    order = sorted(range(len(es.paths)), key=lambda i: es.paths[i])
    es = subset(es, order)
    es.failures = read_failures(d / FAILURES) + es.failures
    return es


def concat(parts: Iterable[EmbeddingSet], level: str, metadata: dict[str, Any]) -> EmbeddingSet:
    """Join embedding sets of one level (shards) into one."""
    parts = list(parts)
    paths = [p for es in parts for p in es.paths]
    durations = np.concatenate([np.asarray(es.durations, np.float64) for es in parts]) if parts else np.zeros(0)
    failures = [f for es in parts for f in es.failures]
    dim = int(metadata.get("dim", 0))
    if level == "frame":
        embeddings: np.ndarray | list[np.ndarray] = [e for es in parts for e in es.embeddings]
        timestamps = [t for es in parts for t in (es.timestamps or [])] or None
    else:
        arrays = [np.asarray(es.embeddings, np.float32) for es in parts if len(es.paths)]
        embeddings = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
        timestamps = None
    return EmbeddingSet(paths, embeddings, level, timestamps, durations, failures, dict(metadata))


def subset(es: EmbeddingSet, index: Sequence[int]) -> EmbeddingSet:
    """The items of ``es`` at ``index``, in that order."""
    idx = list(index)
    if isinstance(es.embeddings, np.ndarray):
        embeddings: np.ndarray | list[np.ndarray] = es.embeddings[idx] if idx else es.embeddings[:0]
    else:
        embeddings = [es.embeddings[i] for i in idx]
    ts = [es.timestamps[i] for i in idx] if es.timestamps is not None else None
    return EmbeddingSet([es.paths[i] for i in idx], embeddings, es.level, ts,
                        np.asarray(es.durations)[idx] if len(idx) else np.zeros(0), list(es.failures),
                        dict(es.metadata))
