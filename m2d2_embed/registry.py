"""Short model names -> the official release files, each with the full configuration of the model it holds.

Weights are never bundled or re-hosted: their licence (NTT, evaluation use) forbids redistribution, so they are
downloaded from the official release URL. The table follows the release tables of upstream's README
(github.com/nttcslab/m2d) and the v0.5.0 release (M2D2 / M2D-CLAP 2025); "best for" follows upstream's own
recommendation column. Because every entry carries its ``ModelConfig`` (front end, patch size, chunk width, heads),
building a registry model never parses a folder name.

Download sizes are approximate (the release pages are the reference).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from .config import AudioHeadConfig, ClassifierConfig, EncoderConfig, FrontEndConfig, ModelConfig, TextConfig

RELEASES = "https://github.com/nttcslab/m2d/releases/download"
LICENSE_URL = "https://github.com/nttcslab/m2d/blob/master/LICENSE.pdf"
LICENSE_SUMMARY = (
    "NTT license: the M2D weights may be used for research/evaluation only and may not be "
    "redistributed; read the full terms before use"
)
DEFAULT_MODEL = "m2d2-clap-2025"
GTE_BASE = "hf://thenlper/gte-base/model.safetensors"  # MIT licence; BERT architecture, uncased WordPiece vocab

# What upstream recommends each weight for (its README's "Recommendation" column, shortened).
GENERAL = "general purpose"
TAGGING = "AT/SED"
SPEECH = "speech"
RATE_32K = "32 kHz"
CLAP = "CLAP"


@lru_cache(maxsize=1)
def audioset_labels() -> tuple[str, ...]:
    """The 527 AudioSet class display names in the output order of upstream's AudioSet heads.

    EVAR (upstream's fine-tuning code) one-hot encodes the label ``mid``s with scikit-learn's
    ``MultiLabelBinarizer``, whose classes are sorted, so output ``i`` is the ``i``-th class in ``mid`` order;
    upstream's tagging example sorts ``class_labels_indices.csv`` by ``mid`` for the same reason. The shipped
    ``assets/audioset_labels.csv`` is in that order (column ``audioset_index`` keeps AudioSet's own index).
    Source: AudioSet ontology, Google, CC BY 4.0 (see NOTICE).
    """
    text = resources.files("m2d2_embed").joinpath("assets/audioset_labels.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    if [int(r["index"]) for r in rows] != list(range(527)):
        raise RuntimeError("assets/audioset_labels.csv is damaged: expected indices 0..526; reinstall m2d2-embed")
    return tuple(r["display_name"] for r in rows)


@dataclass(frozen=True)
class ModelInfo:
    """One published weight file.

    ``member`` is the checkpoint inside the zip where upstream's files name it; None takes the archive's only
    checkpoint. ``sha256`` is of that extracted checkpoint; None: not pinned (the converted weights get a
    recorded hash once conversion succeeded). ``config`` is the model it holds; None only for entries added at
    run time (then the configuration is inferred from the checkpoint, with the folder name as a last resort).
    """

    name: str
    url: str  # official release zip
    member: str | None  # checkpoint inside the zip; None: the only .pth/.safetensors in it
    sha256: str | None  # of the extracted checkpoint
    size_mb: int  # approximate download size
    description: str
    kind: str  # "clap" (audio + text), "audio" (encoder only) or "tagging" (encoder + AudioSet head)
    text_weights: str | None = None  # text encoder fetched separately (2024 'A' models: GTE-base from the Hub)
    config: ModelConfig | None = None
    best_for: str = GENERAL  # upstream's recommendation: general purpose, AT/SED, speech, 32 kHz, CLAP

    @property
    def frame_ms(self) -> float | None:
        """Time between frame embeddings in milliseconds (160, 40 or 20), from the config."""
        if self.config is None:
            return None
        fe, enc = self.config.frontend, self.config.encoder
        return 1000.0 * enc.patch_size[1] * fe.hop_length / fe.sample_rate

    @property
    def dims(self) -> dict[str, int]:
        """Embedding widths: ``frame``/``clip`` (stacked frequency patches), ``clap``, ``classes``."""
        if self.config is None:
            return {}
        enc = self.config.encoder
        out = {"frame": enc.grid[0] * enc.embed_dim}
        out["clip"] = out["frame"]
        if self.config.audio_head is not None:
            out["clap"] = self.config.audio_head.out_dim
        if self.config.classifier is not None:
            out["classes"] = self.config.classifier.num_classes
        return out


def _config(
    name: str,
    width: int,
    patch: tuple[int, int] = (16, 16),
    rate: int = 16000,
    *,
    head: AudioHeadConfig | None = None,
    text: TextConfig | None = None,
    text_weights: str | None = None,
    classifier: ClassifierConfig | None = None,
) -> ModelConfig:
    """A ViT-Base M2D over 80 mel bins. Norm statistics: the checkpoint's ``norm_stats`` replace these defaults."""
    return ModelConfig(
        name=name,
        frontend=FrontEndConfig.for_rate(rate),
        encoder=EncoderConfig(input_size=(80, width), patch_size=patch),
        audio_head=head,
        text=text,
        text_weights=text_weights,
        classifier=classifier,
    )


_SEMANTIC = AudioHeadConfig(kind="semantic", dim=768, out_dim=768, depth=1, num_heads=1, mlp_ratio=1.0)
_MLP = AudioHeadConfig(kind="mlp", dim=768, out_dim=768)
_BERT = TextConfig()  # bert-base-uncased, [CLS] pooling
_GTE = TextConfig(pooling="mean")  # GTE-base: BERT-base size, mean pooling; weights from the Hub


def _audioset_head(in_features: int = 3840) -> ClassifierConfig:
    # EVAR's fine-tuning head: BatchNorm1d(affine=False) + Linear over features stacked from the 5 frequency
    # patches (its default, flat_features False); a head of another width is taken from the weights' shape.
    return ClassifierConfig(
        in_features=in_features, num_classes=527, norm=True, labels=audioset_labels(), multi_label=True
    )


def _entry(
    name: str,
    release: str,
    folder: str,
    member: str | None,
    size_mb: int,
    description: str,
    kind: str,
    best_for: str,
    config: ModelConfig,
    sha256: str | None = None,
    text_weights: str | None = None,
) -> ModelInfo:
    return ModelInfo(
        name,
        f"{RELEASES}/{release}/{folder}.zip",
        f"{folder}/{member}" if member else None,
        sha256,
        size_mb,
        description,
        kind,
        text_weights=text_weights,
        config=config,
        best_for=best_for,
    )


_MODELS = [
    # -- M2D2 / M2D-CLAP 2025 (release v0.5.0) ------------------------------------------------------------------
    _entry(
        "m2d2-clap-2025",
        "v0.5.0",
        "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025",
        "checkpoint-30.pth",
        1500,
        "M2D2 (M2D-CLAP 2025): ViT-B audio encoder, AudioToSemantic head, BERT-base text encoder",
        "clap",
        f"{CLAP}, {GENERAL}",
        _config("m2d2-clap-2025", 1001, head=_SEMANTIC, text=_BERT),
        sha256="238521603c04862ab151cdd80980b591cb36ebe844d43203992fac9ef085c8a1",
    ),
    _entry(
        "m2d2-clap-2025-20ms",
        "v0.5.0",
        "m2d_clap_vit_base-80x1001p80x2p16kpBpTI-2025",
        None,
        1500,
        "M2D2 (M2D-CLAP 2025) with 80x2 patches: 20-ms frames of 768-d, AudioToSemantic head, BERT-base text",
        "clap",
        f"{CLAP}, {GENERAL} (fine time resolution)",
        _config("m2d2-clap-2025-20ms", 1001, (80, 2), head=_SEMANTIC, text=_BERT),
    ),
    # -- AudioSet (AS2M) fine-tuned encoders: upstream's best for audio tagging / sound event detection ---------
    _entry(
        "m2d-clap-2024-tagging",
        "v0.3.0",
        "m2d_clap_vit_base-80x1001p16x16-240128_AS-FT_enconly",
        None,
        350,
        "M2D-CLAP 2024 fine-tuned on AudioSet-2M (mAP 0.485)",
        "tagging",
        f"{TAGGING} (best)",
        _config("m2d-clap-2024-tagging", 1001, classifier=_audioset_head()),
    ),
    _entry(
        "m2d-as-2024-tagging",
        "v0.3.0",
        "m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly",
        "weights_ep69it3124-0.48494.pth",
        350,
        "M2D-AS fine-tuned on AudioSet-2M (mAP 0.485)",
        "tagging",
        f"{TAGGING} (2nd best)",
        _config("m2d-as-2024-tagging", 1001, classifier=_audioset_head()),
    ),
    _entry(
        "m2d-2022-tagging",
        "v0.3.0",
        "m2d_vit_base-80x1001p16x16-221006-mr7_as_46ab246d",
        "weights_ep69it3124-0.47929.pth",
        350,
        "M2D/0.7 fine-tuned on AudioSet-2M (mAP 0.479)",
        "tagging",
        f"{TAGGING} (3rd best)",
        _config("m2d-2022-tagging", 1001, classifier=_audioset_head()),
    ),
    # -- pre-trained on AudioSet (16 kHz) -------------------------------------------------------------------
    _entry(
        "m2d-2023-40ms",
        "v0.1.0",
        "m2d_vit_base-80x200p16x4-230529",
        "checkpoint-300.pth",
        1600,
        "M2D/0.7 with 16x4 patches: 40-ms frames, 2-s chunks",
        "audio",
        f"{GENERAL} (finer time frames)",
        _config("m2d-2023-40ms", 200, (16, 4)),
    ),
    _entry(
        "m2d-clap-2024",
        "v0.1.0",
        "m2d_clap_vit_base-80x608p16x16-240128",
        None,
        1200,
        "M2D-CLAP 2024: ViT-B audio encoder, MLP audio head, GTE-base text encoder (from the Hub)",
        "clap",
        f"{CLAP}, {GENERAL} (AudioSet-like data)",
        _config("m2d-clap-2024", 608, head=_MLP, text=_GTE, text_weights=GTE_BASE),
        text_weights=GTE_BASE,
    ),
    _entry(
        "m2d-as-2024",
        "v0.1.0",
        "m2d_as_vit_base-80x608p16x16-240213",
        None,
        1000,
        "M2D-AS: M2D further trained with AudioSet labels",
        "audio",
        f"{GENERAL} (AudioSet-like data)",
        _config("m2d-as-2024", 608),
    ),
    _entry(
        "m2d-2022-mr7",
        "v0.1.0",
        "m2d_vit_base-80x608p16x16-221006-mr7_enconly",
        None,
        330,
        "M2D (ICASSP 2023), masking ratio 0.7, encoder only",
        "audio",
        GENERAL,
        _config("m2d-2022-mr7", 608),
    ),
    _entry(
        "m2d-2022-mr7-full",
        "v0.1.0",
        "m2d_vit_base-80x608p16x16-221006-mr7",
        "checkpoint-300.pth",
        1600,
        "M2D (ICASSP 2023), masking ratio 0.7, full pre-training checkpoint",
        "audio",
        f"{GENERAL} (and further pre-training)",
        _config("m2d-2022-mr7-full", 608),
    ),
    _entry(
        "m2d-2022-mr6",
        "v0.1.0",
        "m2d_vit_base-80x608p16x16-221006-mr6",
        None,
        1600,
        "M2D (ICASSP 2023), masking ratio 0.6, full pre-training checkpoint",
        "audio",
        f"{GENERAL} (and further pre-training)",
        _config("m2d-2022-mr6", 608),
    ),
    _entry(
        "m2d-2022-mr7-220930",
        "v0.1.0",
        "m2d_vit_base-80x608p16x16-220930-mr7_enconly",
        None,
        330,
        "M2D/0.7 of 2022-09-30 (an earlier run), encoder only",
        "audio",
        GENERAL,
        _config("m2d-2022-mr7-220930", 608),
    ),
    # -- 32 kHz --------------------------------------------------------------------------------------------
    _entry(
        "m2d-as-2024-32k-tagging",
        "v0.3.0",
        "m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly",
        None,
        350,
        "M2D-AS at 32 kHz fine-tuned on AudioSet-2M (mAP 0.480)",
        "tagging",
        f"{TAGGING} at {RATE_32K} (best)",
        _config("m2d-as-2024-32k-tagging", 1001, rate=32000, classifier=_audioset_head()),
    ),
    _entry(
        "m2d-as-2024-32k",
        "v0.1.0",
        "m2d_as_vit_base-80x608p16x16p32k-240413_enconly",
        None,
        330,
        "M2D-AS at 32 kHz, encoder only",
        "audio",
        f"{GENERAL} at {RATE_32K}",
        _config("m2d-as-2024-32k", 608, rate=32000),
    ),
    # -- LibriSpeech (M2D-S): 80x2 patches, 20-ms frames of 768-d ------------------------------------------
    _entry(
        "m2d-s-2023-6s",
        "v0.2.0",
        "m2d_s_vit_base-80x608p80x2-230220",
        "checkpoint-1000.pth",
        1600,
        "M2D-S/0.6 (speech), 6-s input",
        "audio",
        f"{SPEECH} (and further pre-training)",
        _config("m2d-s-2023-6s", 608, (80, 2)),
    ),
    _entry(
        "m2d-s-2023-5s",
        "v0.2.0",
        "m2d_s_vit_base-80x512p80x2-230301",
        None,
        1600,
        "M2D-S/0.6 (speech), 5-s input",
        "audio",
        f"{SPEECH} (and further pre-training)",
        _config("m2d-s-2023-5s", 512, (80, 2)),
    ),
    _entry(
        "m2d-s-2023-4s",
        "v0.2.0",
        "m2d_s_vit_base-80x400p80x2-230201",
        None,
        1600,
        "M2D-S/0.6 (speech), 4-s input",
        "audio",
        f"{SPEECH} (and further pre-training)",
        _config("m2d-s-2023-4s", 400, (80, 2)),
    ),
]
MODELS: dict[str, ModelInfo] = {m.name: m for m in _MODELS}


def available_models() -> list[str]:
    """Names accepted by :func:`m2d2_embed.load` (the default first)."""
    return list(MODELS)


def tagging_models() -> list[str]:
    """Registry names whose weights carry an AudioSet classification head (for ``tag()``)."""
    return [m.name for m in MODELS.values() if m.config is not None and m.config.classifier is not None]


def get(name: str) -> ModelInfo:
    """The registry entry ``name``; ValueError listing the available names if unknown."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(MODELS)} (or pass a local .pth/.safetensors "
            "path, a directory, an http(s) URL or hf://owner/repo)"
        ) from None
