"""The HEAR 2021 common API (https://hearbenchmark.com/hear-api.html) for M2D2.

    from m2d2_embed import hear
    model = hear.load_model("m2d2-clap-2025")            # or a local checkpoint path
    scene = hear.get_scene_embeddings(audio, model)      # audio: float32 [n_sounds, n_samples] at 16 kHz
    frames, ts = hear.get_timestamp_embeddings(audio, model)

Which embeddings, and why: the same as the upstream M2D runtime (``portable_m2d.py``) that the M2D papers use
for their HEAR evaluations, so results are comparable with the published ones. Both come from the encoder,
not from the CLAP projection:

- timestamp embeddings: one per 160 ms step, the last encoder layer's 5 frequency patches averaged (768-d);
- scene embeddings: the frame embeddings with the 5 frequency patches stacked (3840-d), averaged over time.

Linear probes do better on these than on the 768-d CLAP audio embedding, which is trained to match captions
and drops information that non-semantic tasks (pitch, speaker, ...) need. Timestamps are the centre of the
log-mel frames each step covers, in milliseconds (the upstream runtime spreads steps evenly from 0 instead).
``load_model(..., scene_embedding="clap")`` gives CLAP scene embeddings (768-d); ``timestamp_reduce`` and
``scene_reduce`` choose between averaged (768-d) and stacked (3840-d) frequency patches.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .model import M2D2


class HearModel(nn.Module):
    """An M2D2 model with the attributes the HEAR API requires.

    Attributes:
        sample_rate: 16000 (Hz) for M2D2; audio must be at this rate.
        scene_embedding_size: D of ``get_scene_embeddings`` (3840 by default).
        timestamp_embedding_size: D of ``get_timestamp_embeddings`` (768 by default).
    """

    def __init__(
        self,
        model: M2D2,
        *,
        timestamp_reduce: str = "mean",
        scene_reduce: str = "none",
        scene_embedding: str = "encoder",
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("timestamp_reduce", timestamp_reduce), ("scene_reduce", scene_reduce)):
            if value not in ("none", "mean"):
                raise ValueError(f"{name} must be 'none' (stacked, 3840-d) or 'mean' (768-d), got {value!r}")
        if scene_embedding not in ("encoder", "clap"):
            raise ValueError(f"scene_embedding must be 'encoder' or 'clap', got {scene_embedding!r}")
        if scene_embedding == "clap":
            model.check_level("clap")
        self.m2d2 = model
        self.timestamp_reduce = timestamp_reduce
        self.scene_reduce = scene_reduce
        self.scene_embedding = scene_embedding
        self.batch_size = batch_size
        self.sample_rate: int = model.sample_rate
        self.timestamp_embedding_size: int = model.output_dim("frame", timestamp_reduce)
        self.scene_embedding_size: int = model.output_dim("clap" if scene_embedding == "clap" else "clip", scene_reduce)

    @property
    def device(self) -> torch.device:
        return self.m2d2.device


def load_model(
    model_file_path: str = "",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    timestamp_reduce: str = "mean",
    scene_reduce: str = "none",
    scene_embedding: str = "encoder",
    batch_size: int | None = None,
    backend: str | None = None,
) -> HearModel:
    """Load M2D2 for the HEAR API.

    Args:
        model_file_path: a registry name, a local upstream ``.pth``, a converted ``.safetensors`` file or
            directory, or ``""`` for the default model (``m2d2-clap-2025``).
        device: default CUDA when available. dtype: default bfloat16 on CUDA, float32 on CPU.
        timestamp_reduce: ``"mean"`` (default, upstream): frequency patches averaged, 768-d;
            ``"none"``: stacked, 3840-d.
        scene_reduce: ``"none"`` (default, upstream): stacked, 3840-d; ``"mean"``: 768-d.
        scene_embedding: ``"encoder"`` (default): the time-mean of the frame embeddings; ``"clap"``: the 768-d
            CLAP audio embedding.
        batch_size: most 10-s chunks per encoder pass (default 32 on CPU, 256 on CUDA).
        backend: who runs the audio encoder, as for :func:`m2d2_embed.load` (``"onnxruntime"`` / ``"openvino"``:
            CPU only; the export is cached in ``$M2D2_EMBED_CACHE``).
    """
    from .loader import load

    model = load(os.fspath(model_file_path) or None, device=device, dtype=dtype, backend=backend)
    return HearModel(
        model,
        timestamp_reduce=timestamp_reduce,
        scene_reduce=scene_reduce,
        scene_embedding=scene_embedding,
        batch_size=batch_size,
    )


def _check_audio(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    if not isinstance(model, HearModel):
        raise TypeError(f"model must come from m2d2_embed.hear.load_model(), got {type(model).__name__}")
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a float32 torch.Tensor [n_sounds, n_samples], got {type(audio).__name__}")
    if audio.ndim != 2:
        raise ValueError(f"audio must have shape [n_sounds, n_samples], got {tuple(audio.shape)}")
    return audio.float()


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame embeddings and their times.

    Args:
        audio: float32 [n_sounds, n_samples] at ``model.sample_rate``, on the model's device.
        model: from :func:`load_model`.
    Returns:
        (embeddings [n_sounds, T, timestamp_embedding_size] float32, timestamps [n_sounds, T] float32 in
        milliseconds, the centre of the log-mel frames each embedding covers), on the model's device.
    """
    x = _check_audio(audio, model)
    m = model.m2d2
    if x.shape[0] == 0:
        T = m.num_frames_for(x.shape[1]) if x.shape[1] else 0
        return (torch.zeros(0, T, model.timestamp_embedding_size, device=m.device), torch.zeros(0, T, device=m.device))
    emb = m.frame_embeddings(
        x, sample_rate=model.sample_rate, reduce=model.timestamp_reduce, batch_size=model.batch_size
    )
    ts = torch.as_tensor(m.frame_timestamps(x.shape[1]) * 1000.0, dtype=torch.float32, device=emb.device)
    return emb, ts.expand(x.shape[0], -1).contiguous()


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """One embedding per sound: float32 [n_sounds, scene_embedding_size] on the model's device.

    Args:
        audio: float32 [n_sounds, n_samples] at ``model.sample_rate``, on the model's device.
        model: from :func:`load_model`.
    """
    x = _check_audio(audio, model)
    m = model.m2d2
    if x.shape[0] == 0:
        return torch.zeros(0, model.scene_embedding_size, device=m.device)
    if model.scene_embedding == "clap":
        return m.clap_audio_embeddings(x, sample_rate=model.sample_rate, batch_size=model.batch_size)
    return m.clip_embeddings(x, sample_rate=model.sample_rate, reduce=model.scene_reduce, batch_size=model.batch_size)
