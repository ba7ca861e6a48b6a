"""Embedding files: the in-memory result of ``embed_files``, the formats it is saved in and read back from, and
the resumable output directory the command line (and any long job) writes into.

Formats (:data:`FORMATS`, one writer/reader entry each in a table: :func:`get_format`). All hold the paths, the
embeddings, the durations, frame timestamps for the levels with a time axis (``frame``, ``frame_tags``), and
metadata (model, level, dim, sample rate, package version):

- ``.npz``: arrays ``paths`` [N] str, ``embeddings`` [N, D] float32 (time-axis levels: all frames of all files
  concatenated, [sum T_i, D]), ``lengths`` [N] int64 (frames per file; time-axis levels only), ``timestamps``
  [sum T_i] float64 seconds (time-axis levels only), ``durations`` [N] float64 seconds, ``metadata`` (JSON).
- ``.npy`` + ``.json`` sidecar: the ``embeddings`` array above in ``X.npy``; paths, durations, lengths,
  timestamps and metadata in ``X.json``.
- ``.parquet`` (needs pyarrow): one row per file with the columns ``path`` (string), ``model`` (string),
  ``level`` (string), ``dim`` (int32), ``embedding`` (fixed-size list of ``dim`` float32; time-axis levels:
  list of fixed-size lists, one per frame), ``timestamps`` (list of float64 seconds, time-axis levels; else
  null), ``duration`` (float64 seconds) and ``error`` (string, null when the file was embedded). The metadata is
  also in the schema metadata under ``m2d2_embed``. :func:`embedding_columns` builds these columns (Ray's
  writer uses it too).
- a directory (:class:`OutputDir`): ``manifest.json`` plus ``part-NNNNN.<format>`` parts written as work
  completes (resumable), ``failures.jsonl``, ``.lock`` (held by the run writing into it) and ``shards/`` (work
  of ``--shard``/``--devices`` workers not merged yet); or a directory of Parquet files without a manifest (as
  distributed writers produce).

Failed files go to a ``failures.jsonl`` sidecar (``X.failures.jsonl`` beside a single file), one JSON object
``{"path": ..., "error": ...}`` per line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import filelock
import numpy as np

from .model import FRAME_LEVELS, LEVELS  # noqa: F401  (LEVELS: re-exported, the levels an output can hold)

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LOCK = ".lock"
STAGING = "shards"  # unmerged work of --shard/--devices workers: OUT/shards/ (beside a file output: OUT.shards/)
COMPLETE = "complete.json"  # marks a worker's shard directory whose files have all been tried
FORMAT_VERSION = 1
SHARD_PREFIX = "part-"
# settings that must match to add to (resume) an output directory
RESUME_KEYS = (
    "model",
    "weights_fingerprint",
    "level",
    "reduce",
    "normalize",
    "dim",
    "sample_rate",
    "compute_dtype",
    "format",
)


@dataclass(frozen=True)
class FileFailure:
    """A file that could not be embedded, and why; or (``kind="warning"``) one that was embedded with something
    to know about it (e.g. a truncated file)."""

    path: str
    reason: str
    kind: str = "error"  # "error": not embedded; "warning": embedded, see reason


class OutputInUseError(RuntimeError):
    """Another process is writing into the same output directory."""


@dataclass
class EmbeddingSet:
    """Embeddings of a set of files (or texts), as returned by ``embed_files`` and ``read_embeddings``.

    Attributes:
        paths: one per embedded item, in order (the texts for level ``"text"``).
        embeddings: ``[N, D]`` float32 for levels ``"clip"``, ``"clap"``, ``"tags"`` (D = classes) and
            ``"text"``; for ``"frame"`` and ``"frame_tags"`` a list of ``[T_i, D]`` float32 arrays, one per file.
        level: ``"clip"``, ``"frame"``, ``"clap"``, ``"tags"``, ``"frame_tags"`` or ``"text"``.
        timestamps: time-axis levels only: a list of float64 ``[T_i]`` arrays, the centre of each frame in s.
        durations: float64 ``[N]``, seconds of audio per file (at the model's sample rate).
        failures: files that were not embedded, with the reason.
        warnings: files that were embedded with a warning (e.g. shorter than their header says).
        metadata: model, level, dim, sample_rate, m2d2_embed_version and the settings used.
    """

    paths: list[str]
    embeddings: np.ndarray | list[np.ndarray]
    level: str
    timestamps: list[np.ndarray] | None = None
    durations: np.ndarray = field(default_factory=lambda: np.zeros(0))
    failures: list[FileFailure] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[FileFailure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return (
            f"EmbeddingSet(level={self.level!r}, files={len(self)}, dim={self.dim}, "
            f"failures={len(self.failures)}, model={self.metadata.get('model')!r})"
        )

    @property
    def dim(self) -> int:
        """Width D of one embedding vector."""
        if "dim" in self.metadata:
            return int(self.metadata["dim"])
        if isinstance(self.embeddings, np.ndarray):
            return int(self.embeddings.shape[-1])
        return int(self.embeddings[0].shape[-1]) if self.embeddings else 0

    @classmethod
    def from_results(
        cls,
        results: Sequence[Any],
        failures: Sequence[FileFailure],
        metadata: Mapping[str, Any],
        level: str,
        embeddings: np.ndarray | None = None,
    ) -> EmbeddingSet:
        """Pack per-file results (each with ``path``, ``embedding``, ``duration`` and, for the levels with a time
        axis, ``timestamps``: :class:`m2d2_embed.files.FileResult`) into one set, in their order. ``embeddings``:
        the results' vectors already stacked ([N, D], levels without a time axis), used as they are."""
        dim = int(metadata["dim"])
        timestamps = None
        if level in FRAME_LEVELS:
            embeddings = [r.embedding for r in results]  # type: ignore[assignment]
            timestamps = [r.timestamps for r in results]
        elif embeddings is None:
            embeddings = np.stack([r.embedding for r in results]) if results else np.zeros((0, dim), np.float32)
        warnings = [FileFailure(r.path, r.warning, "warning") for r in results if getattr(r, "warning", None)]
        return cls(
            [r.path for r in results],
            embeddings,
            level,
            timestamps,
            np.asarray([r.duration for r in results], dtype=np.float64),
            list(failures),
            dict(metadata),
            warnings,
        )

    def save(self, path: str | os.PathLike, format: str | None = None) -> Path:
        """Write to one file, atomically (``format`` defaults to the suffix: npz, npy or parquet).

        Overwrites ``path``; failures, if any, go to ``<path minus suffix>.failures.jsonl``."""
        path = Path(path)
        get_format(format or format_for(path)).write(self, path)
        write_failures(self.failures + self.warnings, failures_path(path))
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


def output_format(output: str | os.PathLike, format: str | None = None) -> str | None:
    """What an output argument names: its file format, or ``None`` for a directory output.

    A known suffix (.npz, .npy, .parquet) is a file; an existing directory, a name ending in ``/`` or a name
    without a suffix is a directory. Raises ``ValueError`` for any other suffix (``emb.txt`` is a typo more
    often than a directory name) and when ``format`` contradicts the suffix."""
    spec = os.fspath(output)
    path = Path(spec)
    suffix = path.suffix.lower().lstrip(".")
    if suffix in FORMATS and not path.is_dir():
        if format is not None and format != suffix:
            raise ValueError(f"--format {format} does not match the output suffix {path.suffix!r}")
        return suffix
    if suffix and not (path.is_dir() or spec.endswith(("/", os.sep))):
        raise ValueError(
            f"output {spec} has the suffix {path.suffix!r}, which is not an output format; use "
            f"{', '.join('.' + f for f in FORMATS)} for a file, or a name ending in / for a directory"
        )
    return None


def failures_path(path: Path) -> Path:
    """Sidecar listing the failures of a single-file output: ``out.npz`` -> ``out.failures.jsonl``."""
    return path.with_name(path.stem + ".failures.jsonl")


def sidecar_path(path: Path) -> Path:
    """JSON sidecar of an ``.npy`` output: ``out.npy`` -> ``out.json``."""
    return path.with_suffix(".json")


def resume_key(path: str) -> str:
    """The canonical (absolute, links resolved) form of a path: what resuming compares, whatever the spelling."""
    return os.path.realpath(path)


def require_pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "Parquet output needs pyarrow: pip install 'm2d2-embed[parquet]' (or pip install pyarrow); "
            "npz and npy outputs work without it"
        ) from e
    return pa, pq


def atomic_write(dst: str | os.PathLike, write: Callable[[str], Any], suffix: str = "") -> Path:
    """Write through a temporary file in ``dst``'s directory (created if missing), then rename it over ``dst``;
    the file gets the mode a plain new file gets (0o666 less the umask). Returns ``dst``.

    ``write`` receives the temporary path (ending in ``suffix``, for writers that insist on one); on any failure
    the temporary file is removed and ``dst`` is left as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
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
    return dst


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _flat(es: EmbeddingSet) -> tuple[np.ndarray | list[np.ndarray], np.ndarray | None, np.ndarray | None]:
    """(embeddings [N or sum T, D], lengths [N] or None, timestamps [sum T] or None). At the levels with a time
    axis the embeddings are the files' [T_i, D] float32 arrays in order, which :func:`write_npy` writes as their
    concatenation without making it (at frame level that would be a second copy of every frame)."""
    if es.level in FRAME_LEVELS:
        embs = [np.asarray(e, dtype=np.float32) for e in es.embeddings]
        lengths = np.asarray([len(e) for e in embs], dtype=np.int64)
        ts = (np.concatenate(es.timestamps) if es.timestamps else np.zeros(0)).astype(np.float64)
        return embs or np.zeros((0, es.dim), np.float32), lengths, ts
    emb = np.asarray(es.embeddings, dtype=np.float32)
    if emb.ndim != 2:
        emb = emb.reshape(len(es.paths), -1)
    return emb, None, None


def _split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return list(np.split(flat, np.cumsum(lengths)[:-1])) if len(lengths) else []


def _meta(es: EmbeddingSet) -> dict[str, Any]:
    return {**es.metadata, "level": es.level, "dim": es.dim, "format_version": FORMAT_VERSION}


# ---------------------------------------------------------------------------------------------------
# Arrow columns (Parquet files here, Ray's tables in integrations/ray.py)
# ---------------------------------------------------------------------------------------------------


def embedding_columns(
    level: str,
    dim: int,
    embeddings: np.ndarray | Sequence[np.ndarray | None],
    timestamps: Sequence[np.ndarray | None] | None = None,
) -> tuple[pa.Array, pa.Array]:
    """The ``embedding`` and ``timestamps`` Arrow columns of one level.

    Args:
        level: a time-axis level (``"frame"``, ``"frame_tags"``) gives list-of-vector rows; others vector rows.
        dim: width D of one vector.
        embeddings: an ``[N, D]`` float array, or one item per row: ``[D]`` (``[T_i, D]`` for time-axis levels),
            or ``None`` for a row without an embedding (a failed file), which becomes null.
        timestamps: time-axis levels: ``[T_i]`` seconds per row (``None`` where the embedding is).
    Returns:
        ``(embedding, timestamps)``: the timestamps column is all null for levels without a time axis.
    """
    pa, _ = require_pyarrow()
    n = len(embeddings)
    nulls = [False] * n if isinstance(embeddings, np.ndarray) else [e is None for e in embeddings]
    missing = pa.array(nulls, type=pa.bool_()) if any(nulls) else None
    no_timestamps = pa.nulls(n, type=pa.list_(pa.float64()))
    if level not in FRAME_LEVELS:
        if isinstance(embeddings, np.ndarray):
            flat = embeddings.astype(np.float32, copy=False).reshape(-1)
        else:
            rows = np.zeros((n, dim), np.float32)  # null rows stay zero underneath the mask
            for i, e in enumerate(embeddings):
                if e is not None:
                    rows[i] = e
            flat = rows.reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), dim, mask=missing), no_timestamps
    lengths = np.asarray([0 if e is None else len(e) for e in embeddings], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    parts = [np.asarray(e, np.float32).reshape(-1, dim) for e in embeddings if e is not None]
    flat = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), dim)
    emb = pa.ListArray.from_arrays(offsets, vectors, mask=missing)
    if timestamps is None:
        return emb, no_timestamps
    ts_parts = [np.asarray(t, np.float64) for e, t in zip(embeddings, timestamps) if e is not None]
    ts_flat = np.concatenate(ts_parts) if ts_parts else np.zeros(0)
    return emb, pa.ListArray.from_arrays(offsets, pa.array(ts_flat, type=pa.float64()), mask=missing)


def arrow_table(
    paths: Sequence[str],
    level: str,
    dim: int,
    embeddings: np.ndarray | Sequence[np.ndarray | None],
    *,
    timestamps: Sequence[np.ndarray | None] | None = None,
    durations: Sequence[float | None] | np.ndarray | None = None,
    errors: Sequence[str | None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> pa.Table:
    """One Arrow table in the package's Parquet schema (see the module docstring): ``path``, ``model``,
    ``level``, ``dim``, ``embedding``, ``timestamps``, ``duration`` (s), ``error``, then the ``extra`` columns;
    ``metadata`` goes in the schema metadata under ``m2d2_embed``. Rows with an error have a null embedding."""
    pa, _ = require_pyarrow()
    n, meta = len(paths), dict(metadata or {})
    emb, ts = embedding_columns(level, dim, embeddings, timestamps)
    cols: dict[str, Any] = {
        "path": pa.array(list(paths), type=pa.string()),
        "model": pa.array([str(meta.get("model", ""))] * n, type=pa.string()),
        "level": pa.array([level] * n, type=pa.string()),
        "dim": pa.array([dim] * n, type=pa.int32()),
        "embedding": emb,
        "timestamps": ts,
        "duration": pa.array(
            [None] * n if durations is None else durations if isinstance(durations, np.ndarray) else list(durations),
            type=pa.float64(),
        ),
        "error": pa.array(list(errors) if errors is not None else [None] * n, type=pa.string()),
        **(extra or {}),
    }
    return pa.table(cols).replace_schema_metadata({"m2d2_embed": json.dumps(meta)})


# ---------------------------------------------------------------------------------------------------
# The format table: one writer and reader per format
# ---------------------------------------------------------------------------------------------------


def _write_npz(es: EmbeddingSet, path: Path) -> None:
    flat, lengths, ts = _flat(es)
    key = "texts" if es.level == "text" else "paths"
    arrays: dict[str, np.ndarray] = {
        key: np.asarray(es.paths, dtype=str) if es.paths else np.zeros(0, "<U1"),
        "embeddings": flat,
        "metadata": np.asarray(json.dumps(_meta(es))),
    }
    if es.level != "text":
        arrays["durations"] = np.asarray(es.durations, dtype=np.float64)
    if lengths is not None:
        arrays["lengths"] = lengths
        arrays["timestamps"] = ts

    atomic_write(path, lambda tmp: savez(tmp, arrays))


def savez(path: str, arrays: Mapping[str, np.ndarray | Sequence[np.ndarray]]) -> None:
    """``np.savez(path, **arrays)``, the same bytes, each member written by :func:`write_npy` (a list of arrays
    is stored as their concatenation)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                write_npy(member, a)


def write_npy(f: Any, a: np.ndarray | Sequence[np.ndarray]) -> None:
    """``np.save(f, a)`` into an open binary file, the same bytes: each plain numeric array in one write of its
    own buffer, not through 16-MiB copies (8,192 clip embeddings, 126 MB, into an npz: 83 -> 67 ms, medians).
    ``a`` may be a non-empty list of C-contiguous arrays of one dtype and trailing shape: written as their
    concatenation along axis 0, without making it."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "biuf" or not a.flags.c_contiguous:
            np.lib.format.write_array(f, a, allow_pickle=False)
            return
        blocks = [a]
    else:
        blocks = list(a)
        if not blocks:
            raise ValueError("write_npy: an empty list of blocks has no dtype or shape; pass an empty array")
    first = blocks[0]
    if any(b.dtype != first.dtype or b.shape[1:] != first.shape[1:] or not b.flags.c_contiguous for b in blocks):
        raise ValueError("write_npy: blocks differ in dtype or trailing shape, or are not C-contiguous")
    header = {
        "descr": np.lib.format.dtype_to_descr(first.dtype),
        "fortran_order": False,
        "shape": (sum(len(b) for b in blocks), *first.shape[1:]) if first.ndim else (),
    }
    np.lib.format.write_array_header_1_0(f, header)
    for b in blocks:
        f.write(b.reshape(-1).view(np.uint8).data)  # its bytes, not a copy


def _write_npy(es: EmbeddingSet, path: Path) -> None:
    flat, lengths, ts = _flat(es)
    side: dict[str, Any] = {"metadata": _meta(es), "texts" if es.level == "text" else "paths": list(es.paths)}
    if es.level != "text":
        side["durations"] = np.asarray(es.durations, dtype=np.float64).tolist()
    if lengths is not None:
        side["lengths"] = lengths.tolist()
        side["timestamps"] = ts.tolist()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write_npy(f, flat)

    atomic_write(path, write)
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(side)))


def _write_parquet(es: EmbeddingSet, path: Path) -> None:
    _, pq = require_pyarrow()
    flat, _, _ = _flat(es)
    embeddings = list(es.embeddings) if es.level in FRAME_LEVELS else flat
    table = arrow_table(
        es.paths,
        es.level,
        es.dim,
        embeddings,
        timestamps=es.timestamps,
        durations=np.asarray(es.durations, dtype=np.float64),
        metadata=_meta(es),
    )
    atomic_write(path, lambda tmp: pq.write_table(table, tmp), suffix=".parquet")


def _read_npz(p: Path) -> EmbeddingSet:
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
        paths = [str(s) for s in z["paths" if "paths" in z.files else "texts"]]
        flat = z["embeddings"]
        durations = z["durations"] if "durations" in z.files else np.full(len(paths), np.nan)
        lengths = z["lengths"] if "lengths" in z.files else None
        ts = z["timestamps"] if "timestamps" in z.files else None
    return _assemble(paths, flat, durations, lengths, ts, meta)


def _read_npy(p: Path) -> EmbeddingSet:
    side_p = sidecar_path(p)
    if not side_p.exists():
        raise FileNotFoundError(f"{p} has no {side_p.name} sidecar (paths and metadata); was it written by m2d2_embed?")
    side = json.loads(side_p.read_text())
    paths = list(side.get("paths", side.get("texts", [])))
    durations = np.asarray(side.get("durations", [np.nan] * len(paths)), dtype=np.float64)
    lengths = np.asarray(side["lengths"], dtype=np.int64) if "lengths" in side else None
    ts = np.asarray(side["timestamps"], dtype=np.float64) if "timestamps" in side else None
    return _assemble(paths, np.load(p, allow_pickle=False), durations, lengths, ts, side.get("metadata", {}))


def _assemble(
    paths: list[str],
    flat: np.ndarray,
    durations: np.ndarray,
    lengths: np.ndarray | None,
    ts: np.ndarray | None,
    meta: dict[str, Any],
) -> EmbeddingSet:
    level = meta.get("level", "frame" if lengths is not None else "clip")
    if lengths is not None:
        embeddings: np.ndarray | list[np.ndarray] = _split(flat, lengths)
        timestamps = _split(ts, lengths) if ts is not None else None
    else:
        embeddings, timestamps = flat, None
    return EmbeddingSet(paths, embeddings, level, timestamps, np.asarray(durations, np.float64), [], meta)


def _read_parquet(p: Path) -> EmbeddingSet:
    return _read_parquet_files([p])


def _paths_npz(p: Path) -> list[str]:
    with np.load(p, allow_pickle=False) as z:
        return [str(s) for s in z["paths"]]


def _paths_npy(p: Path) -> list[str]:
    return list(json.loads(sidecar_path(p).read_text())["paths"])


def _paths_parquet(p: Path) -> list[str]:
    _, pq = require_pyarrow()
    return pq.read_table(p, columns=["path"]).column("path").to_pylist()


@dataclass(frozen=True)
class OutputFormat:
    """One output format: how an :class:`EmbeddingSet` is written to and read from a file of it.

    ``write(es, path)`` writes atomically; ``read(path)`` reads it back; ``read_paths(path)`` reads only the
    paths (what resuming needs); ``files(path)`` are the files one output occupies (``.npy``: with its
    ``.json``); ``check()`` raises ``ImportError`` when the format's optional dependency is missing."""

    name: str
    write: Callable[[EmbeddingSet, Path], None]
    read: Callable[[Path], EmbeddingSet]
    read_paths: Callable[[Path], list[str]]
    files: Callable[[Path], list[Path]] = lambda p: [p]
    check: Callable[[], Any] = lambda: None


_FORMATS: dict[str, OutputFormat] = {
    "npz": OutputFormat("npz", _write_npz, _read_npz, _paths_npz),
    "npy": OutputFormat("npy", _write_npy, _read_npy, _paths_npy, files=lambda p: [p, sidecar_path(p)]),
    "parquet": OutputFormat("parquet", _write_parquet, _read_parquet, _paths_parquet, check=require_pyarrow),
}
FORMATS = tuple(_FORMATS)


def get_format(name: str) -> OutputFormat:
    """The writer/reader entry of a format name (``"npz"``, ``"npy"`` or ``"parquet"``)."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; use one of {', '.join(FORMATS)}") from None


def write_file(es: EmbeddingSet, path: Path, fmt: str) -> None:
    """Write ``es`` to ``path`` in ``fmt`` atomically (npy: the ``.npy`` and then its ``.json`` sidecar)."""
    get_format(fmt).write(es, path)


def write_failures(failures: Sequence[FileFailure], path: Path) -> None:
    """Write the failures sidecar atomically; remove a stale one when there are no failures."""
    if not failures:
        path.unlink(missing_ok=True)
        return
    text = "".join(json.dumps({"path": f.path, f.kind: f.reason}) + "\n" for f in failures)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_failures(path: Path) -> list[FileFailure]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            kind = "warning" if "warning" in d else "error"
            out.append(FileFailure(d["path"], d.get(kind, ""), kind))
    return out


def _split_sidecar(es: EmbeddingSet, entries: list[FileFailure], embedded: set[str] | None = None) -> None:
    """Sidecar entries -> ``es.failures`` (not embedded) and ``es.warnings``."""
    es.warnings = [f for f in entries if f.kind == "warning"]
    es.failures = [f for f in entries if f.kind != "warning" and (embedded is None or f.path not in embedded)]


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
        order), each path once (a path found in two parts is read from the first); a single file keeps the
        order it was written in.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no embeddings at {p}")
    if p.is_dir():
        return _read_dir(p)
    es = get_format(format_for(p)).read(p)
    _split_sidecar(es, read_failures(failures_path(p)) + es.failures)
    return es


def _read_parquet_files(files: Sequence[Path]) -> EmbeddingSet:
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
    level = meta.get("level") or (
        "frame" if pa.types.is_list(emb.type) and pa.types.is_fixed_size_list(emb.type.value_type) else "clip"
    )
    dim = int(meta.get("dim") or 0)
    if level in FRAME_LEVELS:
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
    durations = (
        np.asarray(table.column("duration").to_pylist(), dtype=np.float64)
        if "duration" in cols
        else np.full(len(paths), np.nan)
    )
    meta.setdefault("level", level)
    meta.setdefault("dim", dim)
    return EmbeddingSet(paths, embeddings, level, timestamps, durations, failures, meta)


def shard_files(d: Path, fmt: str) -> list[Path]:
    """Complete parts of an output directory, in name order (an ``.npy`` part needs its ``.json`` too)."""
    return [s for s in sorted(d.glob(f"{SHARD_PREFIX}*.{fmt}")) if all(f.exists() for f in get_format(fmt).files(s))]


def _read_dir(d: Path) -> EmbeddingSet:
    manifest = d / MANIFEST
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        form = get_format(meta.get("format", "npz"))
        parts = [form.read(s) for s in shard_files(d, form.name)]
    else:
        pq_files = sorted(d.rglob("*.parquet"))
        if not pq_files:
            raise FileNotFoundError(f"{d} holds no m2d2-embed output ({MANIFEST} or .parquet files)")
        one = _read_parquet_files(pq_files)
        meta, parts = one.metadata, [one]
    es, twice = join(parts, level=meta.get("level", "clip"), metadata=meta)
    if twice:
        log.warning(
            "%s holds %d path(s) more than once (written by concurrent runs of an older version?); each is read once",
            d,
            twice,
        )
    _split_sidecar(es, read_failures(d / FAILURES) + es.failures, set(es.paths))
    return es


def join(
    parts: list[EmbeddingSet], level: str, metadata: dict[str, Any], key: Callable[[str], str] = str
) -> tuple[EmbeddingSet, int]:
    """Sets of one level (parts, shards) as one set sorted by path, each ``key(path)`` once: the first
    occurrence, in the order of ``parts``. Returns the set and how many duplicates were left out.

    Consumes ``parts``: each entry of the list is set to ``None`` once its vectors are copied. At levels with
    one vector per file the result is one ``[N, D]`` array allocated once and filled part by part, so the
    memory this takes is the result plus one part, not the parts, their concatenation and a sorted copy."""
    first: dict[str, tuple[str, int, int]] = {}
    total = 0
    for i, es in enumerate(parts):
        total += len(es.paths)
        for j, p in enumerate(es.paths):
            first.setdefault(key(p), (p, i, j))
    picks = sorted(first.values())  # by path (keys are unique, so paths are too)
    paths = [p for p, _, _ in picks]
    durations = np.asarray([parts[i].durations[j] for _, i, j in picks], np.float64)
    failures = [f for es in parts for f in es.failures]
    kept = set(first)
    warnings = list({w.path: w for es in parts for w in es.warnings if key(w.path) in kept}.values())
    timestamps = None
    if level in FRAME_LEVELS:
        embeddings: np.ndarray | list[np.ndarray] = [parts[i].embeddings[j] for _, i, j in picks]
        if any(es.timestamps is not None for es in parts):
            timestamps = [parts[i].timestamps[j] for _, i, j in picks]
        parts[:] = [None] * len(parts)
    else:
        dims = {int(np.shape(es.embeddings)[-1]) for es in parts if len(es.paths)}
        if len(dims) > 1:
            raise ValueError(f"cannot join embeddings of different widths {sorted(dims)}")
        out = np.empty((len(picks), dims.pop() if dims else int(metadata.get("dim", 0))), np.float32)
        rows = np.arange(len(picks))
        owner = np.asarray([i for _, i, _ in picks], np.int64)
        src_row = np.asarray([j for _, _, j in picks], np.int64)
        for i in range(len(parts)):
            mine = owner == i
            src = np.asarray(parts[i].embeddings, np.float32)
            parts[i] = None
            to, fro = rows[mine], src_row[mine]
            step = max(1, (1 << 20) // max(1, 4 * out.shape[1]))  # rows of 1 MiB: temporaries stay small
            for k in range(0, len(to), step):
                out[to[k : k + step]] = src[fro[k : k + step]]
            del src
        embeddings = out
    es = EmbeddingSet(paths, embeddings, level, timestamps, durations, failures, dict(metadata), warnings)
    return es, total - len(picks)


def subset(es: EmbeddingSet, index: Sequence[int]) -> EmbeddingSet:
    """The items of ``es`` at ``index``, in that order."""
    idx = list(index)
    if isinstance(es.embeddings, np.ndarray):
        embeddings: np.ndarray | list[np.ndarray] = es.embeddings[idx] if idx else es.embeddings[:0]
    else:
        embeddings = [es.embeddings[i] for i in idx]
    ts = [es.timestamps[i] for i in idx] if es.timestamps is not None else None
    return EmbeddingSet(
        [es.paths[i] for i in idx],
        embeddings,
        es.level,
        ts,
        np.asarray(es.durations)[idx] if len(idx) else np.zeros(0),
        list(es.failures),
        dict(es.metadata),
    )


# ---------------------------------------------------------------------------------------------------
# The resumable output directory
# ---------------------------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class OutputDir:
    """A resumable output directory: ``manifest.json`` (the settings), ``part-NNNNN.<fmt>`` parts written as
    work completes, ``failures.jsonl``, and ``.lock``, held by the one process writing into it.

    Typical use (what ``m2d2-embed embed -o DIR`` does)::

        out = OutputDir(path, "npz")
        with out.open(settings):               # checks, locks; refuses another run's directory
            done = out.done_keys()             # resume: canonical paths already embedded
            out.start(metadata)                # writes the manifest, or checks it against the metadata
            out.add_part(embedding_set)        # as work completes
            out.write_failures(failures)

    Settings are compared on :data:`RESUME_KEYS`; a directory made with other settings is refused."""

    def __init__(self, root: str | os.PathLike, fmt: str = "npz") -> None:
        self.root = Path(root)
        self.format = get_format(fmt)
        self.manifest: dict[str, Any] | None = None
        self._lock: filelock.BaseFileLock | None = None
        self._created = False

    @property
    def fmt(self) -> str:
        return self.format.name

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or ``None`` when there is none yet; ``ValueError`` when it is unreadable."""
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is unreadable ({e}); pass --overwrite (overwrite=True) to start over") from e

    def check(self, settings: Mapping[str, Any], manifest: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` when ``settings`` differ from the manifest's on any of :data:`RESUME_KEYS`."""
        manifest = self.manifest if manifest is None else manifest
        if manifest is None:
            return
        diffs = [
            f"{k}: {manifest.get(k)!r} there, {settings[k]!r} now"
            for k in RESUME_KEYS
            if k in settings and manifest.get(k) != settings[k]
        ]
        if diffs:
            raise ValueError(
                f"output directory {self.root} holds embeddings made with other settings "
                f"({'; '.join(diffs)}); use another directory, the same settings to resume, or "
                "--overwrite to start over"
            )

    def open(
        self, settings: Mapping[str, Any] | None = None, *, overwrite: bool = False, lock: bool = True
    ) -> OutputDir:
        """Check the directory and take its lock (create it if needed); usable as a context manager.

        Raises:
            FileNotFoundError: its parent folder does not exist. ValueError: it is a file, a folder that is not
            an output, or an output made with other ``settings``. OutputInUseError: another process holds it.
        """
        root = self.root
        if not root.parent.is_dir():
            raise FileNotFoundError(
                f"the parent of the output directory {root} does not exist ({root.parent}); "
                f"create it first (mkdir -p {root.parent})"
            )
        if root.exists() and not root.is_dir():
            raise ValueError(
                f"output {root} exists and is not a directory; give a file name ending in .npz, .npy "
                "or .parquet for a file output"
            )
        if root.is_dir() and self.read_manifest() is None and not self._only_ours():
            raise ValueError(
                f"output directory {root} exists and is not an m2d2-embed output (no {MANIFEST}); "
                "choose a new or empty directory"
            )
        self._created = not root.exists()
        root.mkdir(exist_ok=True)
        if lock:
            self._lock = filelock.FileLock(str(root / LOCK), timeout=0, is_singleton=True)
            try:
                self._lock.acquire()
            except filelock.Timeout:
                self._lock = None
                raise OutputInUseError(
                    f"another m2d2-embed run is writing to {root} (it holds {root / LOCK}); "
                    "wait for it to finish, then run this command again to add what is "
                    "missing, or give another output"
                ) from None
        try:
            if overwrite:
                self.clear()
            self.manifest = self.read_manifest()
            if settings is not None:
                self.check(settings)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the lock; a directory this object created and never wrote into is removed."""
        if self._created and self.root.is_dir() and {p.name for p in self.root.iterdir()} <= {LOCK}:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ours(self) -> list[Path]:
        return [
            p
            for p in self.root.iterdir()
            if p.name in (MANIFEST, FAILURES, STAGING, COMPLETE)
            or p.name.startswith(SHARD_PREFIX)
            or (p.name.startswith(".") and ".tmp" in p.name)
        ]

    def _only_ours(self) -> bool:
        names = {p.name for p in self.root.iterdir()}
        return names <= {STAGING, LOCK}

    def clear(self) -> None:
        """Delete the outputs in the directory (parts, manifest, failures, unmerged shards); keep the rest."""
        for p in self._ours():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.manifest = None

    def clean_partial(self) -> None:
        """Remove temporary files of an interrupted write and parts whose other files never landed."""
        for p in self.root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)
            elif (
                p.name.startswith(SHARD_PREFIX)
                and p.suffix == f".{self.fmt}"
                and not all(f.exists() for f in self.format.files(p))
            ):
                p.unlink(missing_ok=True)

    def start(self, metadata: Mapping[str, Any]) -> None:
        """Write the manifest (a new output) or check ``metadata`` against it (resuming)."""
        if self.manifest is not None:
            self.check(metadata)
            return
        self.root.mkdir(exist_ok=True)
        self.manifest = {**metadata, "created": _now()}
        _write_json(self.root / MANIFEST, self.manifest)

    def parts(self) -> list[Path]:
        return shard_files(self.root, self.fmt) if self.root.is_dir() else []

    def done_paths(self) -> list[str]:
        """The paths already embedded, as they were written."""
        return [p for part in self.parts() for p in self.format.read_paths(part)]

    def done_keys(self) -> set[str]:
        """:func:`resume_key` of each path already embedded: a file is done whatever spelling named it."""
        return {resume_key(p) for p in self.done_paths()}

    def next_part(self) -> Path:
        nums = [
            int(p.name[len(SHARD_PREFIX) :].split(".")[0])
            for p in self.root.glob(f"{SHARD_PREFIX}*")
            if p.name[len(SHARD_PREFIX) :].split(".")[0].isdigit()
        ]
        return self.root / f"{SHARD_PREFIX}{max(nums, default=-1) + 1:05d}.{self.fmt}"

    def add_part(self, es: EmbeddingSet) -> Path:
        """Write ``es`` as the next part (atomically); returns its path."""
        dst = self.next_part()
        self.format.write(es, dst)
        return dst

    def write_failures(self, failures: Sequence[FileFailure]) -> Path:
        """Replace ``failures.jsonl`` with ``failures`` less those embedded since; returns its path."""
        done = self.done_keys() if failures else set()
        write_failures(
            [f for f in failures if f.kind == "warning" or resume_key(f.path) not in done], self.root / FAILURES
        )
        return self.root / FAILURES


class ResultWriter:
    """Stores per-file results as they complete: into a file output once all are in (:meth:`save`), or as parts
    of ``part_size`` files in an :class:`OutputDir`, so that an interruption loses at most one part.

    ``add(index, item)`` takes what :func:`m2d2_embed.files.iter_file_embeddings` yields: ``(index into the
    input list, FileResult or FileFailure)``. With ``keep`` (always for a file output; ``dest=None``: in memory
    only) the results stay in memory too: :meth:`results` returns them in input order, :meth:`embedding_set`
    as one set.

    ``expected``: how many inputs there are (indices ``0 .. expected - 1``). At the levels with one vector per
    file it lets the kept results go straight into their rows of one ``[expected, dim]`` array as they arrive,
    so the set is ready when the last file is: no stacking of thousands of arrays at the end (83 -> 7 ms for 8,192
    clip embeddings, ``benchmarks/write_outputs.py``), and one copy of them less in memory."""

    def __init__(
        self,
        dest: OutputDir | str | os.PathLike | None,
        fmt: str | None,
        metadata: Mapping[str, Any],
        level: str,
        *,
        part_size: int = 1000,
        keep: bool = False,
        expected: int | None = None,
    ) -> None:
        self.dir = dest if isinstance(dest, OutputDir) else None
        self.path = None if self.dir is not None or dest is None else Path(dest)
        self.format = get_format(fmt) if fmt is not None or dest is not None else None
        self.metadata, self.level = dict(metadata), level
        self.part_size, self.keep = part_size, keep or self.dir is None
        self.failures: list[FileFailure] = []
        self.warnings: list[FileFailure] = []  # embedded files with a warning (e.g. truncated): in the sidecar too
        self.embedded, self.audio_seconds = 0, 0.0
        self._pending: list[tuple[int, Any]] = []
        self._kept: list[tuple[int, Any]] = []
        self._failed_at: list[int] = []  # input index of each of self.failures
        self._rows: np.ndarray | None = None  # [expected, dim]: kept vectors by input index
        if self.keep and expected is not None and level not in FRAME_LEVELS and "dim" in self.metadata:
            dim = int(self.metadata["dim"])
            try:
                self._rows = np.empty((expected, dim), np.float32)
            except MemoryError as e:  # refused before any work is done, not after hours of it
                raise MemoryError(
                    f"{expected:,} embeddings of {dim} float32 need {expected * dim * 4 / 2**30:,.1f} GiB of memory, "
                    f"held until the end of the run; for this many files write a directory output (`-o DIR/` on the "
                    f"command line: it holds one part at a time) or take the results one by one from "
                    f"`m2d2_embed.files.iter_file_embeddings`"
                ) from e

    def add(self, index: int, item: Any) -> None:
        if isinstance(item, FileFailure):
            self.failures.append(item)
            self._failed_at.append(index)
            return
        self.embedded += 1
        self.audio_seconds += float(item.duration)
        if getattr(item, "warning", None):
            self.warnings.append(FileFailure(item.path, item.warning, "warning"))
        if self.keep:
            if self._rows is not None:
                self._rows[index] = item.embedding  # the result now lives in its row, not in its batch's array
                item = replace(item, embedding=self._rows[index])
            self._kept.append((index, item))
        if self.dir is not None:
            self._pending.append((index, item))
            if len(self._pending) >= self.part_size:
                self.flush()

    def flush(self) -> None:
        """Write the results not yet stored as the next part of the directory (nothing for a file output)."""
        if self.dir is not None and self._pending:
            self._pending.sort(key=lambda r: r[0])
            self.dir.start(self.metadata)
            self.dir.add_part(EmbeddingSet.from_results([r for _, r in self._pending], [], self.metadata, self.level))
            self._pending.clear()

    def results(self) -> list[Any]:
        return [r for _, r in sorted(self._kept, key=lambda r: r[0])]

    def embedding_set(self) -> EmbeddingSet:
        """The kept results in input order, with the failures (in input order too), as one set."""
        failures = [f for _, f in sorted(zip(self._failed_at, self.failures), key=lambda x: x[0])]
        if self._rows is None:
            return EmbeddingSet.from_results(self.results(), failures, self.metadata, self.level)
        kept = sorted(self._kept, key=lambda r: r[0])
        idx = np.fromiter((i for i, _ in kept), np.int64, len(kept))
        whole = len(idx) == len(self._rows) and bool((idx == np.arange(len(idx))).all())
        rows = self._rows if whole else self._rows[idx]  # a copy only when some files failed
        return EmbeddingSet.from_results([r for _, r in kept], failures, self.metadata, self.level, embeddings=rows)

    def save(self, complete: bool = True) -> Path | None:
        """Store what is left and the failures sidecar (returned). ``complete=False`` (interrupted, or stopped at
        a failure): a directory keeps its parts, a file output is not written."""
        if self.dir is not None:
            self.flush()
            self.dir.start(self.metadata)
            return self.dir.write_failures(self.failures + self.warnings)
        if self.path is None:
            return None
        if complete:
            self.format.write(self.embedding_set(), self.path)
        write_failures(self.failures + self.warnings, failures_path(self.path))
        return failures_path(self.path)


# ---------------------------------------------------------------------------------------------------
# Work split into shards (--shard I/N, --devices) and their merge
# ---------------------------------------------------------------------------------------------------
#
# The sorted file list is split round-robin: shard i of n takes files i, i + n, i + 2n, ... Each shard is a
# resumable output directory of its own, under OUT/shards/IIIII-of-NNNNN/ (beside a file output:
# OUT.shards/IIIII-of-NNNNN/), with complete.json written once all its files are done. Merging moves the parts
# of complete shards into OUT (a directory output grows as shards finish; files already there are never
# duplicated) or, for a file output, writes OUT from all n shards once every one is complete.


def staging_dir(out: str | os.PathLike, is_file: bool) -> Path:
    """Where the unmerged shards of an output live."""
    out = Path(out)
    return out.with_name(out.name + ".shards") if is_file else out / STAGING


def shard_dir(out: str | os.PathLike, is_file: bool, i: int, n: int) -> Path:
    """The directory of shard ``i`` of ``n``."""
    return staging_dir(out, is_file) / f"{i:05d}-of-{n:05d}"


def shard_dirs(root: Path) -> list[tuple[int, int, Path]]:
    """(i, n, dir) of each shard directory under a staging folder, sorted."""
    found = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            parts = p.name.split("-of-")
            if p.is_dir() and len(parts) == 2 and all(s.isdigit() for s in parts):
                found.append((int(parts[0]), int(parts[1]), p))
    return found


def mark_complete(shard: Path, info: Mapping[str, Any]) -> None:
    """Record that every file of a shard has been tried (``info``: counts); the merge takes it after this."""
    _write_json(shard / COMPLETE, {**info, "finished": _now()})


@dataclass
class MergeReport:
    """What :func:`merge_shards` did."""

    merged: list[str] = field(default_factory=list)  # shard names "i/n"
    added: int = 0  # files added to the output
    failed: int = 0  # files listed as failed in the output
    waiting: list[str] = field(default_factory=list)  # shards not complete (file outputs: nothing merged until all)
    busy: bool = False  # another run held the output directory: nothing merged

    def describe(self, out: Path) -> str:
        if self.busy:
            return f"{out} is in use by another run: shards left unmerged; run `m2d2-embed merge {out}` later"
        if not self.merged:
            if self.waiting:
                return f"{out} waits for shard(s) {', '.join(self.waiting)} to complete"
            return f"nothing to merge into {out}"
        s = (
            f"merged shard(s) {', '.join(self.merged)} into {out}: {self.added} files added"
            f"{f', {self.failed} failed' if self.failed else ''}"
        )
        return s + (f"; waiting for {', '.join(self.waiting)}" if self.waiting else "")


def merge_shards(out: str | os.PathLike, n: int | None = None) -> MergeReport:
    """Merge the complete shards of ``out`` into it (see the comment above); safe at any time, from any process.

    ``n``: the split to merge (default: the one found; a file output refuses two). Shards already merged are
    gone; a directory held by another run is left for later (``busy``)."""
    out = Path(out)
    fmt = output_format(out)
    root = staging_dir(out, fmt is not None)
    report = MergeReport()
    if not root.is_dir():
        return report
    root.mkdir(exist_ok=True)  # another worker may have merged and removed it since
    with filelock.FileLock(str(root / LOCK)):
        shards = shard_dirs(root)
        if n is None:
            ns = sorted({k for _, k, _ in shards})
            if fmt is not None and len(ns) > 1:
                raise ValueError(
                    f"{root} holds shards of splits into {' and '.join(map(str, ns))}; finish one "
                    "split and delete the other's shard directories"
                )
            n = ns[0] if ns else None
        if fmt is not None:
            _merge_file(out, shards, n, report)
        else:
            _merge_dir(out, shards, report)
    # the staging folder goes once empty (a new worker may be creating a shard in it: then it stays)
    if root.is_dir() and not shard_dirs(root):
        (root / LOCK).unlink(missing_ok=True)
        try:
            root.rmdir()
        except OSError:
            pass
    return report


def _shard_meta(shard: Path) -> dict[str, Any]:
    meta = json.loads((shard / MANIFEST).read_text())
    meta.pop("created", None)
    return meta


def _merge_dir(out: Path, shards: list[tuple[int, int, Path]], report: MergeReport) -> None:
    complete = [(i, k, d) for i, k, d in shards if (d / COMPLETE).exists()]
    report.waiting = [f"{i}/{k}" for i, k, d in shards if not (d / COMPLETE).exists()]
    if not complete:
        return
    meta = _shard_meta(complete[0][2])
    final = OutputDir(out, meta["format"])
    try:
        final.open()
    except OutputInUseError:
        report.busy = True
        return
    with final:
        final.start(meta)
        done = final.done_keys()
        failures = {(f.path, f.kind): f for f in read_failures(out / FAILURES)}  # warnings: of embedded files
        for i, k, d in complete:
            final.check(_shard_meta(d))
            for part in shard_files(d, final.fmt):
                paths = final.format.read_paths(part)
                keys = [resume_key(p) for p in paths]
                keep = [j for j, key in enumerate(keys) if key not in done]
                if len(keep) == len(paths):  # the usual case: move the part as it is
                    dst = final.next_part()
                    for src, to in zip(final.format.files(part), final.format.files(dst)):
                        src.replace(to)
                elif keep:  # files embedded twice (a split changed while shards ran): keep one copy
                    final.add_part(subset(final.format.read(part), keep))
                done.update(keys)
                report.added += len(keep)
            for f in read_failures(d / FAILURES):
                failures[f.path, f.kind] = f
            shutil.rmtree(d)
            report.merged.append(f"{i}/{k}")
        left = [f for f in failures.values() if f.kind == "warning" or resume_key(f.path) not in done]
        write_failures(sorted(left, key=lambda f: (f.path, f.kind)), out / FAILURES)
        report.failed = sum(f.kind != "warning" for f in left)


def _merge_file(out: Path, shards: list[tuple[int, int, Path]], n: int | None, report: MergeReport) -> None:
    if n is None:
        return
    have = {i: d for i, k, d in shards if k == n and (d / COMPLETE).exists()}
    report.waiting = [f"{i}/{n}" for i in range(n) if i not in have]
    if report.waiting:
        return
    meta = _shard_meta(have[0])
    es, _ = join([read_embeddings(have[i]) for i in range(n)], meta["level"], meta, key=resume_key)
    kept = {resume_key(p) for p in es.paths}
    es.failures = list({f.path: f for f in es.failures if resume_key(f.path) not in kept}.values())
    get_format(meta["format"]).write(es, out)
    write_failures(es.failures + es.warnings, failures_path(out))
    for i in range(n):
        shutil.rmtree(have[i])
    report.merged = [f"{i}/{n}" for i in range(n)]
    report.added, report.failed = len(es.paths), len(es.failures)
