"""Short model names -> the official release files. Weights are never bundled or re-hosted: their licence (NTT,
evaluation use) forbids redistribution, so they are downloaded from the official release URL."""

from __future__ import annotations

from dataclasses import dataclass

RELEASES = "https://github.com/nttcslab/m2d/releases/download"
LICENSE_URL = "https://github.com/nttcslab/m2d/blob/master/LICENSE.pdf"
LICENSE_SUMMARY = ("NTT license: the M2D weights may be used for research/evaluation only and may not be "
                   "redistributed; read the full terms before use")
DEFAULT_MODEL = "m2d2-clap-2025"
GTE_BASE = "hf://thenlper/gte-base/model.safetensors"  # MIT licence; BERT architecture, uncased WordPiece vocab


@dataclass(frozen=True)
class ModelInfo:
    name: str
    url: str  # official release zip
    member: str  # the checkpoint inside the zip (also the upstream folder name that carries sizes)
    sha256: str | None  # of the extracted checkpoint; None: recorded on first download, verified after
    size_mb: int  # approximate download size
    description: str
    kind: str  # "clap" (audio + text) or "audio" (encoder only)
    text_weights: str | None = None  # text encoder fetched separately (2024 'A' models: GTE-base from the Hub)


_MODELS = [
    ModelInfo("m2d2-clap-2025", f"{RELEASES}/v0.5.0/m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025.zip",
              "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025/checkpoint-30.pth",
              "238521603c04862ab151cdd80980b591cb36ebe844d43203992fac9ef085c8a1", 1500,
              "M2D2 (M2D-CLAP 2025): ViT-B audio encoder, AudioToSemantic head, BERT-base text encoder", "clap"),
    ModelInfo("m2d-clap-2024", f"{RELEASES}/v0.3.0/m2d_clap_vit_base-80x608p16x16-240128.zip",
              "m2d_clap_vit_base-80x608p16x16-240128/checkpoint-300.pth", None, 1200,
              "M2D-CLAP 2024: ViT-B audio encoder, MLP audio head, GTE-base text encoder (from the Hub)", "clap",
              text_weights=GTE_BASE),
    ModelInfo("m2d-as-2024", f"{RELEASES}/v0.3.0/m2d_as_vit_base-80x608p16x16-240213.zip",
              "m2d_as_vit_base-80x608p16x16-240213/checkpoint-300.pth", None, 1000,
              "M2D-AS: M2D further trained with AudioSet labels (audio encoder only)", "audio"),
    ModelInfo("m2d-2022-mr7", f"{RELEASES}/v0.1.0/m2d_vit_base-80x608p16x16-221006-mr7_enconly.zip",
              "m2d_vit_base-80x608p16x16-221006-mr7_enconly/weights.pth", None, 330,
              "M2D (ICASSP 2023), masking ratio 0.7, encoder only", "audio"),
    ModelInfo("m2d-2022-mr6", f"{RELEASES}/v0.1.0/m2d_vit_base-80x608p16x16-221006-mr6_enconly.zip",
              "m2d_vit_base-80x608p16x16-221006-mr6_enconly/weights.pth", None, 330,
              "M2D (ICASSP 2023), masking ratio 0.6, encoder only", "audio"),
]
MODELS: dict[str, ModelInfo] = {m.name: m for m in _MODELS}


def available_models() -> list[str]:
    """Names accepted by :func:`m2d2_embed.load` (the default first)."""
    return list(MODELS)


def get(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)} (or pass a local .pth/.safetensors "
                         "path, a directory, an http(s) URL or hf://owner/repo)") from None


def models_with_classifier() -> list[str]:
    """Registry names of the models that carry a classifier head (tagging)."""
    return [m.name for m in _MODELS if getattr(m, "config", None) is not None and m.config.classifier is not None]
