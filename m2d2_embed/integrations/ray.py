"""Bulk embedding extraction on Ray Data: the standard offline batch-inference pattern, one model per actor.

    from m2d2_embed.integrations.ray import embed_dataset
    embed_dataset("s3://bucket/audio/", "s3://bucket/embeddings/", model="m2d2-clap-2025", level="clip",
                  num_gpus_per_actor=1, concurrency=8)
    es = m2d2_embed.read_embeddings("embeddings/")        # a local copy, back into numpy

Or compose it yourself: ``ds.map_batches(M2D2Embedder, fn_constructor_kwargs={...}, num_gpus=1, concurrency=8)``.

Output rows follow the package's Parquet schema (see :mod:`m2d2_embed.outputs`): ``path``, ``model``, ``level``,
``dim``, ``embedding`` (clip/clap: fixed-size list of ``dim`` float32; frame: list of them, one per frame),
``timestamps`` (frame level: float64 seconds, else null), ``duration`` (float64 seconds), ``error`` (null, or why
the file could not be embedded: such rows have a null embedding). ``extra_levels`` add ``<level>_embedding``
columns (and ``<level>_timestamps`` for the per-frame levels: ``frame_timestamps``, ``frame_tags_timestamps``).
The settings are in the schema metadata under ``m2d2_embed``.

Ray itself is imported only by :func:`map_embeddings` and :func:`embed_dataset`; :class:`M2D2Embedder` is plain
Python and runs without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    import torch

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'm2d2-embed[ray]'"


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"m2d2_embed.integrations.ray needs Ray Data: {INSTALL_HINT} (or pip install 'ray[data]')"
        ) from e
    return ray


# ---------------------------------------------------------------------------------------------------
# The callable class (one per actor)
# ---------------------------------------------------------------------------------------------------


class M2D2Embedder:
    """A callable class for :meth:`ray.data.Dataset.map_batches`: loads the model once per actor, then embeds
    each batch of audio and returns one row per input, in input order.

    Input batches (numpy dicts, pyarrow tables or pandas frames) hold a ``path`` column and one of:
    ``bytes`` (encoded files, from ``ray.data.read_binary_files(..., include_paths=True)``), ``amplitude`` and
    ``sample_rate`` (decoded audio [channels, samples] or [samples], from ``ray.data.read_audio(...,
    include_paths=True)``), or nothing else (the paths are read from a file system every actor sees).
    Encoded files are decoded with soundfile (WAV, FLAC, OGG/Vorbis, Opus, MP3), downmixed, and resampled as
    :func:`m2d2_embed.load_audio` does; files over 300 s are decoded and embedded in chunk batches.

    A file that cannot be decoded or embedded becomes a row with ``error`` set and a null embedding; the task
    never fails for it. The returned :class:`pyarrow.Table` follows the schema in the module docstring.

    Args:
        model: registry name, local path or URL, as for :func:`m2d2_embed.load` (default ``m2d2-clap-2025``).
        level: the ``embedding`` column: ``"clip"`` [D], ``"frame"`` [T, D] with ``timestamps``, or ``"clap"``.
        extra_levels: more levels from the same encoder pass, as ``<level>_embedding`` columns (and
            ``frame_timestamps``), e.g. ``("clap", "frame")``.
        reduce, normalize: as for :meth:`~m2d2_embed.M2D2.embed_files` (``reduce`` does not apply to clap).
        device, dtype, cache_dir, offline, compile, backend: as for :func:`m2d2_embed.load` (``backend``:
            CPU actors only).
        model_batch_size: 10-s chunks per forward pass (the ``batch_size`` of ``embed_files``; default 256 on
            CUDA, 32 on CPU).
        decode_threads: threads that decode the files of a batch.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        level: str = "clip",
        extra_levels: Sequence[str] = (),
        reduce: str = "none",
        normalize: bool = False,
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
        compile: bool = False,
        backend: str | None = None,
        model_batch_size: int | None = None,
        decode_threads: int = 4,
    ) -> None:
        from ..files import embedding_metadata
        from ..loader import load

        levels = _check_levels(level, extra_levels)
        self.model = load(
            model, device=device, dtype=dtype, cache_dir=cache_dir, offline=offline, compile=compile, backend=backend
        )
        for lvl in levels:
            self.model.check_level(lvl, reduce)
        self.level, self.extra_levels = level, tuple(levels[1:])
        self.reduce, self.normalize, self.model_batch_size = reduce, bool(normalize), model_batch_size
        self.dims = {lvl: self.model.output_dim(lvl, reduce) for lvl in levels}
        self.metadata: dict[str, Any] = {
            **embedding_metadata(self.model, level, reduce, normalize),
            "format": "parquet",
            "model_source": str(model) if model is not None else self.model.name,
            "extra_levels": list(self.extra_levels),
        }
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(decode_threads)))
        log.info(
            "M2D2Embedder: %s on %s (%s), levels %s",
            self.model.name,
            self.model.device,
            self.model.dtype,
            ", ".join(levels),
        )

    # -- one batch ------------------------------------------------------------------------------------------
    def __call__(self, batch: Any) -> pa.Table:
        """Embed one batch (see the class docstring) -> a :class:`pyarrow.Table`, one row per input row."""
        paths, sources = _sources(batch)
        levels = (self.level, *self.extra_levels)
        results: dict[int, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        prepared = list(self._pool.map(self._prepare, sources))
        short = []
        for i, (kind, value) in enumerate(prepared):
            if kind == "error":
                errors[i] = value
            elif kind == "wave":
                short.append(i)
        self._embed_short(paths, {i: prepared[i][1] for i in short}, levels, results, errors)
        for i, (kind, _) in enumerate(prepared):
            if kind == "stream":
                self._embed_long(i, paths[i], sources[i], levels, results, errors)
        for i, reason in errors.items():
            log.warning("not embedded: %s: %s", paths[i], reason)
        return self._table(paths, results, errors)

    def _prepare(self, src: Any) -> tuple[str, Any]:
        """('wave', float32 tensor [N] at the model rate) | ('stream', None) for long files | ('error', reason)."""
        import torch

        from ..audio import check_wave, probe, read_audio, resample, to_float
        from ..files import failure_reason
        from ..model import STREAM_SECONDS

        m = self.model
        try:
            if isinstance(src, tuple):  # decoded audio [channels, samples] or [samples] at its own rate
                x, sr = to_float(np.asarray(src[0]), "amplitude"), int(src[1])
                if x.ndim == 2:
                    x = x.mean(axis=0) if x.shape[0] > 1 else x[0]
                elif x.ndim != 1:
                    raise ValueError(f"amplitude has shape {x.shape}; expected [channels, samples] or [samples]")
                if sr <= 0:
                    raise ValueError(f"sample_rate must be positive, got {sr}")
                wave = resample(np.ascontiguousarray(x, dtype=np.float32), sr, m.sample_rate)
            else:
                if probe(src).duration > STREAM_SECONDS:
                    return "stream", None
                wave = read_audio(src, m.sample_rate)
            check_wave(wave, "the audio", m.frontend.min_samples(), m.sample_rate)
        except Exception as e:  # reported in the row; the batch goes on
            return "error", failure_reason(e)
        return "wave", torch.from_numpy(np.ascontiguousarray(wave))

    def _embed_short(
        self,
        paths: list[str],
        waves: dict[int, torch.Tensor],
        levels: Sequence[str],
        results: dict[int, dict[str, Any]],
        errors: dict[int, str],
    ) -> None:
        """Files of at most 300 s: grouped by length into batches of at most ``model_batch_size`` chunks."""
        import torch

        from ..files import failure_reason, pack_batches

        m = self.model
        order = sorted(waves, key=lambda i: (-waves[i].shape[-1], i))
        chunks = [m.num_chunks(waves[i].shape[-1]) if i in waves else 0 for i in range(len(paths))]
        for group in pack_batches(order, chunks, m.max_batch(self.model_batch_size)):
            try:
                results.update(self._embed_group(paths, group, waves, levels))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # find the file at fault: each alone
                if len(group) == 1:
                    errors[group[0]] = failure_reason(e)
                    continue
                for i in group:
                    try:
                        results.update(self._embed_group(paths, [i], waves, levels))
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except Exception as e1:
                        errors[i] = failure_reason(e1)

    def _embed_group(
        self, paths: list[str], group: list[int], waves: dict[int, torch.Tensor], levels: Sequence[str]
    ) -> dict[int, dict[str, Any]]:
        from ..files import FileResult, finish
        from ..model import FRAME_LEVELS

        m = self.model
        ws = [waves[i] for i in group]
        outs = m.embed_waves(ws, levels, reduce=self.reduce, batch_size=self.model_batch_size)
        res: dict[int, dict[str, Any]] = {i: {} for i in group}
        for lvl in levels:
            out = outs[lvl]
            per = finish(out, self.normalize) if not isinstance(out, list) else [finish(o, self.normalize) for o in out]
            for j, i in enumerate(group):
                n = ws[j].shape[-1]
                ts = m.frame_timestamps(n) if lvl in FRAME_LEVELS else None
                res[i][lvl] = FileResult(paths[i], per[j], n / m.sample_rate, ts)
        return res

    def _embed_long(
        self,
        i: int,
        path: str,
        src: Any,
        levels: Sequence[str],
        results: dict[int, dict[str, Any]],
        errors: dict[int, str],
    ) -> None:
        import torch

        from ..files import embed_long_file, failure_reason

        out = {}
        try:
            for lvl in levels:  # decoded again per level: memory stays bounded whatever the length
                out[lvl] = embed_long_file(
                    self.model,
                    src,
                    lvl,
                    reduce=self.reduce,
                    normalize=self.normalize,
                    batch_size=self.model_batch_size,
                    path=path,
                )
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:
            errors[i] = failure_reason(e)
            return
        results[i] = out

    # -- output ---------------------------------------------------------------------------------------------
    def _table(self, paths: list[str], results: dict[int, dict[str, Any]], errors: dict[int, str]) -> pa.Table:
        from ..model import FRAME_LEVELS
        from ..outputs import arrow_table

        n = len(paths)
        ok = [i in results for i in range(n)]
        main = self.level
        res = [results[i][main] if ok[i] else None for i in range(n)]
        extra: dict[str, Any] = {}
        for lvl in self.extra_levels:
            emb, ts = _embedding_columns(lvl, self.dims[lvl], [results[i][lvl] if ok[i] else None for i in range(n)])
            extra[f"{lvl}_embedding"] = emb
            if ts is not None and lvl in FRAME_LEVELS:  # per-frame levels carry their times
                extra[f"{lvl}_timestamps"] = ts
        return arrow_table(
            paths,
            main,
            self.dims[main],
            [None if r is None else r.embedding for r in res],
            timestamps=[None if r is None else r.timestamps for r in res],
            durations=[None if r is None else r.duration for r in res],
            errors=[errors.get(i) if not ok[i] else None for i in range(n)],
            metadata=self.metadata,
            extra=extra,
        )


def _check_levels(level: str, extra_levels: Sequence[str]) -> list[str]:
    from ..model import LEVELS

    if isinstance(extra_levels, str):
        extra_levels = [extra_levels]
    levels = [level, *extra_levels]
    bad = [lvl for lvl in levels if lvl not in LEVELS]
    if bad:
        raise ValueError(f"unknown level(s) {bad}; use {', '.join(LEVELS)}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"level {level!r} and extra_levels {list(extra_levels)} repeat a level")
    return levels


def _embedding_columns(level: str, dim: int, res: list[Any]) -> tuple[pa.Array, pa.Array]:
    """(embedding, timestamps) columns for one level; ``None`` items (failed files) become nulls."""
    from ..outputs import embedding_columns

    return embedding_columns(
        level,
        dim,
        [None if r is None else r.embedding for r in res],
        [None if r is None else r.timestamps for r in res],
    )


# ---------------------------------------------------------------------------------------------------
# Reading a batch
# ---------------------------------------------------------------------------------------------------


def _column(batch: Any, name: str) -> list[Any] | None:
    if isinstance(batch, Mapping):
        return list(batch[name]) if name in batch else None
    names = getattr(batch, "column_names", None)  # pyarrow.Table
    if names is not None:
        return batch.column(name).to_pylist() if name in names else None
    columns = getattr(batch, "columns", None)  # pandas.DataFrame
    if columns is not None:
        return list(batch[name]) if name in columns else None
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}; pass a dict of numpy arrays, a "
        "pyarrow.Table or a pandas.DataFrame (map_batches(..., batch_format='numpy'))"
    )


def _sources(batch: Any) -> tuple[list[str], list[Any]]:
    """(paths, sources): a source is encoded bytes, an (array, sample rate) pair, or a path to read."""
    paths = _column(batch, "path")
    if paths is None:
        raise ValueError(
            "the batch has no 'path' column; read the files with include_paths=True (e.g. "
            "ray.data.read_binary_files(paths, include_paths=True)) or give a table with a 'path' column"
        )
    paths = [str(p) for p in paths]
    data = _column(batch, "bytes")
    if data is not None:
        return paths, [bytes(b) if b is not None else b"" for b in data]
    amplitude = _column(batch, "amplitude")
    if amplitude is not None:
        rates = _column(batch, "sample_rate")
        if rates is None:
            raise ValueError("the batch has an 'amplitude' column but no 'sample_rate' column")
        return paths, [(a, int(sr)) for a, sr in zip(amplitude, rates)]
    return paths, list(paths)


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


def _as_dataset(data: Any, recursive: bool, glob: str | None) -> ray.data.Dataset:
    ray = _require_ray()
    if isinstance(data, ray.data.Dataset):
        return data
    items = [os.fspath(data)] if isinstance(data, (str, os.PathLike)) else [os.fspath(p) for p in data]
    remote = [s for s in items if "://" in s]
    if remote:
        if len(remote) != len(items):
            raise ValueError("give either local paths or URIs (s3://, gs://, ...), not a mix")
        from ..audio import AUDIO_SUFFIXES

        return ray.data.read_binary_files(
            items, include_paths=True, file_extensions=[s.lstrip(".") for s in AUDIO_SUFFIXES]
        )
    from ..files import collect_files

    files = collect_files(items, recursive=recursive, glob=glob)
    return ray.data.read_binary_files([os.path.abspath(f) for f in files], include_paths=True)


def _resources(
    num_gpus_per_actor: float | None, num_cpus_per_actor: float | None, concurrency: int | tuple[int, int] | None
) -> tuple[float, float, int | tuple[int, int]]:
    ray = _require_ray()
    if not ray.is_initialized():
        ray.init()  # connects to RAY_ADDRESS if set, else starts a local cluster
    total = ray.cluster_resources()
    gpus = float(total.get("GPU", 0))
    cpus = float(total.get("CPU", 1))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if num_cpus_per_actor is None:
        num_cpus_per_actor = 1.0
    if concurrency is None:
        if num_gpus_per_actor > 0:
            concurrency = max(1, int(gpus // num_gpus_per_actor))
        else:  # leave half of the CPUs to reading and writing
            concurrency = max(1, int(cpus // 2 // num_cpus_per_actor))
    return num_gpus_per_actor, num_cpus_per_actor, concurrency


def map_embeddings(
    data: Any,
    model: str | os.PathLike | None = None,
    *,
    level: str = "clip",
    extra_levels: Sequence[str] = (),
    reduce: str = "none",
    normalize: bool = False,
    dtype: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    compile: bool = False,
    backend: str | None = None,
    batch_size: int | None = None,
    model_batch_size: int | None = None,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_actor: float | None = None,
    concurrency: int | tuple[int, int] | None = None,
    recursive: bool = False,
    glob: str | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of embedding rows (the schema of the module docstring), for your own sink.

    Args:
        data: a folder, file, quoted wildcard or list of them (collected as by ``m2d2-embed embed``, with
            ``recursive`` and ``glob``); URIs such as ``s3://bucket/audio/`` (all audio files below them); or
            a :class:`ray.data.Dataset` with ``path`` and ``bytes`` (or ``amplitude`` + ``sample_rate``) columns.
        model, level, extra_levels, reduce, normalize, dtype, cache_dir, offline, compile, backend,
            model_batch_size: see :class:`M2D2Embedder`.
        batch_size: files per ``map_batches`` batch (default 256 with GPUs, 32 on CPUs).
        num_gpus_per_actor: GPUs per model replica (default 1 when the cluster has GPUs, else 0: CPU actors;
            fractions put several replicas on one GPU).
        num_cpus_per_actor: CPUs per replica (default 1; CPU actors use them as torch threads).
        concurrency: model replicas (an int, or (min, max) to autoscale); default one per GPU, or half the CPUs.
    """
    _check_levels(level, extra_levels)  # fail here, not in every actor
    ds = _as_dataset(data, recursive, glob)
    gpus, cpus, conc = _resources(num_gpus_per_actor, num_cpus_per_actor, concurrency)
    device = "cuda" if gpus > 0 else "cpu"
    kwargs = {
        "model": os.fspath(model) if model is not None else None,
        "level": level,
        "extra_levels": tuple(extra_levels),
        "reduce": reduce,
        "normalize": normalize,
        "device": device,
        "dtype": dtype,
        "cache_dir": os.fspath(cache_dir) if cache_dir is not None else None,
        "offline": offline,
        "compile": compile,
        "backend": backend,
        "model_batch_size": model_batch_size,
    }
    return ds.map_batches(
        M2D2Embedder,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size or (256 if gpus else 32),
        batch_format="numpy",
        num_gpus=gpus,
        num_cpus=cpus,
        concurrency=conc,
    )


def embed_dataset(
    data: Any,
    output_uri: str | os.PathLike,
    model: str | os.PathLike | None = None,
    *,
    level: str = "clip",
    num_gpus_per_actor: float | None = None,
    concurrency: int | tuple[int, int] | None = None,
    batch_size: int | None = None,
    mode: str = "error",
    min_rows_per_file: int | None = None,
    **kwargs: Any,
) -> str:
    """Embed audio on Ray Data and write Parquet files to ``output_uri`` (a folder or s3://, gs://, ... URI).

    Read the result back with :func:`m2d2_embed.read_embeddings` (a local folder) or any Parquet reader.
    Files that fail become rows with ``error`` set (listed in ``EmbeddingSet.failures`` when read back).

    Args:
        data, model, level, num_gpus_per_actor, concurrency, batch_size: see :func:`map_embeddings`; other
            keyword arguments (``extra_levels``, ``dtype``, ``model_batch_size``, ``recursive``, ``glob``, ...)
            are passed on to it.
        mode: what to do when ``output_uri`` exists: ``"error"`` (default), ``"overwrite"`` or ``"append"``.
        min_rows_per_file: rows per Parquet file at least (default: one file per block).
    Returns:
        ``output_uri`` as a string.
    """
    ray = _require_ray()
    ds = map_embeddings(
        data,
        model,
        level=level,
        num_gpus_per_actor=num_gpus_per_actor,
        concurrency=concurrency,
        batch_size=batch_size,
        **kwargs,
    )
    uri = os.fspath(output_uri)
    ds.write_parquet(uri, mode=ray.data.SaveMode(mode), min_rows_per_file=min_rows_per_file)
    return uri


__all__ = ["M2D2Embedder", "embed_dataset", "map_embeddings"]
