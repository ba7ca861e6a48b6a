"""Frozen configuration dataclasses. A converted model carries its ``ModelConfig`` as JSON next to the
weights, so loading never guesses from file names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrontEndConfig:
    """Log-mel front end (no learned parameters). Units: Hz and samples."""

    sample_rate: int = 16000  # model sample rate; inputs at other rates are resampled to it
    n_fft: int = 400  # FFT size (25 ms at 16 kHz)
    win_length: int = 400  # periodic Hann window length
    hop_length: int = 160  # 10 ms at 16 kHz: one log-mel frame per hop
    n_mels: int = 80  # Slaney-scale mel bands, Slaney area normalisation
    f_min: float = 50.0
    f_max: float = 8000.0
    norm_mean: float = -7.1  # log-mel statistics used as (x - mean) / std; from the checkpoint's norm_stats
    norm_std: float = 4.2

    @classmethod
    def for_rate(cls, sample_rate: int, **kw: Any) -> FrontEndConfig:
        """The upstream front end for a 16 kHz or 32 kHz model."""
        if sample_rate == 16000:
            return cls(**kw)
        if sample_rate == 32000:
            return cls(sample_rate=32000, n_fft=800, win_length=800, hop_length=320, f_max=16000.0, **kw)
        raise ValueError(f"unsupported model sample rate {sample_rate}; M2D models use 16000 or 32000")

    @property
    def min_samples(self) -> int:
        """Shortest input the centred STFT accepts (reflect padding needs more than n_fft // 2 samples)."""
        return self.n_fft // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        """Log-mel frames of ``num_samples`` samples (centred frames, one per hop)."""
        return 1 + num_samples // self.hop_length


@dataclass(frozen=True)
class EncoderConfig:
    """ViT audio encoder over a [n_mels, frames] log-mel image, one input channel."""

    input_size: tuple[int, int] = (80, 1001)  # (mel bins, frames per chunk) seen in training
    patch_size: tuple[int, int] = (16, 16)  # (frequency, time) patch
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency patches, time patches) of a full chunk, e.g. (5, 62)."""
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def chunk_frames(self) -> int:
        """Log-mel frames per chunk (the training width, 1001 for M2D2)."""
        return self.input_size[1]


@dataclass(frozen=True)
class AudioHeadConfig:
    """CLAP audio head. ``kind='semantic'``: M2D2 2025 AudioToSemantic (a learned token + transformer
    block(s) over all patch tokens); ``kind='mlp'``: M2D-CLAP 2024 (Linear-ReLU-Linear on the token mean)."""

    kind: str = "semantic"
    dim: int = 768
    out_dim: int = 768
    depth: int = 1
    num_heads: int = 1
    mlp_ratio: float = 1.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextConfig:
    """BERT-architecture text encoder (bert-base-uncased for M2D2 2025, GTE-base for 2024 'A' models)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pooling: str = "cls"  # "cls": last hidden state at [CLS]; "mean": mean over the attention mask
    proj_dim: int | None = None  # output size of a text_proj Linear, when the checkpoint has one


@dataclass(frozen=True)
class ClassifierConfig:
    """Task head over clip features (upstream EVAR's fine-tuning head, or ``m2d2_embed.train finetune``'s):
    an optional BatchNorm1d without affine parameters, then one Linear.

    State-dict keys: ``classifier.norm.running_mean`` / ``running_var`` (when ``norm``),
    ``classifier.linear.weight`` [num_classes, in_features] / ``bias`` [num_classes].
    """

    in_features: int = 768  # 768: time-averaged features averaged over frequency patches; f*768 (3840): stacked
    num_classes: int = 527
    norm: bool = True  # BatchNorm1d(affine=False) before the Linear (EVAR); False for our own fine-tuning head
    norm_eps: float = 1e-5
    labels: tuple[str, ...] | None = None  # class names in output order (None: "class_0", "class_1", ...)
    multi_label: bool = True  # AudioSet is multi-label: sigmoid scores by default


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model from its weights."""

    name: str = "m2d2"
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    audio_head: AudioHeadConfig | None = None
    text: TextConfig | None = None
    text_weights: str | None = (
        None  # where text weights live when not in the checkpoint (e.g. "hf://thenlper/gte-base")
    )
    classifier: ClassifierConfig | None = None  # task head (AudioSet tagging of fine-tuned models), when present

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_chunks(self, num_samples: int) -> int:
        """Encoder chunks of a clip of ``num_samples`` at the model's rate (the unit of ``batch_size``)."""
        return -(-self.frontend.num_frames(int(num_samples)) // self.encoder.chunk_frames)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"format_version"}
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; is this file from a newer m2d2_embed?")
        enc = dict(d.get("encoder") or {})
        for k in ("input_size", "patch_size"):
            if k in enc:
                enc[k] = tuple(enc[k])
        return cls(
            name=d.get("name", "m2d2"),
            frontend=FrontEndConfig(**(d.get("frontend") or {})),
            encoder=EncoderConfig(**enc),
            audio_head=AudioHeadConfig(**d["audio_head"]) if d.get("audio_head") else None,
            text=TextConfig(**d["text"]) if d.get("text") else None,
            text_weights=d.get("text_weights"),
            classifier=_classifier_from_dict(d.get("classifier")),
        )


def _classifier_from_dict(d: dict[str, Any] | None) -> ClassifierConfig | None:
    if not d:
        return None
    d = dict(d)
    if d.get("labels") is not None:
        d["labels"] = tuple(d["labels"])
    return ClassifierConfig(**d)
