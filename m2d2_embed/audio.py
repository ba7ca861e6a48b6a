"""Audio in: input checking, resampling, file loading, and the log-mel front end.

The front end reproduces the reference's nnAudio ``MelSpectrogram`` with ``torch.stft``: periodic Hann
window, centred frames with reflect padding, power 2, Slaney-scale mel filters with Slaney area
normalisation, then ``log(x + eps)`` with float32 machine epsilon and ``(x - mean) / std``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from torch import nn

from .config import FrontEndConfig

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
LOG_EPS = float(torch.finfo(torch.float32).eps)
RESAMPLER_QUALITY = "HQ"  # soxr 'HQ': 20-bit precision, linear phase, passband to 91% of Nyquist

# 1-D/2-D array or tensor, a list of 1-D arrays, a file path, or a list of paths.
AudioInput = Union[np.ndarray, torch.Tensor, str, os.PathLike, Sequence[Any]]  # noqa: UP007 (runtime alias)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64")

# Integer PCM is scaled to [-1, 1) by the full scale of its type (as soundfile does when reading files). int64 and
# unsigned types wider than 8 bits are refused: their full scale is ambiguous (np.array of Python ints is int64).
_INT_SCALE = {np.dtype("int8"): 2.0**7, np.dtype("int16"): 2.0**15, np.dtype("int32"): 2.0**31}
PCM16_SCALE = 2.0**-15  # 16-bit PCM sample -> float, as libsndfile reads it (exact: a power of two)
MIN_RATE, MAX_RATE = 1000, 768000  # plausible sample rates in Hz: anything outside is a mistake
READ_BLOCK_FRAMES = 1 << 18  # frames per read when streaming a file (about 5.5 s at 48 kHz)
READABLE = (
    "Readable formats: WAV, FLAC, OGG/Vorbis, Opus, MP3 (and other libsndfile formats); convert others "
    "first, e.g. `ffmpeg -i IN OUT.flac`"
)


# ---------------------------------------------------------------------------------------------------
# Mel filters
# ---------------------------------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular Slaney-scale mel filters with Slaney area normalisation, float64 [n_mels, n_fft // 2 + 1]."""
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # equal area per band
    return weights


class LogMelSpectrogram(nn.Module):
    """Waveform [B, N] at ``config.sample_rate`` -> normalised log-mel [B, 1, n_mels, 1 + N // hop].

    Runs in float32 on the module's device. Buffers (window, filters) are not saved in checkpoints."""

    SEGMENT_FRAMES = 8192  # frames per STFT call (82 s at 16 kHz)

    def __init__(self, config: FrontEndConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.register_buffer("window", torch.hann_window(c.win_length, periodic=True), persistent=False)
        fb = mel_filters(c.sample_rate, c.n_fft, c.n_mels, c.f_min, c.f_max)
        self.register_buffer("mel_fb", torch.from_numpy(fb).float(), persistent=False)

    def min_samples(self) -> int:
        """Shortest input the centred STFT accepts (reflect padding needs more than n_fft // 2 samples)."""
        return self.config.min_samples

    def num_frames(self, num_samples: int) -> int:
        return self.config.num_frames(num_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        c = self.config
        pad = c.n_fft // 2
        # centred frames: reflect-pad once, then frame without centring, in segments so that a long file
        # never materialises its whole complex spectrogram (same numbers as one torch.stft(center=True) call)
        x = nn.functional.pad(wave.float(), (pad, pad), mode="reflect")
        n_frames = self.num_frames(wave.shape[-1])
        out = []
        for a in range(0, n_frames, self.SEGMENT_FRAMES):
            b = min(n_frames, a + self.SEGMENT_FRAMES)
            seg = x[..., a * c.hop_length : (b - 1) * c.hop_length + c.n_fft]
            spec = torch.stft(
                seg,
                n_fft=c.n_fft,
                hop_length=c.hop_length,
                win_length=c.win_length,
                window=self.window,
                center=False,
                onesided=True,
                return_complex=True,
            )
            power = spec.real.square() + spec.imag.square()  # (B, n_fft // 2 + 1, frames)
            out.append(torch.log(self.mel_fb @ power + LOG_EPS))  # (B, n_mels, frames)
        x = torch.cat(out, dim=-1) if len(out) > 1 else out[0]
        x = (x - c.norm_mean) / c.norm_std
        return x.unsqueeze(1)  # (B, 1, n_mels, F)


# ---------------------------------------------------------------------------------------------------
# Resampling and input checking
# ---------------------------------------------------------------------------------------------------


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample float32 audio along the last axis with soxr ('HQ' quality). [..., N] -> [..., N']."""
    if orig_sr == target_sr:
        return wave
    import soxr

    x = np.ascontiguousarray(wave, dtype=np.float32)
    if x.ndim == 1:
        return soxr.resample(x, orig_sr, target_sr, quality=RESAMPLER_QUALITY).astype(np.float32, copy=False)
    flat = x.reshape(-1, x.shape[-1]).T  # soxr wants (frames, channels)
    y = soxr.resample(np.ascontiguousarray(flat), orig_sr, target_sr, quality=RESAMPLER_QUALITY)
    return np.ascontiguousarray(y.T).reshape(*x.shape[:-1], -1).astype(np.float32, copy=False)


def to_float(x: np.ndarray, what: str = "audio") -> np.ndarray:
    """Samples as float32: float arrays as they are, int8/16/32 PCM scaled by their full scale, uint8 centred at
    128. Other integer types are refused with what to do (their scale is ambiguous: silence is never an answer)."""
    if x.dtype in _INT_SCALE:
        return (x.astype(np.float64) / _INT_SCALE[x.dtype]).astype(np.float32)
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned, centred at 128
        return ((x.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype.kind in "iu" and x.dtype != np.bool_:
        raise TypeError(
            f"{what}: integer audio of dtype {x.dtype} is ambiguous (what is its full scale?); convert "
            "it to float in [-1, 1] (e.g. x / 32768 for 16-bit values) or to int16/int32 PCM "
            "(e.g. x.astype(np.int16))"
        )
    raise TypeError(
        f"{what}: audio of dtype {x.dtype} is not supported; pass float samples in [-1, 1] or int8/int16/int32 PCM"
    )


def check_sample_rate(sample_rate: Any, what: str = "sample_rate") -> int:
    """The rate as an int, or a ValueError/TypeError that says what the argument means."""
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(sample_rate, (int, np.integer)):
        raise TypeError(
            f"{what} must be an integer number of samples per second (e.g. 16000 or 44100), got "
            f"{sample_rate!r} of type {type(sample_rate).__name__}"
        )
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise ValueError(
            f"{what}={sample_rate} Hz is not a plausible audio sample rate ({MIN_RATE} to {MAX_RATE} "
            "Hz); it is the rate of the array you pass, in samples per second (e.g. 16000 or 44100)"
        )
    return int(sample_rate)


def check_wave(x: np.ndarray | torch.Tensor, what: str, min_samples: int, rate: int) -> None:
    """Raise a ValueError naming ``what`` if a waveform [..., N] is empty, not finite, or too short for the model."""
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{what} is empty (0 samples); pass at least {min_samples} samples")
    if not (x.dtype == torch.int16 if isinstance(x, torch.Tensor) else x.dtype == np.int16):  # int16 is finite
        finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
        if not finite:
            raise ValueError(f"{what} contains NaN or Inf samples; clean the audio (e.g. np.nan_to_num) first")
    if n < min_samples:
        raise ValueError(
            f"{what} is too short: {n} samples at {rate} Hz after resampling; the model needs at "
            f"least {min_samples} samples ({1000 * min_samples / rate:.1f} ms). Pad it with zeros "
            "if it is a genuinely short sound"
        )


class PreparedAudio:
    """Waveforms at the model's rate, float32, as a list of 1-D tensors; plus how to shape outputs."""

    def __init__(self, waves: list[torch.Tensor], batched: bool, kind: str, paths: list[str] | None = None):
        self.waves = waves
        self.batched = batched  # False: a single 1-D input, outputs lose the batch axis
        self.kind = kind  # "tensor", "numpy" or "path": outputs follow it (paths give numpy)
        self.paths = paths


def is_path(audio: Any) -> bool:
    return isinstance(audio, (str, os.PathLike))


def check_path_rate(sample_rate: int | None, model_rate: int) -> None:
    """A file's rate comes from the file: ``sample_rate`` given with a path must be None (or the model's rate)."""
    if sample_rate is not None and sample_rate != model_rate:
        raise ValueError(
            f"sample_rate={sample_rate!r} was given with a file path; a file's rate is read from "
            "the file: leave sample_rate out"
        )


def prepare_audio(
    audio: AudioInput, sample_rate: int | None, model_rate: int, min_samples: int, device: torch.device | str = "cpu"
) -> PreparedAudio:
    """Validate any supported audio input and return 1-D float32 waveforms at ``model_rate``.

    Accepted: a 1-D or 2-D float tensor/array [N] or [B, N]; integer PCM arrays (int8/16/32 scaled by their type's
    full scale, uint8 centred at 128); a list of 1-D arrays/tensors of any lengths; a file path or a list of paths
    (decoded and resampled; ``sample_rate`` must then be None or the model rate). Raises ValueError/TypeError
    with what was wrong and what to do.
    """
    if is_path(audio):
        check_path_rate(sample_rate, model_rate)
        what = f"audio file {os.fspath(audio)!r}"
        wave = read_audio(audio, model_rate)
        check_wave(wave, what, min_samples, model_rate)
        return PreparedAudio([torch.from_numpy(wave).to(device)], batched=False, kind="path", paths=[os.fspath(audio)])
    if isinstance(audio, (list, tuple)):
        if len(audio) == 0:
            raise ValueError("empty list of audio; pass at least one waveform or file path")
        if all(is_path(a) for a in audio):
            waves, paths = [], []
            for p in audio:
                w = prepare_audio(p, sample_rate, model_rate, min_samples, device)
                waves += w.waves
                paths += w.paths
            return PreparedAudio(waves, batched=True, kind="path", paths=paths)
        if any(is_path(a) for a in audio):
            raise TypeError("a list of audio must hold only file paths or only arrays, not a mix")
        kinds = {"tensor" if isinstance(a, torch.Tensor) else "numpy" for a in audio}
        waves = []
        for i, a in enumerate(audio):
            try:
                one = prepare_audio(a, sample_rate, model_rate, min_samples, device)
            except (ValueError, TypeError) as e:
                raise type(e)(f"audio[{i}]: {e}") from e
            if one.batched:
                raise ValueError(f"audio[{i}] has shape {tuple(a.shape)}; items of a list must be 1-D waveforms")
            waves += one.waves
        return PreparedAudio(waves, batched=True, kind="tensor" if kinds == {"tensor"} else "numpy")

    if isinstance(audio, torch.Tensor):
        kind, x = "tensor", audio
        if not (x.is_floating_point()):
            x = torch.from_numpy(to_float(x.detach().cpu().numpy(), "audio"))
    elif isinstance(audio, np.ndarray):
        kind, x = "numpy", to_float(audio, "audio")
    else:
        raise TypeError(
            f"unsupported audio input of type {type(audio).__name__}; pass a float tensor or numpy "
            "array [samples] or [batch, samples], a list of 1-D arrays, or file path(s)"
        )
    if x.ndim not in (1, 2):
        raise ValueError(
            f"audio has shape {tuple(x.shape)}; expected [samples] or [batch, samples] "
            "(downmix multichannel audio to mono first, e.g. x.mean(axis=0))"
        )
    if sample_rate is None:
        raise ValueError(
            "sample_rate= is required for arrays and tensors (e.g. sample_rate=16000); "
            "the audio is resampled to the model's rate when it differs"
        )
    sample_rate = check_sample_rate(sample_rate)
    if x.ndim == 2 and x.shape[0] == 0:
        raise ValueError("audio batch is empty (shape [0, N]); pass at least one waveform")
    if x.ndim == 2 and x.shape[1] <= 8 < x.shape[0]:  # soundfile's (samples, channels) layout
        raise ValueError(
            f"audio has shape {tuple(x.shape)}: this looks like {x.shape[1]}-channel audio in "
            "soundfile's (samples, channels) layout, not a batch of waveforms; downmix it first "
            "(x.mean(axis=1)) or pass one channel (x[:, 0])"
        )
    check_wave(x, "audio", 1, sample_rate)
    if sample_rate != model_rate:
        target_device = x.device if isinstance(x, torch.Tensor) else device
        xn = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x
        x = torch.from_numpy(resample(xn, sample_rate, model_rate)).to(target_device)
    elif isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    check_wave(x, "audio", min_samples, model_rate)
    x = x.to(device=device, dtype=torch.float32)
    batched = x.ndim == 2
    waves = list(x) if batched else [x]
    return PreparedAudio(waves, batched=batched, kind=kind)


# ---------------------------------------------------------------------------------------------------
# Reading audio: one reader for paths, bytes and file objects (probe, read, stream)
# ---------------------------------------------------------------------------------------------------

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]  # noqa: UP007 (runtime alias)


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says. ``duration`` in seconds is what the file holds; ``promised`` is the duration
    its header declares when that is longer (a truncated file), else None."""

    duration: float
    sample_rate: int
    channels: int
    frames: int
    promised: float | None = None
    pcm16_at: int | None = None  # byte offset of the samples of a plain 16-bit little-endian PCM WAV, else None


def _name(src: AudioSource) -> str:
    return os.fspath(src) if is_path(src) else f"<{type(src).__name__}>"


def _open(src: AudioSource) -> Any:
    """What soundfile can open: a path string or a file object (bytes are wrapped)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ValueError("empty file (0 bytes)")
        return io.BytesIO(src)
    if is_path(src):
        p = Path(src)
        if not p.exists():
            raise FileNotFoundError(f"audio file not found: {p}")
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a directory; pass a file, or use model.embed_files() for folders")
        if p.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        return str(p)
    return src


def _cannot_decode(src: AudioSource, e: BaseException) -> ValueError:
    why = str(e).rstrip(".")
    for junk in (f"Error opening {src!r}: ", "Error opening <_io.BytesIO object"):  # soundfile repeats the source
        if why.startswith(junk):
            why = why.split(": ", 1)[-1] if junk.endswith(": ") else why.split(">: ", 1)[-1]
    return ValueError(f"cannot decode audio file {_name(src)}: {why}. {READABLE}")


def probe(src: AudioSource) -> AudioInfo:
    """Header of an audio file (path, bytes or file object) without decoding it; ValueError/OSError if unreadable.

    WAV files, on disk or as bytes, are parsed directly (about 11 us for a file; ``soundfile.info`` takes about 4x
    longer), anything else (or a WAV header this parser does not follow: RF64, streamed headers) through
    libsndfile."""
    info = _wav_header(src)  # a WAV on disk or in memory; a missing file, a folder, anything else: None
    if info is not None:
        if info.frames <= 0:
            raise ValueError("no samples (zero-length audio)")
        return info
    f = _open(src)
    import soundfile as sf

    try:
        sfinfo = sf.info(f)
    except Exception as e:  # LibsndfileError, RuntimeError, TypeError
        raise _cannot_decode(src, e) from e
    finally:
        if hasattr(f, "seek"):
            f.seek(0)
    if sfinfo.frames <= 0:
        raise ValueError("no samples (zero-length audio)")
    return AudioInfo(sfinfo.frames / sfinfo.samplerate, sfinfo.samplerate, sfinfo.channels, sfinfo.frames)


_KS_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")  # KSDATAFORMAT_SUBTYPE_* after the 2-byte tag


def _wav_header(src: AudioSource) -> AudioInfo | None:
    """The header of a WAV file on disk (a path ending in .wav/.wave) or in memory (bytes starting with RIFF),
    or None when it is anything else (the caller then asks libsndfile)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        try:
            data = memoryview(src).cast("B")
        except TypeError:  # a memoryview that is not contiguous
            return None
        try:
            return _parse_wav(lambda pos, n: bytes(data[pos : pos + n]), len(data))
        except struct.error:
            return None
    if not (is_path(src) and _is_wav(src)):
        return None
    try:
        fd = os.open(os.fspath(src), os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    try:
        head = os.read(fd, 1024)  # one read covers the usual header; chunks beyond it are read where they are
        return _parse_wav(
            lambda pos, n: head[pos : pos + n] if pos + n <= len(head) else os.pread(fd, n, pos),
            os.fstat(fd).st_size,
        )
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)


def _parse_wav(read_at: Any, size: int) -> AudioInfo | None:
    """A plain RIFF/WAVE header read through ``read_at(offset, n) -> bytes`` from ``size`` bytes, or None. The
    frame count is cut to the bytes actually there, as libsndfile does for a truncated file; ``promised`` keeps
    the header's own count."""
    head = read_at(0, 12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, rate, align, channels, pcm16 = 12, 0, 0, 0, False
    for _ in range(64):  # chunks before 'data' (fmt, LIST, fact, ...): a handful in practice
        hdr = read_at(pos, 8)
        if len(hdr) < 8:
            return None
        cid, n = hdr[:4], struct.unpack("<I", hdr[4:])[0]
        if cid == b"fmt ":
            fmt = read_at(pos + 8, min(n, 40))
            if len(fmt) < 14:
                return None
            tag, channels, rate, _bps, align = struct.unpack("<HHIIH", fmt[:14])
            if channels == 0 or rate == 0 or align == 0:
                return None
            bits = struct.unpack("<H", fmt[14:16])[0] if len(fmt) >= 16 else 0
            if tag == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the tag inside the sub-format GUID
                tag = struct.unpack("<H", fmt[24:26])[0] if fmt[26:40] == _KS_GUID_TAIL else 0
            pcm16 = tag == 1 and bits == 16 and align == 2 * channels
        elif cid == b"data":
            if not align or n in (0, 0xFFFFFFFF):
                return None
            frames = min(n, size - pos - 8) // align
            promised = n // align / rate if n // align > frames else None
            return AudioInfo(frames / rate, rate, channels, frames, promised, pos + 8 if pcm16 else None)
        pos += 8 + n + (n & 1)  # chunks are padded to an even size
        if pos >= size:
            return None
    return None


_LITTLE_ENDIAN = sys.byteorder == "little"  # WAV samples are little-endian: read as they are only on such hosts


def _is_wav(src: AudioSource) -> bool:
    return os.fspath(src).lower().endswith((".wav", ".wave"))  # type: ignore[arg-type]


def downmix(data: np.ndarray) -> np.ndarray:
    """Mono of float32 frames [N, C]: the channels' mean, [N]. The values of ``data.mean(axis=1)``, which takes
    5-10x longer for 2-7 channels (numpy reduces a short last axis slowly); from 8 channels on, numpy sums in
    another order, so that is what runs there."""
    if data.shape[1] == 1:
        return data[:, 0]
    if data.shape[1] >= 8:
        return data.mean(axis=1)
    acc = data[:, 0].copy()
    for c in range(1, data.shape[1]):
        acc += data[:, c]
    acc /= np.float32(data.shape[1])
    return acc


def _read_pcm16(src: AudioSource, info: AudioInfo, out: np.ndarray | None) -> np.ndarray:
    """The samples of a 16-bit PCM WAV (a path, or bytes) whose header is ``info``, [frames, channels] int16,
    read straight into ``out`` when it is a contiguous int16 buffer with room, else into a new array. A file cut
    short since its header was read gives the frames it still holds."""
    count = info.frames * info.channels
    if out is not None and out.dtype == np.int16 and out.ndim == 1 and out.size >= count and out.flags.c_contiguous:
        buf = out[:count]
    else:
        buf = np.empty(count, np.int16)
    view, got, at = memoryview(buf).cast("B"), 0, info.pcm16_at or 0
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = memoryview(src).cast("B")[at : at + len(view)]
        got = len(data)
        view[:got] = data
    else:
        with open(os.fspath(src), "rb", buffering=0) as f:  # type: ignore[arg-type]
            f.seek(at)
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
    frames = got // (2 * info.channels)
    return buf[: frames * info.channels].reshape(frames, info.channels)


def read_audio(
    src: AudioSource,
    sample_rate: int | None = SAMPLE_RATE,
    *,
    mono: bool = True,
    channel: int | None = None,
    keep_int16: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode an audio file (path, bytes or file object) to float32 samples in [-1, 1].

    Args:
        src: the file.
        sample_rate: resample to this rate in Hz with soxr 'HQ'; None keeps the file's rate.
        mono: average the channels ([N]); False returns [channels, N].
        channel: take this channel (0-based) instead of averaging.
        keep_int16: for a mono 16-bit PCM file already at ``sample_rate``, return its raw int16 samples [N]
            (``x * PCM16_SCALE`` gives the float32 values bit for bit; half the bytes to move, and reading int16
            is about 3x faster than libsndfile's conversion to float).
        out: with ``keep_int16``, a contiguous int16 buffer: when the samples are returned as int16 and fit, they
            are read into ``out[:N]`` and that view is returned (a batch decoded straight into one buffer);
            otherwise a new array is returned.

    16-bit PCM WAV files on disk (plain or WAVE_FORMAT_EXTENSIBLE) are read straight from the file, the bytes
    libsndfile would read, without its per-sample conversion; everything else goes through libsndfile.
    Returns:
        float32 [N] (mono, or one channel) or [C, N]; int16 [N] only with ``keep_int16``.
    """
    info = _wav_header(src) if _LITTLE_ENDIAN else None
    if info is not None and info.pcm16_at is not None:
        sr, data = info.sample_rate, _read_pcm16(src, info, out if keep_int16 else None)
    else:
        import soundfile as sf

        f = _open(src)
        try:
            with sf.SoundFile(f) as sfile:
                sr, pcm16 = sfile.samplerate, sfile.subtype == "PCM_16"
                want_int = keep_int16 and pcm16 and mono and channel is None
                data = sfile.read(dtype="int16" if want_int else "float32", always_2d=True)  # (N, C)
        except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            raise _cannot_decode(src, e) from e
    if data.shape[0] == 0:
        raise ValueError(f"audio file {_name(src)} has no samples")
    if data.dtype == np.int16:
        if keep_int16 and mono and channel is None and data.shape[1] == 1 and sample_rate in (None, sr):
            return np.ascontiguousarray(data[:, 0])
        data = np.multiply(data, np.float32(PCM16_SCALE), dtype=np.float32)  # what libsndfile's float read gives
    if channel is not None:
        if not 0 <= channel < data.shape[1]:
            raise ValueError(f"channel={channel} but {_name(src)} has {data.shape[1]} channel(s)")
        x = data[:, channel]
    elif mono:
        x = downmix(data)
    else:
        x = data.T
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sample_rate is not None and sr != sample_rate:
        x = resample(x, sr, sample_rate)
    return x


def load_audio(
    path: str | os.PathLike, sample_rate: int | None = SAMPLE_RATE, mono: bool = True, channel: int | None = None
) -> np.ndarray:
    """Read an audio file with soundfile and return float32 samples in [-1, 1].

    Formats: WAV, FLAC, OGG/Vorbis, Opus and MP3 (libsndfile >= 1.1), AIFF and the other libsndfile formats.
    Others (AAC/M4A, WMA, video files) can be converted first, e.g. ``ffmpeg -i in.m4a out.flac``.

    Args:
        path: the file (bytes or a file object work too).
        sample_rate: resample to this rate in Hz with soxr 'HQ'; None keeps the file's rate.
        mono: average the channels (shape [N]); False returns [channels, N].
        channel: take this channel (0-based) instead of averaging.
    Returns:
        float32 array [N] (mono or channel given) or [C, N].
    """
    return read_audio(path, sample_rate, mono=mono, channel=channel)


def stream_audio(src: AudioSource, sample_rate: int, block_frames: int | None = None) -> Iterator[np.ndarray]:
    """Mono float32 blocks of a file at ``sample_rate``: the samples of ``read_audio(src, sample_rate)``, block by
    block (resampled with a streaming soxr), so a file of any length is never held whole. Blocks are
    ``block_frames`` of the file (default ``READ_BLOCK_FRAMES``)."""
    import soundfile as sf

    block_frames = block_frames or READ_BLOCK_FRAMES
    f = _open(src)
    try:
        sfile = sf.SoundFile(f)
    except Exception as e:
        raise _cannot_decode(src, e) from e
    with sfile:
        sr = sfile.samplerate
        rs = None
        if sr != sample_rate:
            import soxr

            rs = soxr.ResampleStream(sr, sample_rate, 1, dtype="float32", quality=RESAMPLER_QUALITY)
        while True:
            data = sfile.read(block_frames, dtype="float32", always_2d=True)  # (n, C)
            last = data.shape[0] < block_frames
            x = downmix(data)
            x = np.ascontiguousarray(x, dtype=np.float32)
            if not np.isfinite(x).all():
                raise ValueError("the audio contains NaN or Inf samples")
            if rs is not None:
                x = rs.resample_chunk(x, last=last)
            if len(x):
                yield x
            if last:
                return
