"""Files in, embeddings out: collect audio files, decode them in DataLoader workers, batch them by length,
embed them, and stream very long files through the model in chunk batches.

    es = model.embed_files("recordings/", level="clip", recursive=True)
    es.paths, es.embeddings            # [N] paths, [N, 3840] float32
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .audio import AUDIO_SUFFIXES, RESAMPLER_QUALITY, _check_finite_nonempty, _check_length, load_audio, resample
from .model import FULL_ATTENTION_MAX_SECONDS
from .outputs import LEVELS, EmbeddingSet, FileFailure

if TYPE_CHECKING:
    from .model import M2D2

log = logging.getLogger(__name__)

STREAM_SECONDS = FULL_ATTENTION_MAX_SECONDS  # files longer than this are streamed through in chunk batches
READ_BLOCK_FRAMES = 1 << 18  # frames per soundfile read when streaming (about 5.5 s at 48 kHz)
PathInput = str | os.PathLike | Sequence[str | os.PathLike]


class NoAudioFilesError(ValueError):
    """The inputs name no audio file (an empty folder, a glob with no match)."""


class AudioFileError(ValueError):
    """A file could not be embedded (raised by ``embed_files(strict=True)``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class FileResult:
    """One embedded file: ``embedding`` [D] (clip, clap) or [T, D] (frame); ``timestamps`` [T] s (frame)."""

    path: str
    embedding: np.ndarray
    duration: float  # seconds
    timestamps: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------------
# Collecting files
# ---------------------------------------------------------------------------------------------------

def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


def _match(rel: str, pattern: str | None) -> bool:
    if pattern is None:
        return rel.lower().endswith(AUDIO_SUFFIXES)
    name = rel.rsplit("/", 1)[-1]
    return fnmatch.fnmatch(rel if "/" in pattern else name, pattern)


def collect_files(inputs: PathInput, *, recursive: bool = False, glob: str | None = None,
                  skipped: list[str] | None = None) -> list[str]:
    """Expand files, folders and quoted wildcards into a list of audio files, in order, without duplicates.

    Args:
        inputs: file path(s), folder(s), or wildcard patterns such as ``"data/*.wav"``.
        recursive: also search the sub-folders of folders.
        glob: pattern for the files taken from folders (``"*.wav"``; with a ``/`` it is matched against the
            path relative to the folder). Default: the audio suffixes (.wav, .flac, .ogg, .opus, .mp3, ...).
            Files named explicitly are always taken. Hidden files (``.name``) are skipped in folders.
        skipped: when a list is given and ``glob`` is not, the files of folders left out for their suffix (not
            an audio format) are appended to it.
    Raises:
        FileNotFoundError: an input does not exist. NoAudioFilesError: nothing to embed, saying why.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise NoAudioFilesError("no input paths given")
    out: list[str] = []
    seen: set[str] = set()
    empty_reasons: list[str] = []

    def add(p: str, key: str | None = None) -> None:
        key = key or os.path.realpath(p)
        if key in seen:
            log.warning("skipping duplicate input %s", p)
            return
        seen.add(key)
        out.append(p)

    for item in items:
        s = os.fspath(item)
        if os.path.isdir(s):
            found = _scan_dir(s, recursive, glob, skipped if glob is None else None)
            if not found:
                empty_reasons.append(_why_empty(s, recursive, glob))
            real = os.path.realpath(s)
            for full, rel, link in found:  # the real path of a plain file in a walked folder needs no syscall
                add(full, None if link else os.path.join(real, rel))
        elif os.path.exists(s):
            add(s)
        elif _has_magic(s):
            matches = sorted(m for m in globlib.glob(s, recursive=recursive) if os.path.isfile(m))
            if not matches:
                empty_reasons.append(f"no files match {s!r}")
            for m in matches:
                add(m)
        else:
            raise FileNotFoundError(f"no such file or folder: {s}")
    if not out:
        raise NoAudioFilesError("; ".join(empty_reasons) or "no audio files found")
    return out


def _scan_dir(d: str, recursive: bool, pattern: str | None,
              skipped: list[str] | None = None) -> list[tuple[str, str, bool]]:
    """Files of folder ``d`` (and, with ``recursive``, of its sub-folders, not following links to folders) that
    match: ``(path, path relative to d, is a symbolic link)``, sorted by relative path. One ``scandir`` per
    folder: no ``stat`` per file except for links (a 100,000-file folder lists in about a second less)."""
    found: list[tuple[str, str, bool]] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            log.warning("cannot list %s: %s", folder, e.strerror or e)
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = prefix + e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    if recursive:
                        walk(e.path, rel + os.sep)
                    continue
                link = e.is_symlink()
                if _match(rel.replace(os.sep, "/"), pattern) and e.is_file():
                    found.append((e.path, rel, link))
                elif skipped is not None and e.is_file():
                    skipped.append(e.path)
            except OSError:  # vanished or unreadable entry: not a file we can embed
                continue

    walk(d, "")
    return sorted(found, key=lambda f: f[1])


def _why_empty(d: str, recursive: bool, pattern: str | None) -> str:
    entries = [e for e in os.listdir(d) if not e.startswith(".")]
    if not entries:
        return f"folder {d} is empty"
    where = f"{d}" + (" (searched recursively)" if recursive else "")
    if pattern is not None:
        return f"no files match --glob {pattern!r} in {where}"
    hint = "" if recursive or not any(os.path.isdir(os.path.join(d, e)) for e in entries) else \
        "; it has sub-folders: add --recursive (recursive=True)"
    return (f"no audio files ({', '.join(AUDIO_SUFFIXES[:5])}, ...) in {where}{hint}; "
            "use --glob (glob=) to pick other names")


# ---------------------------------------------------------------------------------------------------
# Probing and decoding
# ---------------------------------------------------------------------------------------------------

def _probe(path: str) -> tuple[float, str | None]:
    """(duration in seconds, None) or (0, reason). Reads only the header: WAV headers are parsed directly (a few
    microseconds), anything else (or any WAV header this parser does not follow) goes through ``sf.info``."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return 0.0, f"cannot read: {e.strerror or e}"
    if size == 0:
        return 0.0, "empty file (0 bytes)"
    if path.lower().endswith((".wav", ".wave")):
        found = _wav_frames(path, size)
        if found is not None:
            frames, rate = found
            return (frames / rate, None) if frames > 0 else (0.0, "no samples (zero-length audio)")
    return _probe_soundfile(path)


def _probe_soundfile(path: str) -> tuple[float, str | None]:
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as e:  # LibsndfileError, RuntimeError, OSError
        return 0.0, (f"cannot decode: {str(e).rstrip('.')}. Readable formats: WAV, FLAC, OGG/Vorbis, Opus, MP3 "
                     "(and other libsndfile formats); convert others first, e.g. `ffmpeg -i IN OUT.flac`")
    if info.frames <= 0:
        return 0.0, "no samples (zero-length audio)"
    return info.frames / info.samplerate, None


def _wav_frames(path: str, size: int) -> tuple[int, int] | None:
    """(frames, sample rate) from a plain RIFF/WAVE header, or None when the header is anything else (RF64, a
    streamed header with no data size, an odd chunk layout): the caller then asks libsndfile. The frame count is
    cut to the bytes actually in the file, as libsndfile does for a truncated file. One read covers the usual
    header; chunks beyond it are read where they are."""
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        head = os.read(fd, 1024)

        def read_at(pos: int, n: int) -> bytes:
            return head[pos:pos + n] if pos + n <= len(head) else os.pread(fd, n, pos)

        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos, rate, align = 12, 0, 0
        for _ in range(64):  # chunks before 'data' (fmt, LIST, fact, ...): a handful in practice
            hdr = read_at(pos, 8)
            if len(hdr) < 8:
                return None
            cid, n = hdr[:4], struct.unpack("<I", hdr[4:])[0]
            if cid == b"fmt ":
                fmt = read_at(pos + 8, 14)
                if len(fmt) < 14:
                    return None
                _tag, channels, rate, _bps, align = struct.unpack("<HHIIH", fmt)
                if channels == 0 or rate == 0 or align == 0:
                    return None
            elif cid == b"data":
                if not align or n in (0, 0xFFFFFFFF):
                    return None
                return min(n, size - pos - 8) // align, rate
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
            if pos >= size:
                return None
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)
    return None


PCM16_SCALE = 2.0 ** -15  # 16-bit PCM sample -> float, as libsndfile reads it (exact: a power of two)


PROBE_PROCESSES_FROM = 8192  # WAV headers of this many files or more are read by a pool of forked processes


def _probe_many(paths: Sequence[str]) -> list[tuple[float, str | None]]:
    return [_probe(p) for p in paths]


def _probe_all(paths: Sequence[str]) -> list[tuple[float, str | None]]:
    """``_probe`` of every path, in order. WAV headers are read in this thread (about 12 us each; threads only
    contend for the GIL), split over forked processes when there are many (where ``fork`` exists); the other
    files' ``sf.info`` runs in a thread pool (libsndfile releases the GIL while it reads)."""
    probes: list[tuple[float, str | None] | None] = [None] * len(paths)
    wav, rest = [], []
    for i, p in enumerate(paths):
        (wav if p.lower().endswith((".wav", ".wave")) else rest).append(i)
    procs = min(8, _cpu_count() - 1)
    if len(wav) >= PROBE_PROCESSES_FROM and procs > 1 and "fork" in multiprocessing.get_all_start_methods():
        size = -(-len(wav) // (4 * procs))
        parts = [[paths[i] for i in wav[k:k + size]] for k in range(0, len(wav), size)]
        try:
            with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
                done = [r for part in pool.map(_probe_many, parts) for r in part]
            for i, r in zip(wav, done):
                probes[i] = r
            wav = []
        except Exception as e:  # a pool that cannot start (limits, sandbox): read them here instead
            log.debug("probing in processes failed (%s); probing in this process", e)
    for i in wav:
        probes[i] = _probe(paths[i])
    if rest:
        with ThreadPoolExecutor(max_workers=min(8, len(rest))) as pool:
            for i, r in zip(rest, pool.map(_probe, [paths[i] for i in rest])):
                probes[i] = r
    return probes  # type: ignore[return-value]


def _cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, so container CPU sets count), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _AudioBatches(Dataset):
    """Decodes batch ``k`` of files (in a DataLoader worker) into waveforms at ``sample_rate``, stacked by length.

    Item ``k`` is ``(groups, failures)``: ``groups`` holds one ``(file indices, tensor [n, N])`` per distinct length
    N in the batch (batches are sorted by length, so usually one or two), ``failures`` one ``(file index, reason)``
    per file that could not be decoded. A group is int16 when its files are mono 16-bit PCM at ``sample_rate``
    (the raw samples, scaled by 2^-15 on the model's device: half the bytes to move), float32 otherwise. In a
    worker each group is written straight into one shared-memory segment, so handing it to the main process
    copies nothing; on CUDA the pin-memory thread makes one pinned copy per group (not per file), which goes to
    the GPU without blocking.
    """

    def __init__(self, paths: Sequence[str], batches: Sequence[Sequence[int]], sample_rate: int,
                 min_samples: int) -> None:
        self.paths = list(paths)
        self.batches = [list(b) for b in batches]
        self.sample_rate = sample_rate
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[list[tuple[list[int], torch.Tensor]], list[tuple[int, str]]]:
        by_kind: dict[tuple[int, str], list[tuple[int, np.ndarray]]] = {}
        failures: list[tuple[int, str]] = []
        for i in self.batches[k]:
            wave, err = self._decode(i)
            if err is not None:
                failures.append((i, err))
            else:
                by_kind.setdefault((wave.shape[-1], wave.dtype.str), []).append((i, wave))  # type: ignore[union-attr]
        groups = [([i for i, _ in items], _stack([w for _, w in items])) for items in by_kind.values()]
        return groups, failures

    def _decode(self, i: int) -> tuple[np.ndarray | None, str | None]:
        try:
            wave = _read_wave(self.paths[i], self.sample_rate)
            if wave.dtype != np.int16:  # 16-bit samples are finite
                _check_finite_nonempty(wave, "the audio", self.min_samples)
            _check_length(wave.shape[-1], "the audio", self.min_samples, self.sample_rate)
        except Exception as e:  # reported per file; the others go on
            return None, _reason(e)
        return wave, None


class _NotFast(Exception):
    """Not for the 16-bit fast path of :func:`_read_wave`."""


def _read_wave(path: str, sample_rate: int) -> np.ndarray:
    """The samples of ``load_audio(path, sample_rate)``, read faster for 16-bit PCM (WAV, FLAC, ...): int16 [N]
    (times ``PCM16_SCALE`` gives load_audio's float32 values bit for bit) for a mono file at ``sample_rate``,
    else float32 [N]. libsndfile's int-to-float conversion is about 3x slower than reading int16, and scaling on
    the GPU halves the bytes to move. Anything not 16-bit PCM, and every error, goes through ``load_audio``, so
    failures read exactly as before."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            if f.subtype != "PCM_16" or f.frames <= 0:
                raise _NotFast
            sr = f.samplerate
            data = f.read(dtype="int16", always_2d=True)  # (N, C)
        if data.shape[0] == 0:
            raise _NotFast
    except Exception:  # not 16-bit PCM, or unreadable: load_audio decides (and words the error)
        return load_audio(path, sample_rate=sample_rate)
    if data.shape[1] == 1:
        if sr == sample_rate:
            return np.ascontiguousarray(data[:, 0])
        x = np.multiply(data[:, 0], np.float32(PCM16_SCALE), dtype=np.float32)
    else:
        x = np.multiply(data, np.float32(PCM16_SCALE), dtype=np.float32).mean(axis=1)  # as load_audio averages
    x = np.ascontiguousarray(x, dtype=np.float32)
    return resample(x, sr, sample_rate) if sr != sample_rate else x


def _stack(waves: list[np.ndarray]) -> torch.Tensor:
    """Equal-length waveforms of one dtype -> one tensor [n, N]; in a DataLoader worker, in shared memory (as
    ``default_collate`` does), so sending it to the main process does not copy it again."""
    n, length = len(waves), waves[0].shape[-1]
    dtype = torch.from_numpy(waves[0][:0]).dtype
    if get_worker_info() is not None:
        elem = torch.empty(0, dtype=dtype)
        try:
            out = elem.new(elem._typed_storage()._new_shared(n * length, device=elem.device)).resize_(n, length)
        except (AttributeError, RuntimeError):  # private API: fall back to a plain tensor (shared when sent)
            out = torch.empty(n, length, dtype=dtype)
    else:
        out = torch.empty(n, length, dtype=dtype)
    np.stack(waves, out=out.numpy())
    return out


def _as_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A group from the workers as float32 samples: int16 groups go to ``device`` as they are (from pinned memory
    without blocking) and are scaled there; float32 groups are left to ``_encode_stacked``."""
    if x.dtype == torch.int16:
        return x.to(device, non_blocking=True).float().mul_(PCM16_SCALE)
    return x


def _reason(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    return msg if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {msg}"


def _identity(item: Any) -> Any:
    return item


def _batches(order: Sequence[int], chunks: Sequence[int], budget: int) -> list[list[int]]:
    """Group file indices (already sorted by length) so each group holds at most ``budget`` chunks."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        if cur and total + chunks[i] > budget:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += chunks[i]
    if cur:
        out.append(cur)
    return out


def default_num_workers() -> int:
    """Decoding workers used by default: up to 8, leaving two cores (one on 4 or fewer) to the main process and
    its pin-memory thread. On one H100 with 16 cores, 8 workers decode about 7,000 ten-second 16-bit WAVs per
    second, about what the model embeds; 12 were slower (the main process's share of the work sets the pace)."""
    cpus = _cpu_count()
    return max(0, min(8, cpus - (2 if cpus > 4 else 1)))


# ---------------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------------

def output_dim(model: M2D2, level: str, reduce: str = "none") -> int:
    """Width of one embedding at ``level``: 3840 (clip/frame), 768 (``reduce='mean'``), the CLAP size (clap)."""
    if level == "clap":
        head = model.config.audio_head
        return head.out_dim if head is not None else model.embed_dim
    return model.embed_dim if reduce == "mean" else model.frame_dim


def weights_fingerprint(model: M2D2) -> str:
    """A short hash of the encoder's norm and bias parameters: tells checkpoints apart cheaply."""
    h = hashlib.sha256()
    for name, p in sorted(model.encoder.named_parameters()):
        if p.ndim <= 1 or name.startswith("patch_embed"):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def embedding_metadata(model: M2D2, level: str, reduce: str = "none", normalize: bool = False) -> dict[str, Any]:
    """What an output file records about how its embeddings were made (also the resume key of the CLI)."""
    from . import __version__

    return {"model": model.name, "weights_fingerprint": weights_fingerprint(model), "level": level,
            "reduce": reduce if level != "clap" else "none", "normalize": bool(normalize),
            "dim": output_dim(model, level, reduce), "sample_rate": model.sample_rate,
            "compute_dtype": str(model.dtype).replace("torch.", ""),
            "frame_hop_seconds": model.frame_hop_seconds, "timestamps_unit": "seconds (centre of each frame)",
            "m2d2_embed_version": __version__}


def _check_args(model: M2D2, level: str, reduce: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if reduce not in ("none", "mean"):
        raise ValueError(f"reduce must be 'none' or 'mean', got {reduce!r}")
    if level == "clap":
        model._require_head()


def iter_file_embeddings(model: M2D2, paths: Sequence[str], level: str = "clip", *, reduce: str = "none",
                         normalize: bool = False, batch_size: int | None = None, num_workers: int | None = None,
                         progress: bool = True, strict: bool = False) -> Iterator[tuple[int, FileResult | FileFailure]]:
    """Embed files and yield ``(index into paths, FileResult or FileFailure)`` as each file completes.

    Completion order is not input order: files are batched by length. See :func:`embed_files` for the
    arguments; this is the streaming form the CLI writes shards from.
    """
    from tqdm import tqdm  # plain text bar: works in terminals and notebooks without ipywidgets

    _check_args(model, level, reduce)
    paths = [os.fspath(p) for p in paths]
    budget = model._max_batch(batch_size)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {workers}")
    chunk_s = model.config.encoder.chunk_frames * model.config.frontend.hop_length / model.sample_rate
    probes = _probe_all(paths)
    bar = tqdm(total=len(paths), unit="file", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    audio_s = 0.0
    t0 = time.perf_counter()

    def done(n_files: int, seconds: float) -> None:
        nonlocal audio_s
        audio_s += seconds
        bar.update(n_files)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(audio=f"{audio_s:.0f}s", rtf=f"{audio_s / elapsed:.1f}x", refresh=False)

    def fail(i: int, reason: str) -> FileFailure:
        if strict:
            bar.close()
            raise AudioFileError(paths[i], reason)
        log.warning("skipping %s: %s", paths[i], reason)
        return FileFailure(paths[i], reason)

    short, long_, chunks = [], [], [0] * len(paths)
    for i, (dur, err) in enumerate(probes):
        if err is not None:
            yield i, fail(i, err)
            done(1, 0.0)
        elif dur > STREAM_SECONDS:
            long_.append(i)
        else:
            short.append(i)
            chunks[i] = max(1, math.ceil(dur / chunk_s))
    short.sort(key=lambda i: (-probes[i][0], i))  # longest first: an out-of-memory error shows at once
    batches = _batches(short, chunks, budget)
    try:
        if batches:
            # Two-stage pipeline: batch k+1's GPU work (copy in, model, pooling, copy out into pinned memory) is
            # queued before the results of batch k are awaited and built, so the GPU is never left without work
            # while Python packs results or waits for decoding; at most two batches are in flight. On CPU the
            # same steps run one after the other.
            ds = _AudioBatches(paths, batches, model.sample_rate, model.frontend.min_samples())
            workers = min(workers, len(batches) - 1)  # one batch: nothing to overlap, skip the worker start-up
            loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
                                pin_memory=model.device.type == "cuda", prefetch_factor=2 if workers else None)
            pending: _InFlight | None = None
            batches_in = iter(loader)  # the workers start decoding the first batches now
            if model.device.type == "cuda" and workers:
                _warm_up(model, len(batches[0]), max(probes[i][0] for i in batches[0]), batch_size)
            for groups, failures in batches_in:
                launched = None
                if groups and not (strict and failures):  # strict: the batch is not embedded, its failure raises
                    launched = _launch(model, groups, level, reduce, normalize, batch_size)
                if pending is not None:
                    yield from _collect_batch(model, paths, pending, level)
                    done(len(pending.idx), pending.audio_seconds)
                pending = launched
                for i, err in failures:
                    yield i, fail(i, err)
                    done(1, 0.0)
            if pending is not None:
                yield from _collect_batch(model, paths, pending, level)
                done(len(pending.idx), pending.audio_seconds)
        for i in long_:
            try:
                res = _embed_streamed(model, paths[i], level, reduce, normalize, batch_size)
            except (ValueError, OSError, RuntimeError) as e:
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                yield i, fail(i, _reason(e))
                done(1, 0.0)
                continue
            yield i, res
            done(1, res.duration)
    finally:
        bar.close()


def embed_files(model: M2D2, paths_or_dir: PathInput, level: str = "clip", *, batch_size: int | None = None,
                num_workers: int | None = None, progress: bool = True, strict: bool = False,
                recursive: bool = False, glob: str | None = None, reduce: str = "none",
                normalize: bool = False) -> EmbeddingSet:
    """Embed audio files or folders; decoding runs in DataLoader workers while the model works.

    Args:
        model: a loaded :class:`~m2d2_embed.M2D2`.
        paths_or_dir: file(s), folder(s) or quoted wildcards (see :func:`collect_files`).
        level: ``"clip"`` (mean over time, [D]), ``"frame"`` (one per 160 ms step, [T, D]) or ``"clap"``
            (the audio side of the shared audio-text space, [768]).
        batch_size: most 10-s chunks per batch (a clip of up to 10 s is one chunk); default 32 on CPU,
            256 on CUDA. Files are sorted by length and grouped to fill batches with little padding.
        num_workers: decoding processes (default: up to 8, two cores left free; 0 decodes inline).
        progress: show a progress bar (files/s) on stderr.
        strict: raise :class:`AudioFileError` at the first file that fails instead of skipping it.
        recursive, glob: how folders are searched (see :func:`collect_files`).
        reduce: ``"none"`` (5 frequency patches stacked, 3840) or ``"mean"`` (768) for clip and frame levels.
        normalize: L2-normalise each embedding vector (each frame at frame level).
    Returns:
        an :class:`~m2d2_embed.outputs.EmbeddingSet` in input order: ``paths``, ``embeddings`` ([N, D] float32,
        a list of [T_i, D] at frame level), ``timestamps`` (frame level, seconds), ``durations`` (s),
        ``failures`` (path and reason of each file that was skipped) and ``metadata``.

    Files longer than 300 s are decoded and embedded in chunk batches as they stream in, so memory stays
    bounded whatever their length (at frame level the output itself grows with the length).
    """
    files = collect_files(paths_or_dir, recursive=recursive, glob=glob)
    results: dict[int, FileResult] = {}
    failures: dict[int, FileFailure] = {}
    for i, r in iter_file_embeddings(model, files, level, reduce=reduce, normalize=normalize,
                                     batch_size=batch_size, num_workers=num_workers, progress=progress,
                                     strict=strict):
        (results if isinstance(r, FileResult) else failures)[i] = r  # type: ignore[index]
    ok = sorted(results)
    return results_to_set([results[i] for i in ok], [failures[i] for i in sorted(failures)],
                          embedding_metadata(model, level, reduce, normalize), level)


def results_to_set(results: Sequence[FileResult], failures: Sequence[FileFailure], metadata: dict[str, Any],
                   level: str) -> EmbeddingSet:
    """Pack per-file results into an :class:`EmbeddingSet` (see :meth:`EmbeddingSet.from_results`)."""
    return EmbeddingSet.from_results(results, failures, metadata, level)


def _finish(x: torch.Tensor, normalize: bool) -> np.ndarray:
    if normalize:
        x = nn.functional.normalize(x.float(), dim=-1)
    return x.detach().float().cpu().numpy()


@torch.inference_mode()
def _warm_up(model: M2D2, n: int, seconds: float, batch_size: int | None) -> None:
    """Run the model once on silence shaped like the first batch while the workers decode it: the one-off CUDA
    costs of a fresh process (library handles, kernel loading, attention and FFT plans, compilation with
    ``compile=True``) then overlap the decoding instead of delaying the first batch. Queued, not awaited."""
    samples = max(model.frontend.min_samples(), round(seconds * model.sample_rate))
    model._encode_stacked([torch.zeros(n, samples, device=model.device)], batch_size)


@dataclass
class _InFlight:
    """A batch whose work is queued: its embeddings arrive in ``host`` (rows of all files, [R, D] float32; pinned
    and filled asynchronously on CUDA, once ``event`` has completed)."""

    idx: list[int]  # file indices, in the order of the rows
    shapes: list[tuple[int, ...]]  # embedding shape of each file
    lengths: list[int]  # samples of each file at the model's rate
    host: torch.Tensor
    event: torch.cuda.Event | None
    sample_rate: int

    @property
    def audio_seconds(self) -> float:
        return sum(self.lengths) / self.sample_rate


@torch.inference_mode()
def _launch(model: M2D2, groups: Sequence[tuple[list[int], torch.Tensor]], level: str, reduce: str,
            normalize: bool, batch_size: int | None) -> _InFlight:
    """Queue the work of one batch of equal-length groups (file indices, waveforms [n, N]): encoder, pooling at
    ``level`` and normalisation on the model's device, then one copy of all embeddings to the host. On CUDA
    nothing here waits for the GPU: the copy goes into pinned memory without blocking and an event marks its end."""
    toks = model._encode_stacked([_as_float(x, model.device) for _, x in groups], batch_size)  # [b, f, T, D] each
    head = model._require_head() if level == "clap" else None
    embs, idx, lengths = [], [], []
    for (g_idx, x), tok in zip(groups, toks):
        n = x.shape[-1]
        if level == "clap":
            e = model._clap_group(head, tok, n, "auto", batch_size)  # [b, D]
        elif level == "frame":
            e = model._pool_frames(tok, reduce)  # [b, T, D]
        else:
            e = model._pool_frames(tok, reduce).mean(-2)  # [b, D]
        embs.append(e)
        idx += g_idx
        lengths += [n] * len(g_idx)
    shapes = [tuple(e.shape[1:]) for e in embs for _ in range(e.shape[0])]
    flat = torch.cat([e.reshape(-1, e.shape[-1]) for e in embs]) if len(embs) > 1 else \
        embs[0].reshape(-1, embs[0].shape[-1])
    flat = nn.functional.normalize(flat.float(), dim=-1) if normalize else flat.float()
    event = None
    if flat.is_cuda:
        host = torch.empty(flat.shape, dtype=torch.float32, pin_memory=True)
        stream = torch.cuda.current_stream(flat.device)
        with torch.cuda.stream(stream):
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
    else:
        host = flat.cpu()
    return _InFlight(idx, shapes, lengths, host, event, model.sample_rate)


def _collect_batch(model: M2D2, paths: Sequence[str], batch: _InFlight,
                   level: str) -> Iterator[tuple[int, FileResult]]:
    """Wait for a launched batch and split its embeddings into per-file results."""
    if batch.event is not None:
        batch.event.synchronize()
        flat = batch.host.numpy().copy()  # out of pinned memory: the buffer goes back to the allocator's cache
    else:
        flat = batch.host.numpy()
    timestamps: dict[int, np.ndarray] = {}
    row = 0
    for i, shape, n in zip(batch.idx, batch.shapes, batch.lengths):
        rows = math.prod(shape[:-1])
        ts = None
        if level == "frame":
            if n not in timestamps:
                timestamps[n] = model.frame_timestamps(n)
            ts = timestamps[n].copy()
        yield i, FileResult(paths[i], flat[row:row + rows].reshape(shape), n / model.sample_rate, ts)
        row += rows


def _results_from_tokens(model: M2D2, paths: list[str], toks: list[torch.Tensor], lengths: list[int], level: str,
                         reduce: str, normalize: bool, batch_size: int | None) -> list[FileResult]:
    """Encoder tokens of a batch of clips (``lengths`` in samples) -> results at ``level``; several levels can
    be taken from one encoder pass."""
    if level == "clap":
        embs = list(model._clap_from_tokens(model._require_head(), toks, lengths, "auto", batch_size))
    elif level == "frame":
        embs = [model._pool_frames(t, reduce) for t in toks]
    else:
        embs = [model._pool_frames(t, reduce).mean(0) for t in toks]
    if not embs:
        return []
    # one device-to-host copy for the whole batch, then split per file
    rows = [e.reshape(-1, e.shape[-1]).shape[0] for e in embs]
    flat = _finish(torch.cat([e.reshape(-1, e.shape[-1]) for e in embs]), normalize)
    parts = np.split(flat, np.cumsum(rows)[:-1])
    out = []
    for p, e, part, n in zip(paths, embs, parts, lengths):
        ts = model.frame_timestamps(n) if level == "frame" else None
        out.append(FileResult(p, part.reshape(tuple(e.shape)), n / model.sample_rate, ts))
    return out


# ---------------------------------------------------------------------------------------------------
# Long files: decode and embed in chunk batches
# ---------------------------------------------------------------------------------------------------

def _stream_wave(path: str, target_sr: int) -> Iterator[np.ndarray]:
    """Mono float32 blocks of a file at ``target_sr`` (the same samples as ``load_audio``, block by block)."""
    import soundfile as sf

    with sf.SoundFile(path) as f:
        sr = f.samplerate
        rs = None
        if sr != target_sr:
            import soxr

            rs = soxr.ResampleStream(sr, target_sr, 1, dtype="float32", quality=RESAMPLER_QUALITY)
        while True:
            data = f.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)  # (n, C)
            last = data.shape[0] < READ_BLOCK_FRAMES
            x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not np.isfinite(x).all():
                raise ValueError("the audio contains NaN or Inf samples")
            if rs is not None:
                x = rs.resample_chunk(x, last=last)
            if len(x):
                yield x
            if last:
                return


class _ChunkAccumulator:
    """Runs log-mel chunks through the encoder and keeps only what the level needs."""

    def __init__(self, model: M2D2, level: str, reduce: str, batch_size: int | None) -> None:
        self.model, self.level, self.reduce, self.batch_size = model, level, reduce, batch_size
        self.frames: list[torch.Tensor] = []
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, lms: torch.Tensor, chunks: Sequence[tuple[int, int]]) -> None:
        """``lms`` [1, n_mels, F]; ``chunks``: (first frame in ``lms``, time patches) of each chunk."""
        m = self.model
        pw = m.config.encoder.patch_size[1]
        f = m.freq_patches
        by_t: dict[int, list[int]] = {}
        for start, t in chunks:
            by_t.setdefault(t, []).append(start)
        toks = []
        for t, starts in by_t.items():
            xs = []
            for s in starts:
                x = lms[..., s:s + t * pw]
                if x.shape[-1] < t * pw:  # zero-pad the last chunk to whole patches, as the model does
                    x = nn.functional.pad(x, (0, t * pw - x.shape[-1]))
                xs.append(x)
            out = m._run_encoder(torch.stack(xs), m._max_batch(self.batch_size))  # (n, f*t, D)
            toks += [(s, o.reshape(f, t, -1)) for s, o in zip(starts, out)]
        toks.sort(key=lambda st: st[0])
        if self.level == "clap":
            head = m._require_head()
            embs = m._run_head(head, [tok.reshape(-1, tok.shape[-1]) for _, tok in toks], self.batch_size)
            self._sum(embs.sum(0), len(toks))
            return
        for _, tok in toks:
            fr = m._pool_frames(tok, self.reduce)  # (t, D)
            if self.level == "frame":
                self.frames.append(fr.float().cpu())
            else:
                self._sum(fr.double().sum(0), fr.shape[0])

    def _sum(self, x: torch.Tensor, n: int) -> None:
        x = x.double()
        self.total = x if self.total is None else self.total + x
        self.count += n

    def result(self) -> torch.Tensor:
        if self.level == "frame":
            return torch.cat(self.frames)
        return (self.total / self.count).float()  # type: ignore[operator]


@torch.inference_mode()
def _embed_streamed(model: M2D2, path: str, level: str, reduce: str, normalize: bool,
                    batch_size: int | None) -> FileResult:
    """Embed a long file while it is decoded: log-mel and encoder run on steps of whole chunks.

    Each step's log-mel is computed on its samples plus ``margin`` samples of context on each side, so every
    frame sees the same samples as in a whole-file log-mel; the last step uses the file's true end.
    """
    fe, enc = model.config.frontend, model.config.encoder
    hop, U = fe.hop_length, enc.chunk_frames
    margin = hop * math.ceil((fe.n_fft // 2) / hop)  # context samples, a whole number of hops
    step = model._max_batch(batch_size)  # chunks per step: one encoder batch
    t_full = model._chunk_plan(U)[0][1]  # time patches of a full chunk
    acc = _ChunkAccumulator(model, level, reduce, batch_size)
    buf = np.zeros(0, dtype=np.float32)
    buf_start = 0  # absolute sample index of buf[0]
    next_chunk = 0  # first chunk not yet embedded
    total = 0

    def log_mel(a: int, b: int | None) -> torch.Tensor:
        seg = buf[a - buf_start:None if b is None else b - buf_start]
        x = torch.from_numpy(np.ascontiguousarray(seg)).to(model.device)[None]
        return model.frontend(x)[0]  # (1, n_mels, F)

    for block in _stream_wave(path, model.sample_rate):
        buf = np.concatenate([buf, block]) if len(buf) else block
        total += len(block)
        while True:
            s = next_chunk * U * hop  # centre of the first frame of this step
            end = s + step * U * hop + margin
            if buf_start + len(buf) < end:
                break
            a = max(0, s - margin)
            lms = log_mel(a, end)[..., (s - a) // hop:]
            acc.add(lms, [(c * U, t_full) for c in range(step)])
            next_chunk += step
            keep_from = next_chunk * U * hop - margin
            buf = buf[keep_from - buf_start:].copy()
            buf_start = keep_from
    min_samples = model.frontend.min_samples()
    if total < min_samples:
        raise ValueError(f"the audio is too short: {total} samples, the model needs at least {min_samples}")
    plan = model._chunk_plan(model.frontend.num_frames(total))[next_chunk:]
    if plan:
        s = next_chunk * U * hop
        a = max(0, s - margin)
        lms = log_mel(a, None)[..., (s - a) // hop:]
        acc.add(lms, [(start - next_chunk * U, t) for start, t in plan])
    emb = acc.result()
    ts = model.frame_timestamps(total) if level == "frame" else None
    return FileResult(path, _finish(emb, normalize), total / model.sample_rate, ts)
