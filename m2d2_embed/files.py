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
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .audio import AUDIO_SUFFIXES, PCM16_SCALE, check_wave, probe, read_audio, stream_audio
from .model import FRAME_LEVELS, STREAM_SECONDS, max_batch
from .outputs import EmbeddingSet, FileFailure, ResultWriter

if TYPE_CHECKING:
    from .config import ModelConfig
    from .model import M2D2

log = logging.getLogger(__name__)
startup_log = logging.getLogger("m2d2_embed.startup")

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
    warning: str | None = None  # something to know about the file that did not stop it (e.g. truncated)


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


def collect_files(
    inputs: PathInput, *, recursive: bool = False, glob: str | None = None, skipped: list[str] | None = None
) -> list[str]:
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


def _scan_dir(
    d: str, recursive: bool, pattern: str | None, skipped: list[str] | None = None
) -> list[tuple[str, str, bool]]:
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
    hint = (
        ""
        if recursive or not any(os.path.isdir(os.path.join(d, e)) for e in entries)
        else "; it has sub-folders: add --recursive (recursive=True)"
    )
    return (
        f"no audio files ({', '.join(AUDIO_SUFFIXES[:5])}, ...) in {where}{hint}; "
        "use --glob (glob=) to pick other names"
    )


# ---------------------------------------------------------------------------------------------------
# Probing and decoding (through the one reader in audio.py)
# ---------------------------------------------------------------------------------------------------

Probe = tuple[float, str | None, str | None]  # (duration in s, None, warning or None) or (0, reason, None)


def probe_file(path: str) -> Probe:
    """(duration in seconds, None, warning) or (0, why it cannot be embedded, None); reads only the header. The
    warning names a truncated file: its header promises more audio than it holds."""
    try:
        info = probe(path)
    except (ValueError, OSError) as e:
        return 0.0, failure_reason(e).replace(f" audio file {path}:", ":"), None
    warning = None
    if info.promised is not None:
        warning = (
            f"truncated file: its header promises {info.promised:.2f} s of audio but it holds "
            f"{info.duration:.2f} s; the {info.duration:.2f} s are embedded"
        )
    return info.duration, None, warning


PROBE_PROCESSES_FROM = 8192  # WAV headers of this many files or more are read by a pool of forked processes


def _probe_many(paths: Sequence[str]) -> list[Probe]:
    return [probe_file(p) for p in paths]


def _probe_all(paths: Sequence[str]) -> list[Probe]:
    """``probe_file`` of every path, in order. WAV headers are read in this thread (about 12 us each; threads only
    contend for the GIL), split over forked processes when there are many (where ``fork`` exists); the other
    files' ``sf.info`` runs in a thread pool (libsndfile releases the GIL while it reads)."""
    probes: list[Probe | None] = [None] * len(paths)
    wav, rest = [], []
    for i, p in enumerate(paths):
        (wav if p.lower().endswith((".wav", ".wave")) else rest).append(i)
    procs = min(8, _cpu_count() - 1)
    if len(wav) >= PROBE_PROCESSES_FROM and procs > 1 and "fork" in multiprocessing.get_all_start_methods():
        size = -(-len(wav) // (4 * procs))
        parts = [[paths[i] for i in wav[k : k + size]] for k in range(0, len(wav), size)]
        try:
            with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
                done = [r for part in pool.map(_probe_many, parts) for r in part]
            for i, r in zip(wav, done):
                probes[i] = r
            wav = []
        except Exception as e:  # a pool that cannot start (limits, sandbox): read them here instead
            log.debug("probing in processes failed (%s); probing in this process", e)
    for i in wav:
        probes[i] = probe_file(paths[i])
    if rest:
        with ThreadPoolExecutor(max_workers=min(8, len(rest))) as pool:
            for i, r in zip(rest, pool.map(probe_file, [paths[i] for i in rest])):
                probes[i] = r
    return probes  # type: ignore[return-value]


def _cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, so container CPU sets count), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Slabs:
    """Staging buffers the decoding workers write whole batches into, reused batch after batch.

    Worker ``w`` of ``workers`` cycles through its own ``per_worker`` slabs; a shared busy flag per slab (made
    before the workers start) says when the main process has let go of one: once its batch is copied out
    (pinned, on CUDA) or used (CPU). A worker allocates a slab in shared memory when it first uses it (sized for
    that batch, larger later if a batch needs more) and sends it to the main process once, with the batch that
    filled it; after that only offsets travel.

    A fresh shared-memory tensor per batch costs its page faults twice, once in the worker that fills it and once
    in the process that reads it: on a 2-core Zen 4 VM that was three quarters of the time to decode a 10-s WAV.
    Reused slabs are faulted in once. They hold at most ``per_worker`` batches per worker, about what the
    prefetching DataLoader held before.
    """

    WAIT_S = 10.0  # a worker waits this long for its next slab, then decodes into fresh tensors instead

    def __init__(self, workers: int, per_worker: int, shared: bool) -> None:
        self.workers, self.per_worker, self.shared = max(1, workers), per_worker, shared
        self.busy = torch.zeros(self.workers * per_worker, dtype=torch.int32)
        if shared:
            self.busy.share_memory_()
        self.token = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
        self._next: dict[int, int] = {}  # worker -> its next slab (in the process of that worker)
        self._own: dict[int, torch.Tensor] = {}  # slab -> buffer, in the process that fills it
        self._grow: dict[int, int] = {}  # slab -> bytes its last batch needed, when that was more than it had
        self._mapped: dict[int, torch.Tensor] = {}  # slab -> buffer, in the process that reads it
        _SLABS[self.token] = self

    def __getstate__(self) -> dict[str, Any]:  # to a spawned worker: the flags, not the buffers
        return {**self.__dict__, "_own": {}, "_grow": {}, "_mapped": {}, "_next": {}}

    def take(self, worker: int, wait: bool) -> int | None:
        """Claim the next slab of ``worker``: its index, or None when it is still in use (after waiting up to
        ``WAIT_S`` when ``wait``)."""
        k = self._next.get(worker, 0)
        j = worker % self.workers * self.per_worker + k
        deadline, pause = time.monotonic() + (self.WAIT_S if wait else 0.0), 1e-4
        while int(self.busy[j]) != 0:
            if time.monotonic() >= deadline:
                log.debug("slab %d of worker %d still in use; decoding into fresh tensors", j, worker)
                return None
            time.sleep(pause)
            pause = min(2 * pause, 5e-3)
        self._next[worker] = (k + 1) % self.per_worker
        self.busy[j] = 1
        return j

    def buffer(self, j: int, nbytes: int) -> tuple[torch.Tensor, bool]:
        """The buffer of claimed slab ``j`` with at least ``nbytes`` (or what its last batch needed), made anew
        when it has less; and whether it is new (then it goes to the main process with the batch)."""
        want = max(nbytes, self._grow.pop(j, 0), 64)
        have = self._own.get(j)
        if have is not None and have.numel() >= want:
            return have, False
        self._own[j] = buf = _uninitialised(want, self.shared)
        return buf, True

    def needed(self, j: int, nbytes: int) -> None:
        """Slab ``j`` lacked room for its batch, which needed ``nbytes``: the next batch gets that much."""
        self._grow[j] = nbytes + nbytes // 16

    def receive(self, j: int, buffer: torch.Tensor) -> None:
        """In the main process: slab ``j`` is now ``buffer`` (sent with the first batch a worker wrote into it)."""
        self._mapped[j] = buffer

    def release(self, j: int) -> None:
        self.busy[j] = 0

    def view(self, j: int, offset: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        """Tensor ``shape`` of ``dtype`` in slab ``j`` (as the main process has it) from byte ``offset``."""
        return self._mapped[j][offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)

    def close(self) -> None:
        """Let go of the slabs: a worker still waiting for one goes on at once (and is then stopped), so
        stopping early (an error, Ctrl-C) does not wait for it."""
        _SLABS.pop(self.token, None)
        self._mapped.clear()
        self._own.clear()
        self.busy.zero_()


def _uninitialised(nbytes: int, shared: bool) -> torch.Tensor:
    """uint8 [nbytes]: in shared memory (committed, so a full /dev/shm fails here, not later) when ``shared``."""
    if not shared:
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        try:  # torch's own allocation of a shared segment, without writing it (share_memory_ copies)
            storage = torch.UntypedStorage._new_shared(nbytes)  # noqa: SLF001 (torch's own)
            return torch.empty(0, dtype=torch.uint8).set_(storage)
        except (AttributeError, TypeError):
            return torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    except RuntimeError as e:
        raise RuntimeError(
            f"a decoding worker could not get {nbytes / 2**20:.0f} MiB of shared memory for a batch ({e}); "
            f"{SHM_HINT}, lower --batch-size, or decode in the main process with --num-workers 0 (slower)"
        ) from e


SHM_HINT = "give the process more shared memory (in Docker: `docker run --shm-size=8g`)"


def shared_memory_free() -> int | None:
    """Bytes free in ``/dev/shm``, where the decoding workers' batches live (Linux); None where there is none."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _workers_that_fit(workers: int, per_worker_bytes: int) -> int:
    """``workers``, or fewer when their staging buffers would not fit in the free shared memory (with a warning
    that says how to give them more): a worker that runs out of it dies with a bus error or fails mid-run."""
    free = shared_memory_free() if workers > 0 else None
    if free is None or workers * per_worker_bytes <= free:
        return workers
    fit = int(free // max(per_worker_bytes, 1))
    log.warning(
        "%d decoding workers need about %.2f GiB of shared memory (/dev/shm) for these batches and %.2f GiB is "
        "free: using %s. For more, %s or lower --batch-size",
        workers,
        workers * per_worker_bytes / 2**30,
        free / 2**30,
        f"{fit} worker(s)" if fit else "none (decoding in the main process, slower)",
        SHM_HINT,
    )
    return fit


_SLABS: weakref.WeakValueDictionary[str, Slabs] = weakref.WeakValueDictionary()  # this process's slabs by token


@dataclass
class DecodedBatch:
    """One decoded batch as it comes from a decoding worker: ``groups`` holds one ``(file indices, waveforms
    [n, N])`` per run of equal-length files of one sample type, where the waveforms are a tensor or, when they
    lie in slab ``slab``, ``(byte offset, dtype, (n, N))``; ``failures`` one ``(file index, reason)`` per file
    that could not be decoded; ``buffer`` the slab itself when it is new. :meth:`take` gives the tensors; on CUDA
    the DataLoader's pin-memory thread calls :meth:`pin_memory`, which copies them into pinned memory and frees
    the slab at once."""

    token: str
    slab: int | None
    groups: list[tuple[list[int], Any]]
    failures: list[tuple[int, str]]
    buffer: torch.Tensor | None = None

    def take(self) -> tuple[list[tuple[list[int], torch.Tensor]], list[tuple[int, str]]]:
        """``(groups, failures)`` with tensors; tensors in a slab stay valid until :meth:`release`."""
        slabs = _SLABS.get(self.token) if self.slab is not None else None
        if slabs is not None and self.buffer is not None:
            slabs.receive(self.slab, self.buffer)  # type: ignore[arg-type]
            self.buffer = None
        groups = []
        for idx, x in self.groups:
            if not isinstance(x, torch.Tensor):
                if slabs is None:
                    raise RuntimeError("a decoded batch outlived its staging buffers")
                offset, dtype, shape = x
                x = slabs.view(self.slab, offset, dtype, shape)  # type: ignore[arg-type]
            groups.append((idx, x))
        return groups, self.failures

    def release(self) -> None:
        """Free the slab for the next batch (the tensors :meth:`take` gave are then overwritten)."""
        slabs = _SLABS.get(self.token) if self.slab is not None else None
        if slabs is not None:
            slabs.release(self.slab)  # type: ignore[arg-type]
        self.slab = None

    def pin_memory(self, device: Any = None) -> DecodedBatch:
        """A copy in pinned memory (what DataLoader's ``pin_memory=True`` calls); the slab is freed."""
        groups, failures = self.take()
        pinned = [(idx, x.pin_memory()) for idx, x in groups]
        self.release()
        return DecodedBatch(self.token, None, pinned, failures)


def batch_bytes(batches: Sequence[Sequence[int]], probes: Sequence[Probe], sample_rate: int) -> list[int]:
    """Bytes of each decoded batch when its files are 16-bit PCM at ``sample_rate`` (the common case; a slab
    grows to what a batch of other files needs)."""
    per_file = [2 * math.ceil(dur * sample_rate) for dur, _, _ in probes]
    return [sum(per_file[i] for i in b) for b in batches]


class _AudioBatches(Dataset):
    """Decodes batch ``k`` of files (in a DataLoader worker) into waveforms at ``sample_rate``, as one
    :class:`DecodedBatch`.

    Its groups are runs of equal-length files of one sample type (batches are sorted by length, so usually one
    or two). A group is int16 when its files are mono 16-bit PCM at ``sample_rate`` (the raw samples, scaled by
    2^-15 on the model's device: half the bytes to move), float32 otherwise. The samples are written into a
    reused :class:`Slabs` buffer (16-bit WAVs straight from the file), so handing them to the main process
    copies nothing; on CUDA the pin-memory thread makes one pinned copy per group (not per file), which goes to
    the GPU without blocking. What does not fit the slab (a batch of float32 files, or a file that grew since it
    was probed), or a batch that finds no free slab, goes in fresh shared-memory tensors instead.
    """

    def __init__(
        self,
        paths: Sequence[str],
        batches: Sequence[Sequence[int]],
        sample_rate: int,
        min_samples: int,
        slabs: Slabs | None = None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.batches = [list(b) for b in batches]
        self.sample_rate = sample_rate
        self.min_samples = min_samples
        self.slabs = slabs
        self.sizes = list(sizes) if sizes is not None else [0] * len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> DecodedBatch:
        info = get_worker_info()
        slabs = self.slabs
        j = slabs.take(info.id if info else 0, wait=info is not None) if slabs is not None else None
        slab, new = slabs.buffer(j, self.sizes[k]) if j is not None else (torch.empty(0, dtype=torch.uint8), False)
        buf = slab.numpy()
        runs: list[tuple[list[int], int, int]] = []  # int16 files read into the slab: (indices, offset, length)
        end = 0  # bytes of the slab used
        aside: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}  # decoded elsewhere, by (type, length)
        failures: list[tuple[int, str]] = []
        for i in self.batches[k]:
            room = buf[end : end + (len(buf) - end) // 2 * 2].view(np.int16)
            wave, err = self._decode(i, room)
            if err is not None:
                failures.append((i, err))
            elif wave.size and np.may_share_memory(wave, room):  # type: ignore[union-attr]
                n = wave.shape[-1]  # type: ignore[union-attr]
                if runs and runs[-1][2] == n and runs[-1][1] + 2 * n * len(runs[-1][0]) == end:
                    runs[-1][0].append(i)  # the next row of the run
                else:
                    runs.append(([i], end, n))
                end += 2 * n
            else:
                aside.setdefault((wave.dtype.str, wave.shape[-1]), []).append((i, wave))  # type: ignore[union-attr]
        groups: list[tuple[list[int], Any]] = [(idx, (at, torch.int16, (len(idx), n))) for idx, at, n in runs]
        for items in aside.values():
            waves = [w for _, w in items]
            start = -(-end // 4) * 4
            size = len(waves) * waves[0].nbytes
            end = start + size
            if end <= len(buf):
                dtype = torch.from_numpy(waves[0][:0]).dtype
                np.stack(waves, out=buf[start:end].view(waves[0].dtype).reshape(len(waves), -1))
                groups.append(([i for i, _ in items], (start, dtype, (len(waves), waves[0].shape[-1]))))
            else:
                groups.append(([i for i, _ in items], _stack(waves)))
        if j is None:
            return DecodedBatch("", None, groups, failures)
        if end > len(buf):
            slabs.needed(j, end)  # type: ignore[union-attr]
        return DecodedBatch(slabs.token, j, groups, failures, slab if new else None)  # type: ignore[union-attr]

    def _decode(self, i: int, out: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        try:
            wave = read_audio(self.paths[i], self.sample_rate, keep_int16=True, out=out)
            check_wave(wave, "the audio", self.min_samples, self.sample_rate)
        except Exception as e:  # reported per file; the others go on
            return None, failure_reason(e)
        return wave, None


def _stack(waves: list[np.ndarray]) -> torch.Tensor:
    """Equal-length waveforms of one dtype -> one tensor [n, N]; in a DataLoader worker, in shared memory (as
    ``default_collate`` does), so sending it to the main process does not copy it again."""
    n, length = len(waves), waves[0].shape[-1]
    dtype = torch.from_numpy(waves[0][:0]).dtype
    out = _uninitialised(n * length * dtype.itemsize, shared=get_worker_info() is not None).view(dtype).view(n, length)
    np.stack(waves, out=out.numpy())
    return out


def _as_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A group from the workers as float32 samples: int16 groups go to ``device`` as they are (from pinned memory
    without blocking) and are scaled there; float32 groups are left to ``M2D2.encode``."""
    if x.dtype == torch.int16:
        return x.to(device, non_blocking=True).float().mul_(PCM16_SCALE)
    return x


def failure_reason(e: BaseException) -> str:
    """How a failed file is reported: the message of a ValueError/OSError, else the exception type too."""
    msg = str(e) or type(e).__name__
    return msg if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {msg}"


def _identity(item: Any) -> Any:
    return item


def pack_batches(order: Sequence[int], chunks: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices (already sorted by length) so that each group holds at most ``budget`` encoder chunks
    (``chunks[i]`` of item ``i``; an item larger than the budget gets a group of its own)."""
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


PREFETCH = 2  # batches each decoding worker works ahead


def default_num_workers() -> int:
    """Decoding workers used by default: up to 8, leaving two cores (one on 4 or fewer) to the main process and
    its pin-memory thread. On one H100 with 16 cores, 8 workers decode about 7,000 ten-second 16-bit WAVs per
    second, about what the model embeds; 12 were slower (the main process's share of the work sets the pace)."""
    cpus = _cpu_count()
    return max(0, min(8, cpus - (2 if cpus > 4 else 1)))


# ---------------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------------


def _process_start() -> float | None:
    """When this process started (``time.time()`` scale, to 10 ms; Linux), else None."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_STARTED = _process_start()


def startup_mark(phase: str) -> None:
    """Log, at DEBUG on the ``m2d2_embed.startup`` logger (``m2d2-embed -vv``), that a start-up phase is reached:
    the wall-clock time (``time.time()``, comparable across processes) and the seconds since this process
    started. The phases of ``m2d2-embed embed``, in order: ``files listed``, ``files probed``, ``decoding
    started``, ``model loading``, ``model loaded``, ``first batch decoded``, ``first batch in the encoder``;
    time-to-first-batch is the last one's time less the process's start. And the end of the run: ``decoding
    finished`` (workers stopped), ``last batch out`` (its results handed on), ``output written``."""
    if startup_log.isEnabledFor(logging.DEBUG):
        now = time.time()
        since = f" ({now - _STARTED:.3f} s after the process started)" if _STARTED is not None else ""
        startup_log.debug("startup: %s at %.3f%s", phase, now, since)


class Prefetch:
    """Files probed, grouped into batches and being decoded (in DataLoader workers) before a model is there:
    made by :func:`start_decoding` from the model's config, handed to :func:`iter_file_embeddings` (which makes
    one itself when given none). Decoding needs only the model's geometry (sample rate, chunk length), so it can
    run while the model loads; the workers decode up to two batches each ahead of the model.

    Attributes: ``paths`` (the files, in order); ``probes`` (:func:`probe_file` of each); ``long`` (indices of
    the files streamed one by one, longer than 300 s); ``batches`` (indices per batch, longest files first).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        config: ModelConfig,
        device: torch.device,
        batch_size: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.key = _geometry(config, device, batch_size)
        workers = default_num_workers() if num_workers is None else int(num_workers)
        if workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {workers}")
        self.probes = _probe_all(self.paths)
        startup_mark("files probed")
        rate, budget = config.frontend.sample_rate, self.key[-1]
        short: list[int] = []
        self.long: list[int] = []
        chunks = [0] * len(self.paths)
        for i, (dur, err, _) in enumerate(self.probes):
            if err is None and dur > STREAM_SECONDS:
                self.long.append(i)
            elif err is None:
                short.append(i)
                chunks[i] = config.num_chunks(round(dur * rate))
        short.sort(key=lambda i: (-self.probes[i][0], i))  # longest first: an out-of-memory error shows at once
        self.batches = pack_batches(short, chunks, budget)
        self.workers = max(0, min(workers, len(self.batches) - 1))  # one batch: nothing to overlap, no workers
        self._decoded: Iterator[Any] | None = None
        self.slabs: Slabs | None = None
        if self.batches:
            # per worker, the batches it works ahead, plus on the CPU the one the main process is using (on CUDA the
            # pin-memory thread frees each slab as soon as it has copied the batch out)
            sizes = batch_bytes(self.batches, self.probes, rate)
            per_worker = PREFETCH if device.type == "cuda" else PREFETCH + 1
            self.workers = _workers_that_fit(self.workers, per_worker * max(sizes))
            self.slabs = Slabs(self.workers, per_worker if self.workers else 1, shared=self.workers > 0)
            ds = _AudioBatches(self.paths, self.batches, rate, config.frontend.min_samples, self.slabs, sizes)
            loader = DataLoader(
                ds,
                batch_size=None,
                shuffle=False,
                num_workers=self.workers,
                collate_fn=_identity,
                pin_memory=device.type == "cuda",
                prefetch_factor=PREFETCH if self.workers > 0 else None,
            )
            self._decoded = iter(loader)  # the workers start decoding the first batches now
            startup_mark("decoding started")

    def fits(self, paths: Sequence[str], config: ModelConfig, device: torch.device, batch_size: int | None) -> bool:
        """Whether this was started for these files and a model of this geometry on this kind of device."""
        return self.paths == list(paths) and self.key == _geometry(config, device, batch_size)

    def decoded(self) -> Iterator[tuple[list[tuple[list[int], torch.Tensor]], list[tuple[int, str]]]]:
        """The decoded batches, in order, once: ``(groups, failures)`` per batch, ``groups`` holding one ``(file
        indices, waveforms [n, N] int16 or float32)`` per run of equal-length files (see ``DecodedBatch``). A
        batch's tensors may lie in a reused buffer: they are valid until the next batch is asked for."""
        it, self._decoded = self._decoded, None
        if it is None:
            return
        for k, batch in enumerate(it):
            try:
                yield batch.take()
            finally:
                batch.release()
            if k == len(self.batches) - 1 and self.slabs is not None:
                # The last batch is used: let go of this process's mappings of the slabs now, while the workers
                # still map them, so that the workers free the pages as they exit (in parallel, during the
                # DataLoader's join that the next step of `it` runs) instead of this process after them. Unmapping
                # here then costs about a fifth: 17-29 ms instead of 100-134 ms for 656 MB on a 2-core Zen 4;
                # 8 workers' slabs on CUDA hold 1.3 GB.
                self.slabs.close()

    def close(self) -> None:
        """Stop the decoding workers (what they decoded is dropped)."""
        self._decoded = None  # the DataLoader iterator shuts its workers down when released
        if self.slabs is not None:
            self.slabs.close()


def _geometry(config: ModelConfig, device: torch.device, batch_size: int | None) -> tuple[Any, ...]:
    """What the batches and their decoding depend on: rate, shortest input, chunk length, pinning, budget."""
    fe = config.frontend
    return (
        fe.sample_rate,
        fe.min_samples,
        fe.hop_length,
        config.encoder.chunk_frames,
        device.type == "cuda",
        max_batch(batch_size, device),
    )


def start_decoding(
    paths: Sequence[str | os.PathLike],
    config: ModelConfig,
    device: str | torch.device,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> Prefetch:
    """Probe ``paths``, batch them and start decoding them for a model with ``config`` on ``device`` before the
    model is loaded (``m2d2-embed embed`` does this while it loads the model; see :class:`Prefetch`). Pass the
    result to :func:`iter_file_embeddings` with the same paths, ``batch_size`` and a model of that geometry."""
    return Prefetch(paths, config, torch.device(device), batch_size, num_workers)


def output_dim(model: M2D2, level: str, reduce: str = "none") -> int:
    """Width of one embedding at ``level`` (see :meth:`M2D2.output_dim`)."""
    return model.output_dim(level, reduce)


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

    return {
        "model": model.name,
        "weights_fingerprint": weights_fingerprint(model),
        "level": level,
        "normalize": bool(normalize),
        **model.describe(level, reduce),
        "sample_rate": model.sample_rate,
        "compute_dtype": model.quantization or str(model.dtype).replace("torch.", ""),
        "encoder_backend": model.backend,
        "frame_hop_seconds": model.frame_hop_seconds,
        "timestamps_unit": "seconds (centre of each frame)",
        "m2d2_embed_version": __version__,
    }


def iter_file_embeddings(
    model: M2D2,
    paths: Sequence[str],
    level: str = "clip",
    *,
    reduce: str = "none",
    normalize: bool = False,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    strict: bool = False,
    prefetch: Prefetch | None = None,
) -> Iterator[tuple[int, FileResult | FileFailure]]:
    """Embed files and yield ``(index into paths, FileResult or FileFailure)`` as each file completes.

    Completion order is not input order: files are batched by length. See :func:`embed_files` for the
    arguments; this is the streaming form the CLI writes shards from. ``prefetch``: the same files already
    probed and being decoded (:func:`start_decoding`); one that does not fit the model is closed and started
    again.
    """
    from tqdm import tqdm  # plain text bar: works in terminals and notebooks without ipywidgets

    paths = [os.fspath(p) for p in paths]
    try:
        model.check_level(level, reduce, normalize=normalize)
        if prefetch is not None and not prefetch.fits(paths, model.config, model.device, batch_size):
            log.debug("the decoding started before the model does not fit it; starting again")
            prefetch.close()
            prefetch = None
        pre = prefetch or Prefetch(paths, model.config, model.device, batch_size, num_workers)
    except BaseException:
        if prefetch is not None:
            prefetch.close()
        raise
    probes, batches, workers = pre.probes, pre.batches, pre.workers
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

    def checked(res: FileResult, i: int) -> FileResult | FileFailure:
        """A result as it goes out: never a non-finite embedding (a failure naming the file instead), and with
        the probe's warning (a truncated file) logged and attached."""
        if not np.isfinite(res.embedding).all():
            return fail(
                i,
                "the model gave non-finite values (NaN or Inf) for this file; nothing was written for it. "
                "Check the weights (`m2d2-embed cache --verify`) and the dtype (--dtype fp32)",
            )
        if probes[i][2] is not None:
            log.warning("%s: %s", paths[i], probes[i][2])
            res.warning = probes[i][2]
        return res

    try:
        for i, (_, err, _) in enumerate(probes):
            if err is not None:
                yield i, fail(i, err)
                done(1, 0.0)
        if batches:
            # Two-stage pipeline: batch k+1's GPU work (copy in, model, pooling, copy out into pinned memory) is
            # queued before the results of batch k are awaited and built, so the GPU is never left without work
            # while Python packs results or waits for decoding; at most two batches are in flight. On CPU the
            # same steps run one after the other.
            pending: _InFlight | None = None
            batches_in = pre.decoded()
            if model.device.type == "cuda" and workers > 0:
                _warm_up(model, len(batches[0]), max(probes[i][0] for i in batches[0]), batch_size)
            decoded = encoded = 0
            for groups, failures in batches_in:
                launched = None
                decoded += 1
                if decoded == 1:
                    startup_mark("first batch decoded")
                if groups and not (strict and failures):  # strict: the batch is not embedded, its failure raises
                    encoded += 1
                    if encoded == 1:
                        startup_mark("first batch in the encoder")
                    launched = _launch(model, groups, level, reduce, normalize, batch_size)
                if pending is not None:
                    for i, res in _collect_batch(model, paths, pending, level):
                        yield i, checked(res, i)
                    done(len(pending.idx), pending.audio_seconds)
                pending = launched
                for i, err in failures:
                    yield i, fail(i, err)
                    done(1, 0.0)
            startup_mark("decoding finished")  # the workers stopped, their buffers let go
            if pending is not None:
                for i, res in _collect_batch(model, paths, pending, level):
                    yield i, checked(res, i)
                done(len(pending.idx), pending.audio_seconds)
            startup_mark("last batch out")
        for i in pre.long:
            try:
                res = embed_long_file(model, paths[i], level, reduce=reduce, normalize=normalize, batch_size=batch_size)
            except (ValueError, OSError, RuntimeError) as e:
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                yield i, fail(i, failure_reason(e))
                done(1, 0.0)
                continue
            yield i, checked(res, i)
            done(1, res.duration)
    finally:
        pre.close()
        bar.close()


def embed_files(
    model: M2D2,
    paths_or_dir: PathInput,
    level: str = "clip",
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    strict: bool = False,
    recursive: bool = False,
    glob: str | None = None,
    reduce: str = "none",
    normalize: bool = False,
) -> EmbeddingSet:
    """Embed audio files or folders; decoding runs in DataLoader workers while the model works.

    Args:
        model: a loaded :class:`~m2d2_embed.M2D2`.
        paths_or_dir: file(s), folder(s) or quoted wildcards (see :func:`collect_files`).
        level: ``"clip"`` (mean over time, [D]), ``"frame"`` (one per time step, [T, D]), ``"clap"``
            (the audio side of the shared audio-text space, [768]), ``"tags"`` (class scores of a model with a
            classifier, [C]) or ``"frame_tags"`` (per-frame class scores, [T, C]).
        batch_size: most 10-s chunks per batch (a clip of up to 10 s is one chunk); default 32 on CPU,
            256 on CUDA. Files are sorted by length and grouped to fill batches with little padding.
        num_workers: decoding processes (default: up to 8, two cores left free; 0 decodes inline).
        progress: show a progress bar (files/s) on stderr.
        strict: raise :class:`AudioFileError` at the first file that fails instead of skipping it.
        recursive, glob: how folders are searched (see :func:`collect_files`).
        reduce: ``"none"`` (frequency patches stacked, 3840) or ``"mean"`` (768) for clip and frame levels.
        normalize: L2-normalise each embedding vector (each frame at frame level).
    Returns:
        an :class:`~m2d2_embed.outputs.EmbeddingSet` in input order: ``paths``, ``embeddings`` ([N, D] float32,
        a list of [T_i, D] at frame levels), ``timestamps`` (frame levels, seconds), ``durations`` (s),
        ``failures`` (path and reason of each file that was skipped) and ``metadata``.

    Files longer than 300 s are decoded and embedded in chunk batches as they stream in, so memory stays
    bounded whatever their length (at frame level the output itself grows with the length).
    """
    files = collect_files(paths_or_dir, recursive=recursive, glob=glob)
    meta = embedding_metadata(model, level, reduce, normalize)
    collected = ResultWriter(None, None, meta, level, expected=len(files))  # in memory, rows filled as they come
    for i, r in iter_file_embeddings(
        model,
        files,
        level,
        reduce=reduce,
        normalize=normalize,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        strict=strict,
    ):
        collected.add(i, r)
    return collected.embedding_set()


def finish(x: torch.Tensor, normalize: bool) -> np.ndarray:
    """Outputs as float32 numpy, each vector L2-normalised when ``normalize``."""
    if normalize:
        x = nn.functional.normalize(x.float(), dim=-1)
    return x.detach().float().cpu().numpy()


def embed_long_file(
    model: M2D2,
    src: Any,
    level: str,
    *,
    reduce: str = "none",
    normalize: bool = False,
    batch_size: int | None = None,
    path: str | None = None,
) -> FileResult:
    """One file (path, bytes or file object) of any length, decoded and embedded as it streams in."""
    emb, total = model.embed_stream(stream_audio(src, model.sample_rate), level, reduce=reduce, batch_size=batch_size)
    ts = model.frame_timestamps(total) if level in FRAME_LEVELS else None
    name = path if path is not None else os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<bytes>"
    return FileResult(name, finish(emb, normalize), total / model.sample_rate, ts)


@torch.inference_mode()
def _warm_up(model: M2D2, n: int, seconds: float, batch_size: int | None) -> None:
    """Run the model once on silence shaped like the first batch while the workers decode it: the one-off CUDA
    costs of a fresh process (library handles, kernel loading, attention and FFT plans, compilation with
    ``compile=True``) then overlap the decoding instead of delaying the first batch. Queued, not awaited."""
    samples = max(model.frontend.min_samples(), round(seconds * model.sample_rate))
    model.encode([torch.zeros(n, samples, device=model.device)], batch_size)


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
def _launch(
    model: M2D2,
    groups: Sequence[tuple[list[int], torch.Tensor]],
    level: str,
    reduce: str,
    normalize: bool,
    batch_size: int | None,
) -> _InFlight:
    """Queue the work of one batch of equal-length groups (file indices, waveforms [n, N]): encoder, pooling at
    ``level`` and normalisation on the model's device, then one copy of all embeddings to the host. On CUDA
    nothing here waits for the GPU: the copy goes into pinned memory without blocking and an event marks its end."""
    toks = model.encode([_as_float(x, model.device) for _, x in groups], batch_size)  # [b, f, T, D] each
    embs, idx, lengths = [], [], []
    for (g_idx, x), tok in zip(groups, toks):
        n = x.shape[-1]
        embs.append(model.pool(tok, level, reduce=reduce, num_samples=n, batch_size=batch_size))
        idx += g_idx
        lengths += [n] * len(g_idx)
    shapes = [tuple(e.shape[1:]) for e in embs for _ in range(e.shape[0])]
    flat = (
        torch.cat([e.reshape(-1, e.shape[-1]) for e in embs])
        if len(embs) > 1
        else embs[0].reshape(-1, embs[0].shape[-1])
    )
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


def _collect_batch(model: M2D2, paths: Sequence[str], batch: _InFlight, level: str) -> Iterator[tuple[int, FileResult]]:
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
        if level in FRAME_LEVELS:
            if n not in timestamps:
                timestamps[n] = model.frame_timestamps(n)
            ts = timestamps[n].copy()
        yield i, FileResult(paths[i], flat[row : row + rows].reshape(shape), n / model.sample_rate, ts)
        row += rows
