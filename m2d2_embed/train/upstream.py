"""Upstream (github nttcslab/m2d) pre-training checkpoints: the training-only tensors that further
pre-training continues from, and the way back from a trained stage to that layout.

An upstream M2D / M2D-CLAP pre-training checkpoint (``checkpoint-300.pth`` of the releases marked "Fur-PT
Ready") holds, at the root of ``ckpt['model']`` (optionally under ``module.``): the online encoder
(``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``, sometimes ``norm_stats``), the
predictor (``decoder_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.*``,
``decoder_norm.*``, ``decoder_pred.*``), the EMA target (``target_blocks.*``, ``target_norm.*``) and, for
M2D-CLAP, ``audio_proj.*``, ``text_proj.*`` (absent when it is an Identity) and ``logit_scale``.
``m2d2_embed.convert`` reads the runtime part; this module maps the rest onto the stage 1 model.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# upstream key prefix -> Stage1Model key prefix (whole names for the un-dotted ones)
_PREFIX_MAP = (
    ("decoder_embed.", "m2d.predictor.embed."),
    ("decoder_blocks.", "m2d.predictor.blocks."),
    ("decoder_norm.", "m2d.predictor.norm."),
    ("decoder_pred.", "m2d.predictor.proj."),
    ("target_blocks.", "m2d.target.blocks."),
    ("target_norm.", "m2d.target.norm."),
    ("text_proj.", "text_proj."),
)
_NAME_MAP = {
    "mask_token": "m2d.predictor.mask_token",
    "decoder_pos_embed": "m2d.predictor.pos_embed",
    "logit_scale": "logit_scale.value",
}
_ENCODER_TOP = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def stage1_key(upstream_key: str) -> str | None:
    """The ``Stage1Model`` state-dict key of an upstream training-only tensor, or None when the key is not
    one (encoder, audio head, norm_stats and unknown keys)."""
    if upstream_key in _NAME_MAP:
        return _NAME_MAP[upstream_key]
    for src, dst in _PREFIX_MAP:
        if upstream_key.startswith(src):
            return dst + upstream_key[len(src) :]
    return None


def upstream_key(stage1_key_: str) -> str | None:
    """Inverse of ``stage1_key``: a ``Stage1Model`` key of the predictor, target, text_proj or logit scale
    -> its upstream name; None for other keys."""
    for src, dst in _NAME_MAP.items():
        if stage1_key_ == dst:
            return src
    for src, dst in _PREFIX_MAP:
        if stage1_key_.startswith(dst):
            return src + stage1_key_[len(dst) :]
    return None


@dataclass
class TrainingState:
    """Training-only tensors of a checkpoint, keyed as ``Stage1Model`` keys, and the predictor geometry
    they imply (None when the checkpoint has no predictor)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    predictor_dim: int | None = None
    predictor_depth: int | None = None
    epoch: int | None = None

    def groups(self) -> list[str]:
        """Which parts are present: 'predictor', 'target', 'text_proj', 'logit_scale'."""
        names = {"m2d.predictor.": "predictor", "m2d.target.": "target", "text_proj.": "text_proj"}
        found = {g for p, g in names.items() if any(k.startswith(p) for k in self.tensors)}
        if "logit_scale.value" in self.tensors:
            found.add("logit_scale")
        return sorted(found)


def read_training_state(path: str | os.PathLike) -> TrainingState:
    """The training-only tensors of an upstream ``.pth`` (empty for our safetensors format, which keeps
    only what inference needs). Loaded without executing code (``m2d2_embed.convert.read_pth``)."""
    from ..convert import read_pth

    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return TrainingState()
    obj = read_pth(path)
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k[len("module.") :] if k.startswith("module.") else k
        ours = stage1_key(k)
        if ours is not None:
            out[ours] = v.detach().clone().float()
    depth = {int(m[1]) for k in out if (m := re.match(r"m2d\.predictor\.blocks\.(\d+)\.", k))}
    w = out.get("m2d.predictor.embed.weight")
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    return TrainingState(out, int(w.shape[0]) if w is not None else None, (max(depth) + 1) if depth else None, epoch)


def load_training_state(model: nn.Module, state: TrainingState) -> dict[str, list[str]]:
    """Copy ``state`` into a ``Stage1Model`` (parameters and the predictor's position buffer). A shape that
    does not fit is an error; parts absent from ``state`` keep their fresh values.

    Returns {"loaded": [...], "fresh": [...]}: groups among predictor, target, text_proj and logit_scale.
    """
    own = dict(model.state_dict(keep_vars=True))
    own["m2d.predictor.pos_embed"] = model.m2d.predictor.pos_embed  # non-persistent buffer
    for k, v in state.tensors.items():
        if k.startswith("text_proj.") and not any(o.startswith("text_proj.") for o in own):
            raise ValueError(
                f"the checkpoint has a text_proj Linear {tuple(v.shape)} but this model's text_proj is an Identity "
                "(caption embeddings as wide as the audio head); use caption embeddings of the checkpoint's width"
            )
        if k not in own:
            raise ValueError(f"checkpoint tensor for {k} has no place in the stage 1 model; is its predictor larger?")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{k}: checkpoint shape {tuple(v.shape)} does not fit the model's {tuple(own[k].shape)}; "
                "set m2d.predictor_dim / predictor_depth and the caption embedding width to the checkpoint's"
            )
    missing = [
        k
        for k in own
        if stage1_key_group(k) in state.groups() and k not in state.tensors and k != "m2d.predictor.pos_embed"
    ]
    if missing:
        raise ValueError(f"checkpoint has a partial {stage1_key_group(missing[0])}: {missing[:4]} missing")
    with torch.no_grad():
        for k, v in state.tensors.items():
            own[k].copy_(v.to(own[k].dtype))
    present = state.groups()
    wanted = ["predictor", "target"] + (["logit_scale"] if "logit_scale.value" in own else [])
    wanted += ["text_proj"] if any(k.startswith("text_proj.") for k in own) else []
    return {"loaded": present, "fresh": [g for g in wanted if g not in present]}


def stage1_key_group(key: str) -> str | None:
    """'predictor', 'target', 'text_proj', 'logit_scale' or None for a ``Stage1Model`` key."""
    if key.startswith("m2d.predictor."):
        return "predictor"
    if key.startswith("m2d.target."):
        return "target"
    if key.startswith("text_proj."):
        return "text_proj"
    if key == "logit_scale.value":
        return "logit_scale"
    return None


def release_name(model_config: Any, kind: str = "m2d_clap", suffix: str = "m2d2embed") -> str:
    """An upstream-style folder name, e.g. ``m2d_clap_vit_base-80x608p16x16p16k-m2d2embed``: upstream's and
    EVAR's loaders read the input size, patch size and sample rate from it (``vit_base`` is what they build;
    other widths are named ``vit_<D>d<depth>``, which only m2d2_embed reads)."""
    e, sr = model_config.encoder, model_config.frontend.sample_rate
    arch = "vit_base" if (e.embed_dim, e.depth) == (768, 12) else f"vit_{e.embed_dim}d{e.depth}"
    return (
        f"{kind}_{arch}-{e.input_size[0]}x{e.input_size[1]}p{e.patch_size[0]}x{e.patch_size[1]}p{sr // 1000}k-{suffix}"
    )


def upstream_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A stage model's tensors in upstream's layout.

    Stage 1 (``Stage1Model``): the full pre-training layout (encoder, ``norm_stats``, predictor, target,
    ``audio_proj``, ``text_proj`` unless Identity, ``logit_scale``), what further pre-training and
    upstream's ``RuntimeM2D`` read. Other stages (an ``encoder`` and optionally ``audio_proj`` and
    ``text_encoder``): the M2D2 2025 layout (``backbone.*``, ``backbone.audio_proj.*``,
    ``text_encoder.text_encoder.*``) when there is a text encoder, else encoder and head at the root.
    """
    fe = model.model_config.frontend
    stats = torch.tensor([fe.norm_mean, fe.norm_std], dtype=torch.float32)
    enc = dict(model.encoder.state_dict())
    proj = getattr(model, "audio_proj", None)
    head = dict(proj.state_dict()) if proj is not None else {}
    out: dict[str, torch.Tensor] = {}
    text = getattr(model, "text_encoder", None)
    if text is not None:
        out.update({f"backbone.{k}": v for k, v in enc.items()})
        out["backbone.norm_stats"] = stats
        out.update({f"backbone.audio_proj.{k}": v for k, v in head.items()})
        for k, v in text.state_dict().items():
            out[k if k.startswith("text_proj.") else f"text_encoder.text_encoder.{k}"] = v
    else:
        out.update(enc)
        out["norm_stats"] = stats
        out.update({f"audio_proj.{k}": v for k, v in head.items()})
    if hasattr(model, "m2d"):
        sd = dict(model.state_dict())
        sd["m2d.predictor.pos_embed"] = model.m2d.predictor.pos_embed
        for k, v in sd.items():
            u = upstream_key(k)
            if u is not None:
                out[u] = v
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in out.items()}


def write_upstream_checkpoint(
    model: nn.Module, dst: str | os.PathLike, epoch: int = 0, args: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (a stage model) as an upstream ``.pth``: ``{'model': tensors, 'epoch', 'args'}`` with
    ``args`` an ``argparse.Namespace`` holding ``input_size``, ``patch_size``, ``sr`` (and ``decoder_depth``,
    ``norm_stats``); the write is atomic. ``dst``: a ``.pth`` path, or a folder in which an upstream-style
    release folder (``release_name``) receives ``checkpoint-<epoch>.pth``. Returns the file's path."""
    from ..outputs import atomic_write

    cfg = model.model_config
    dst = Path(dst)
    if dst.suffix != ".pth":
        kind = "m2d_clap" if getattr(model, "audio_proj", None) is not None else "m2d"
        dst = dst / release_name(cfg, kind) / f"checkpoint-{epoch}.pth"
    e = cfg.encoder
    ns = argparse.Namespace(
        model=dst.parent.name.split("-")[0],
        input_size=list(e.input_size),
        patch_size=list(e.patch_size),
        sr=f"{cfg.frontend.sample_rate // 1000}k",
        norm_stats=[cfg.frontend.norm_mean, cfg.frontend.norm_std],
        **({"decoder_depth": len(model.m2d.predictor.blocks)} if hasattr(model, "m2d") else {}),
        **(args or {}),
    )
    obj = {"model": upstream_state_dict(model), "epoch": int(epoch), "args": ns}
    atomic_write(dst, lambda p: torch.save(obj, p))
    log.info("wrote the upstream-layout checkpoint %s (%d tensors)", dst, len(obj["model"]))
    return dst
