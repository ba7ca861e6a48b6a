"""Audio in: input checking, resampling, file loading, and the log-mel front end.

The front end reproduces the reference's nnAudio ``MelSpectrogram`` with ``torch.stft``: periodic Hann
window, centred frames with reflect padding, power 2, Slaney-scale mel filters with Slaney area
normalisation, then ``log(x + eps)`` with float32 machine epsilon and ``(x - mean) / std``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

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

# Integer PCM is scaled to [-1, 1) by the full scale of its type (as soundfile does when reading files).
_INT_SCALE = {np.dtype("int8"): 2.0**7, np.dtype("int16"): 2.0**15, np.dtype("int32"): 2.0**31,
              np.dtype("int64"): 2.0**63}


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
        return self.config.n_fft // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.config.hop_length

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
            seg = x[..., a * c.hop_length:(b - 1) * c.hop_length + c.n_fft]
            spec = torch.stft(seg, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
                              window=self.window, center=False, onesided=True, return_complex=True)
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


def _to_float_numpy(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype in _INT_SCALE:
        return (x.astype(np.float64) / _INT_SCALE[x.dtype]).astype(np.float32)
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned, centred at 128
        return ((x.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    if x.dtype == np.bool_ or x.dtype.kind in "uc":
        raise TypeError(f"{what}: audio of dtype {x.dtype} is not supported; pass float samples in [-1, 1] "
                        "or int8/int16/int32 PCM")
    raise TypeError(f"{what}: cannot use an array of dtype {x.dtype} as audio")


def _check_finite_nonempty(x: np.ndarray | torch.Tensor, what: str, min_samples: int) -> None:
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"{what} is empty (0 samples); pass at least {min_samples} samples")
    finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not finite:
        raise ValueError(f"{what} contains NaN or Inf samples; clean the audio (e.g. np.nan_to_num) first")


class PreparedAudio:
    """Waveforms at the model's rate, float32, as a list of 1-D tensors; plus how to shape outputs."""

    def __init__(self, waves: list[torch.Tensor], batched: bool, kind: str, paths: list[str] | None = None):
        self.waves = waves
        self.batched = batched  # False: a single 1-D input, outputs lose the batch axis
        self.kind = kind  # "tensor", "numpy" or "path": outputs follow it (paths give numpy)
        self.paths = paths

    @property
    def equal_lengths(self) -> bool:
        return len({w.shape[-1] for w in self.waves}) <= 1


def prepare_audio(audio: AudioInput, sample_rate: int | None, model_rate: int, min_samples: int,
                  device: torch.device | str = "cpu") -> PreparedAudio:
    """Validate any supported audio input and return 1-D float32 waveforms at ``model_rate``.

    Accepted: a 1-D or 2-D float tensor/array [N] or [B, N]; integer PCM arrays (scaled by their type's
    full scale); a list of 1-D arrays/tensors of any lengths; a file path or a list of paths (decoded and
    resampled; ``sample_rate`` must then be None or the model rate). Raises ValueError/TypeError with
    what was wrong and what to do.
    """
    if isinstance(audio, (str, os.PathLike)):
        wave = load_audio(audio, sample_rate=model_rate)
        _check_finite_nonempty(wave, f"audio file {os.fspath(audio)!r}", min_samples)
        _check_length(wave.shape[-1], f"audio file {os.fspath(audio)!r}", min_samples, model_rate)
        return PreparedAudio([torch.from_numpy(wave).to(device)], batched=False, kind="path",
                             paths=[os.fspath(audio)])
    if isinstance(audio, (list, tuple)):
        if len(audio) == 0:
            raise ValueError("empty list of audio; pass at least one waveform or file path")
        if all(isinstance(a, (str, os.PathLike)) for a in audio):
            waves, paths = [], []
            for p in audio:
                w = prepare_audio(p, sample_rate, model_rate, min_samples, device)
                waves += w.waves
                paths += w.paths
            return PreparedAudio(waves, batched=True, kind="path", paths=paths)
        if any(isinstance(a, (str, os.PathLike)) for a in audio):
            raise TypeError("a list of audio must hold only file paths or only arrays, not a mix")
        kinds = {"tensor" if isinstance(a, torch.Tensor) else "numpy" for a in audio}
        waves = []
        for i, a in enumerate(audio):
            one = prepare_audio(a, sample_rate, model_rate, min_samples, device)
            if one.batched:
                raise ValueError(f"audio[{i}] has shape {tuple(a.shape)}; items of a list must be 1-D waveforms")
            waves += one.waves
        return PreparedAudio(waves, batched=True, kind="tensor" if kinds == {"tensor"} else "numpy")

    if isinstance(audio, torch.Tensor):
        kind, x = "tensor", audio
        if not (x.is_floating_point()):
            x = torch.from_numpy(_to_float_numpy(x.detach().cpu().numpy(), "audio"))
    elif isinstance(audio, np.ndarray):
        kind, x = "numpy", _to_float_numpy(audio, "audio")
    else:
        raise TypeError(f"unsupported audio input of type {type(audio).__name__}; pass a float tensor or numpy "
                        "array [samples] or [batch, samples], a list of 1-D arrays, or file path(s)")
    if x.ndim not in (1, 2):
        raise ValueError(f"audio has shape {tuple(x.shape)}; expected [samples] or [batch, samples] "
                         "(downmix multichannel audio to mono first, e.g. x.mean(axis=0))")
    if sample_rate is None:
        raise ValueError("sample_rate= is required for arrays and tensors (e.g. sample_rate=16000); "
                         "the audio is resampled to the model's rate when it differs")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer in Hz, got {sample_rate!r}")
    if x.ndim == 2 and x.shape[0] == 0:
        raise ValueError("audio batch is empty (shape [0, N]); pass at least one waveform")
    _check_finite_nonempty(x, "audio", min_samples)
    if sample_rate != model_rate:
        target_device = x.device if isinstance(x, torch.Tensor) else device
        xn = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else x
        x = torch.from_numpy(resample(xn, int(sample_rate), model_rate)).to(target_device)
    elif isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    _check_length(x.shape[-1], "audio", min_samples, model_rate)
    x = x.to(device=device, dtype=torch.float32)
    batched = x.ndim == 2
    waves = list(x) if batched else [x]
    return PreparedAudio(waves, batched=batched, kind=kind)


def _check_length(n: int, what: str, min_samples: int, rate: int) -> None:
    if n < min_samples:
        raise ValueError(f"{what} is too short: {n} samples at {rate} Hz after resampling; the model needs at "
                         f"least {min_samples} samples ({1000 * min_samples / rate:.1f} ms). Pad it with zeros "
                         "if it is a genuinely short sound")


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------

def load_audio(path: str | os.PathLike, sample_rate: int | None = SAMPLE_RATE, mono: bool = True,
               channel: int | None = None) -> np.ndarray:
    """Read an audio file with soundfile and return float32 samples in [-1, 1].

    Formats: WAV, FLAC, OGG/Vorbis, Opus and MP3 (libsndfile >= 1.1), AIFF and the other libsndfile formats.
    Others (AAC/M4A, WMA, video files) can be converted first, e.g. ``ffmpeg -i in.m4a out.flac``.

    Args:
        path: the file.
        sample_rate: resample to this rate in Hz with soxr 'HQ'; None keeps the file's rate.
        mono: average the channels (shape [N]); False returns [channels, N].
        channel: take this channel (0-based) instead of averaging.
    Returns:
        float32 array [N] (mono or channel given) or [C, N].
    """
    import soundfile as sf

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"audio file not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory; pass a file, or use model.embed_files() for folders")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)  # (N, C)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"cannot decode audio file {p}: {e}. Readable formats: WAV, FLAC, OGG/Vorbis, Opus, MP3 "
                         "(and other libsndfile formats); convert others first, e.g. `ffmpeg -i IN OUT.flac`") from e
    if data.shape[0] == 0:
        raise ValueError(f"audio file {p} has no samples")
    if channel is not None:
        if not 0 <= channel < data.shape[1]:
            raise ValueError(f"channel={channel} but {p} has {data.shape[1]} channel(s)")
        x = data[:, channel]
    elif mono:
        x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    else:
        x = data.T
    x = np.ascontiguousarray(x, dtype=np.float32)
    if sample_rate is not None and sr != sample_rate:
        x = resample(x, sr, sample_rate)
    return x
