"""Generated audio files for the files/CLI tests: several formats, rates and lengths, plus broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

# name -> (seconds, sample rate, channels, subtype)
GOOD = {
    "tone_0p5s.wav": (0.5, 16000, 1, "PCM_16"),
    "noise_3p3s.flac": (3.3, 44100, 2, "PCM_16"),
    "chirp_12s.ogg": (12.0, 22050, 1, "VORBIS"),
    "tone_1s_f32.wav": (1.0, 48000, 1, "FLOAT"),
}
BAD = ["corrupt.wav", "zero_length.wav", "zero_bytes.flac", "too_short.wav"]


def signal(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
    """A tone + chirp + noise mix, float32 [n, channels] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = 200.0 + 150.0 * seed
    x = 0.3 * np.sin(2 * np.pi * (f0 + 300.0 * t) * t) + 0.05 * rng.standard_normal(len(t))
    return np.stack([x * (0.8 + 0.2 * c) for c in range(channels)], axis=1).astype(np.float32)


def make_clip_folder(folder: Path, n: int) -> Path:
    """``n`` short mono 16-kHz WAVs (0.3 s and up) in ``folder``: many small files for resume and lock tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(folder / f"clip{i:02d}.wav", signal(0.3 + 0.01 * i, 16000, 1, i % 5), 16000)
    return folder


def make_audio_folder(root: Path) -> Path:
    """Write GOOD and BAD files (and a sub-folder with one more WAV, and a hidden file) into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, (secs, sr, ch, subtype)) in enumerate(GOOD.items()):
        sf.write(root / name, signal(secs, sr, ch, i), sr, subtype=subtype)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
    sf.write(root / "zero_length.wav", np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
    (root / "zero_bytes.flac").write_bytes(b"")
    sf.write(root / "too_short.wav", signal(0.005, 16000, 1, 9), 16000, subtype="PCM_16")  # 80 samples
    (root / "notes.txt").write_text("not audio")
    (root / ".hidden.wav").write_bytes(b"junk")
    sub = root / "sub"
    sub.mkdir(exist_ok=True)
    sf.write(sub / "nested_2s.wav", signal(2.0, 16000, 1, 7), 16000, subtype="PCM_16")
    return root


def good_paths(root: Path) -> list[str]:
    return sorted(str(root / n) for n in GOOD)
