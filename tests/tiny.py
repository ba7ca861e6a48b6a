"""Tiny models for fast tests: the real architecture at a small width (64-d heads, as upstream), saved in
our format or in the upstream checkpoint layouts (M2D2 2025, M2D-CLAP 2024, bare M2D encoder, fine-tuned EVAR)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from m2d2_embed.config import (
    AudioHeadConfig,
    ClassifierConfig,
    EncoderConfig,
    FrontEndConfig,
    ModelConfig,
    TextConfig,
)
from m2d2_embed.convert import save_model
from m2d2_embed.model import M2D2

UPSTREAM_2025 = "m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025"


def tiny_config(
    head: str | None = "semantic", text: bool = True, width: int = 1001, classifier: ClassifierConfig | None = None
) -> ModelConfig:
    return ModelConfig(
        name="tiny",
        frontend=FrontEndConfig(norm_mean=-7.26, norm_std=4.35),
        encoder=EncoderConfig(input_size=(80, width), embed_dim=64, depth=2, num_heads=1),
        audio_head=AudioHeadConfig(kind=head, dim=64, out_dim=64) if head else None,
        text=TextConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128) if text else None,
        classifier=classifier,
    )


def tiny_model(config: ModelConfig | None = None, seed: int = 0) -> M2D2:
    torch.manual_seed(seed)
    model = M2D2(config or tiny_config())
    with torch.no_grad():  # zero-initialised tokens/embeddings would hide ordering bugs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if model.classifier is not None and model.classifier.norm is not None:  # statistics like a trained head's
            model.classifier.norm.running_mean.normal_(0, 0.05)
            model.classifier.norm.running_var.uniform_(0.01, 0.1)
    return model.eval()


def save_tiny(dst: Path, config: ModelConfig | None = None, seed: int = 0) -> Path:
    model = tiny_model(config, seed)
    return save_model(model.state_dict(), model.config, dst)


def upstream_state_dict(model: M2D2, layout: str = "2025") -> dict[str, torch.Tensor]:
    """Our state dict -> the key layout of an upstream release."""
    sd = model.state_dict()
    stats = torch.tensor([model.config.frontend.norm_mean, model.config.frontend.norm_std])
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        if layout == "2025":
            key = {
                "encoder": "backbone.",
                "audio_proj": "backbone.audio_proj.",
                "text_encoder": "text_encoder.text_encoder.",
            }[head] + rest
        elif layout == "evar":
            key = "module.ar.runtime.backbone." + rest if head == "encoder" else None
        else:  # 2024 CLAP / bare M2D: keys at the root, no text encoder
            key = rest if head == "encoder" else (k if head == "audio_proj" else None)
        if key is not None:
            out[key] = v.clone()
    if layout == "2025":
        out["backbone.norm_stats"] = stats
    elif layout == "m2d":
        out["norm_stats"] = stats
    elif layout == "2024":  # training-only tensors a loader must drop
        out["target_blocks.0.norm1.weight"] = torch.ones(64)
        out["decoder_pred.weight"] = torch.zeros(8, 4)
        out["logit_scale"] = torch.tensor(2.6)
    return out


def save_upstream(
    dst_dir: Path, layout: str = "2025", folder: str = UPSTREAM_2025, seed: int = 0, config: ModelConfig | None = None
) -> tuple[Path, M2D2]:
    """Write ``dst_dir/folder/checkpoint-30.pth`` in an upstream layout; return it and the model it holds."""
    model = tiny_model(config or tiny_config(), seed)
    sd = upstream_state_dict(model, layout)
    path = Path(dst_dir) / folder / ("weights.pth" if layout == "m2d" else "checkpoint-30.pth")
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "m2d":
        torch.save(sd, path)
    else:
        torch.save(
            {
                "model": sd,
                "args": argparse.Namespace(
                    input_size=[80, model.config.encoder.input_size[1]], patch_size=[16, 16], sr="16k"
                ),
            },
            path,
        )
    return path, model
