"""Training data: a CSV of audio files or log-mel ``.npy`` files, random crops through the runtime's front
end, per-epoch batches for each process, and a tiny synthetic dataset for tests and examples.

CSV: a header row with a ``file`` column (paths relative to ``root``, default the CSV's folder) and
optional ``label`` (several labels separated by ``;``) and ``caption`` (several captions separated by ``|``).
``.npy`` files hold an *unnormalised* log-mel ``[n_mels, frames]`` (or ``[1, n_mels, frames]``) as written by
``precompute_logmel``; everything else is decoded with ``m2d2_embed.audio.load_audio``.
Randomness (crops, caption choice, batch order) is derived from (seed, epoch, index), so a run is
reproducible and resumable whatever the number of DataLoader workers.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..audio import LOG_EPS, LogMelSpectrogram, load_audio
from ..config import FrontEndConfig

log = logging.getLogger(__name__)


@dataclass
class Row:
    path: Path
    labels: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def read_csv(path: str | Path, root: str | Path | None = None) -> list[Row]:
    """Rows of a file list CSV (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file list not found: {path}")
    base = Path(root) if root is not None else path.parent
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "file" not in reader.fieldnames:
            raise ValueError(f"{path} needs a header row with a 'file' column; found {reader.fieldnames}")
        rows = []
        for r in reader:
            p = Path(r["file"])
            rows.append(
                Row(
                    p if p.is_absolute() else base / p,
                    [s.strip() for s in (r.get("label") or "").split(";") if s.strip()],
                    [s.strip() for s in (r.get("caption") or "").split("|") if s.strip()],
                )
            )
    if not rows:
        raise ValueError(f"{path} lists no files")
    return rows


def unnormalised(frontend: FrontEndConfig) -> FrontEndConfig:
    """The same front end without the (x - mean) / std step: plain ``log(mel + eps)``."""
    return dataclasses.replace(frontend, norm_mean=0.0, norm_std=1.0)


class LogMelReader:
    """Loads the unnormalised log-mel ``[1, n_mels, frames]`` of a ``.npy`` or audio file."""

    def __init__(self, frontend: FrontEndConfig) -> None:
        self.frontend = frontend
        self._melspec: LogMelSpectrogram | None = None  # built lazily, in each DataLoader worker

    def __call__(self, path: Path) -> torch.Tensor:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path).astype(np.float32, copy=False))
            x = x if x.ndim == 3 else x[None]
            if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] != self.frontend.n_mels:
                raise ValueError(
                    f"{path}: log-mel of shape {tuple(x.shape)}; expected "
                    f"[{self.frontend.n_mels}, frames] for this model's front end"
                )
            return x
        if self._melspec is None:
            self._melspec = LogMelSpectrogram(unnormalised(self.frontend))
        wave = load_audio(path, sample_rate=self.frontend.sample_rate)
        min_len = self._melspec.min_samples()
        if wave.shape[-1] < min_len:
            wave = np.pad(wave, (0, min_len - wave.shape[-1]))
        with torch.no_grad():
            return self._melspec(torch.from_numpy(wave)[None])[0]  # (1, 1, n_mels, frames) -> (1, n_mels, frames)


def precompute_logmel(rows: Sequence[Row], frontend: FrontEndConfig, out_dir: str | Path) -> list[Path]:
    """Write the unnormalised log-mel of each audio file to ``out_dir/<stem>.npy``; returns the new paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader, out = LogMelReader(frontend), []
    for i, r in enumerate(rows):
        p = out_dir / f"{i:07d}_{r.path.stem}.npy"
        np.save(p, reader(r.path)[0].numpy())
        out.append(p)
    return out


def estimate_norm_stats(
    rows: Sequence[Row], frontend: FrontEndConfig, max_files: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of the unnormalised log-mel over up to ``max_files`` files (as upstream,
    which computes them from a sample of the training set)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(rows))[:max_files]
    reader = LogMelReader(frontend)
    s = s2 = n = 0.0
    for i in idx:
        x = reader(rows[i].path).double()
        s, s2, n = s + float(x.sum()), s2 + float((x * x).sum()), n + x.numel()
    mean = s / n
    return mean, math.sqrt(max(s2 / n - mean * mean, 1e-12))


class LabelMap:
    """Class names <-> indices; multi-label targets are multi-hot."""

    def __init__(self, names: Sequence[str], multi_label: bool) -> None:
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.multi_label = multi_label

    @classmethod
    def from_rows(cls, rows: Sequence[Row], multi_label: bool | None = None) -> LabelMap:
        if any(not r.labels for r in rows):
            missing = next(r.path for r in rows if not r.labels)
            raise ValueError(f"every row needs a 'label' for fine-tuning; {missing} has none")
        if multi_label is None:
            multi_label = any(len(r.labels) > 1 for r in rows)
        return cls(sorted({lab for r in rows for lab in r.labels}), multi_label)

    def encode(self, labels: Sequence[str]) -> torch.Tensor:
        unknown = [lab for lab in labels if lab not in self.index]
        if unknown:
            raise ValueError(f"label(s) {unknown} not among the {len(self.names)} training classes")
        if self.multi_label:
            y = torch.zeros(len(self.names))
            y[[self.index[lab] for lab in labels]] = 1.0
            return y
        if len(labels) != 1:
            raise ValueError(f"single-label task but a row has labels {list(labels)}")
        return torch.tensor(self.index[labels[0]])


class ClipDataset(Dataset):
    """Normalised log-mel crops ``x`` [1, n_mels, crop_frames] plus, per item, what the stage needs:
    ``caption_emb`` [E] (one of the clip's caption embeddings), ``caption`` (str), ``label``
    (index or multi-hot).

    Clips shorter than ``crop_frames`` are padded with digital silence (``log(eps)``, normalised)."""

    def __init__(
        self,
        rows: Sequence[Row],
        frontend: FrontEndConfig,
        crop_frames: int,
        *,
        seed: int = 0,
        random_crop: bool = True,
        norm_stats: tuple[float, float] | None = None,
        caption_embs: np.ndarray | None = None,
        captions: bool = False,
        labels: LabelMap | None = None,
    ) -> None:
        self.rows = list(rows)
        self.reader = LogMelReader(frontend)
        self.crop_frames = crop_frames
        self.seed, self.epoch = seed, 0
        self.random_crop = random_crop
        self.mean, self.std = norm_stats or (frontend.norm_mean, frontend.norm_std)
        self.caption_embs = caption_embs
        self.captions = captions
        self.labels = labels
        if caption_embs is not None and len(caption_embs) != len(self.rows):
            raise ValueError(
                f"caption embeddings have {len(caption_embs)} rows but the file list has "
                f"{len(self.rows)}; they must be aligned row by row"
            )
        if captions and any(not r.captions for r in self.rows):
            missing = next(r.path for r in self.rows if not r.captions)
            raise ValueError(f"every row needs a 'caption' for CLAP training; {missing} has none")

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def crop(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(1, n_mels, T) -> (1, n_mels, crop_frames): a random (or the first) window, silence-padded."""
        T, n = x.shape[-1], self.crop_frames
        if T > n:
            start = int(rng.integers(0, T - n + 1)) if self.random_crop else 0
            return x[..., start : start + n]
        if T < n:
            silence = self.normalise(torch.tensor(math.log(LOG_EPS)))
            x = torch.cat([x, silence.expand(*x.shape[:-1], n - T)], dim=-1)
        return x

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        row = self.rows[index]
        item: dict[str, torch.Tensor | str] = {"x": self.crop(self.normalise(self.reader(row.path)), rng).float()}
        if self.caption_embs is not None:
            e = self.caption_embs[index]
            e = e[None] if e.ndim == 1 else e[~np.isnan(e).any(axis=-1)]  # (K, E) valid captions only
            if len(e) == 0:
                raise ValueError(f"row {index} ({row.path}) has no valid (non-NaN) caption embedding")
            item["caption_emb"] = torch.from_numpy(np.asarray(e[rng.integers(len(e))], dtype=np.float32))
        if self.captions:
            item["caption"] = row.captions[int(rng.integers(len(row.captions)))]
        if self.labels is not None:
            item["label"] = self.labels.encode(row.labels)
        return item


def load_caption_embeddings(path: str | Path, rows: Sequence[Row] | None = None) -> np.ndarray:
    """Caption embeddings aligned with the file list: a float array [N, E] or [N, K, E] (K captions per
    clip; rows padded with NaN when fewer).

    ``path`` is our ``.npy`` array (rows in CSV order), or upstream M2D-CLAP's caption-embedding files
    (``np.save`` of a ``{ytid: [E] or [K, E]}`` dict; several separated by commas, as upstream's
    ``--file_caption``), which need ``rows``: clip i gets the captions of the 11-character YouTube id that
    starts its file name (upstream's rule), from every file that has it, NaN when none has.
    """
    paths = [p.strip() for p in str(path).split(",") if p.strip()]
    if len(paths) == 1:
        e = np.load(paths[0], mmap_mode="r", allow_pickle=False) if _is_plain_npy(paths[0]) else None
        if e is not None:
            if e.ndim not in (2, 3) or e.dtype.kind != "f":
                raise ValueError(
                    f"{path}: caption embeddings must be a float array [N, E] or [N, K, E], got {e.dtype} {e.shape}"
                )
            return e
    if rows is None:
        raise ValueError(f"{path} holds upstream {{ytid: embedding}} dicts; aligning them needs the file list rows")
    dicts = [read_upstream_caption_embeddings(p) for p in paths]
    dims = {v.shape[-1] for d in dicts for v in list(d.values())[:1]}
    if len(dims) != 1:
        raise ValueError(f"caption files {paths} have embeddings of different widths {sorted(dims)}")
    per_row = []
    for r in rows:
        ytid = r.path.name[:11]
        caps = [np.atleast_2d(np.asarray(d[ytid], dtype=np.float32)) for d in dicts if ytid in d]
        per_row.append(np.concatenate(caps) if caps else np.zeros((0, next(iter(dims)))))
    k = max(1, max(len(c) for c in per_row))
    out = np.full((len(rows), k, next(iter(dims))), np.nan, dtype=np.float32)
    for i, c in enumerate(per_row):
        out[i, : len(c)] = c
    n_missing = sum(len(c) == 0 for c in per_row)
    log.info(
        "caption embeddings from %s: %d of %d clips captioned, up to %d captions each",
        ", ".join(paths),
        len(rows) - n_missing,
        len(rows),
        k,
    )
    return out


def _is_plain_npy(path: str | Path) -> bool:
    """True when the ``.npy`` file holds a plain (non-object) array."""
    with open(path, "rb") as f:
        _, _, dtype = _npy_header(f)
    return not dtype.hasobject


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` file open at its start; leaves ``f`` at the data."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts of numpy arrays (what ``np.save`` writes for a dict): no other class loads."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a caption-embedding file")
        return super().find_class(module, name)


def read_upstream_caption_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Upstream M2D-CLAP's caption-embedding file (``np.save`` of ``{ytid: [E] or [K, E]}``, read upstream with
    ``np.load(..., allow_pickle=True).item()``) -> the dict. Unpickled with only numpy arrays allowed, so a
    file holding anything else is rejected instead of run."""
    with open(path, "rb") as f:
        shape, _, dtype = _npy_header(f)
        if not dtype.hasobject or shape != ():
            raise ValueError(f"{path} is not a pickled {{ytid: embedding}} dict (an array {dtype} {shape})")
        try:
            obj = _ArrayUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: refused to unpickle ({e}); expected a dict of numpy arrays") from e
    obj = obj.item() if isinstance(obj, np.ndarray) else obj
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a non-empty {{ytid: embedding}} dict")
    return {str(k): np.asarray(v) for k, v in obj.items()}


class EpochBatches(Sampler[list[int]]):
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), cut to whole global
    batches (the remainder is dropped), each global batch split into ``world_size`` consecutive slices.
    ``start`` skips the first batches (resuming mid-epoch)."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle
        if self.steps_per_epoch(n, batch_size, world_size) == 0:
            raise ValueError(
                f"{n} clips are fewer than one global batch ({batch_size} x {world_size} processes); "
                "lower train.batch_size or add data"
            )

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
        return n // (batch_size * world_size)

    def __len__(self) -> int:
        return self.steps_per_epoch(self.n, self.batch_size, self.world) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        )
        g = self.batch_size * self.world
        for s in range(self.start, self.steps_per_epoch(self.n, self.batch_size, self.world)):
            block = order[s * g : (s + 1) * g]
            yield block[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


# ---------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------

SYNTH_CLASSES = [  # (name, fundamental Hz, captions)
    ("hum", 110.0, ["a low hum", "a deep electrical hum", "low droning noise"]),
    ("beep", 880.0, ["a high beep", "a short electronic beeping", "a shrill tone"]),
    ("chirp", 0.0, ["a rising chirp", "a sweeping whistle", "a tone gliding upwards"]),
    ("noise", -1.0, ["white noise", "a hissing sound", "static hiss"]),
]


def _synth_wave(kind: float, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * sr)
    t = np.arange(n) / sr
    if kind > 0:  # harmonic tone with a random detune
        f0 = kind * rng.uniform(0.9, 1.1)
        x = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 5))
    elif kind == 0:  # linear chirp
        f1, f2 = rng.uniform(300, 600), rng.uniform(2000, 4000)
        x = np.sin(2 * np.pi * (f1 * t + (f2 - f1) * t**2 / (2 * seconds)))
    else:
        x = rng.standard_normal(n)
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.8)
    return (x + 0.01 * rng.standard_normal(n)).astype(np.float32)


@dataclass
class SyntheticDataset:
    root: Path
    train_csv: Path
    val_csv: Path
    train_captions: Path  # caption embeddings [N, K, E] aligned with train.csv
    val_captions: Path


def make_synthetic_dataset(
    out_dir: str | Path,
    n_train: int = 48,
    n_val: int = 16,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    caption_dim: int = 32,
    seed: int = 0,
    fmt: str = "wav",
) -> SyntheticDataset:
    """Write a small labelled, captioned dataset of four sound classes (hum, beep, chirp, noise).

    Files: ``audio/*.wav`` (or ``logmel/*.npy`` with ``fmt='npy'``), ``train.csv`` / ``val.csv``
    (columns file, label, caption) and ``captions_{train,val}.npy`` [N, 3, caption_dim]: per class a random
    prototype, per caption the prototype plus noise, standing in for LLM sentence embeddings.
    """
    import soundfile as sf

    if fmt not in ("wav", "npy"):
        raise ValueError(f"fmt must be 'wav' or 'npy', got {fmt!r}")
    root = Path(out_dir)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((len(SYNTH_CLASSES), caption_dim))
    frontend = FrontEndConfig.for_rate(sample_rate)
    reader = LogMelReader(frontend) if fmt == "npy" else None
    if reader is not None:
        (root / "logmel").mkdir(exist_ok=True)
    out: dict[str, tuple[Path, Path]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        lines, embs = [], []
        for i in range(n):
            c = i % len(SYNTH_CLASSES)
            name, kind, caps = SYNTH_CLASSES[c]
            wav = root / "audio" / f"{split}_{i:04d}_{name}.wav"
            sf.write(wav, _synth_wave(kind, seconds * rng.uniform(0.8, 1.2), sample_rate, rng), sample_rate)
            rel = wav.relative_to(root)
            if reader is not None:
                npy = root / "logmel" / (wav.stem + ".npy")
                np.save(npy, reader(wav)[0].numpy())
                rel = npy.relative_to(root)
            lines.append((rel.as_posix(), name, "|".join(caps)))
            embs.append(protos[c] + 0.3 * rng.standard_normal((len(caps), caption_dim)))
        csv_path, npy_path = root / f"{split}.csv", root / f"captions_{split}.npy"
        with csv_path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "label", "caption"])
            w.writerows(lines)
        np.save(npy_path, np.stack(embs).astype(np.float32))
        out[split] = (csv_path, npy_path)
    return SyntheticDataset(root, out["train"][0], out["val"][0], out["train"][1], out["val"][1])
