"""The only place that knows upstream checkpoint layouts.

Upstream ``.pth`` files -> our state dict (``encoder.*``, ``audio_proj.*``, ``text_encoder.*``) plus a
``ModelConfig`` inferred from tensor shapes; and our own format: ``model.safetensors`` + ``config.json``
in a directory, or a single ``.safetensors`` file carrying the config JSON in its metadata.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import AudioHeadConfig, EncoderConfig, FrontEndConfig, ModelConfig, TextConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_NORM_STATS = (-7.1, 4.2)  # upstream fallback for weights without norm_stats
HEAD_DIM = 64  # heads are not visible in shapes: ViT-B and BERT-base use 64-d heads

# Prefixes stripped from upstream keys, in order: fine-tuned (EVAR) checkpoints, DDP, M2D2 2025.
_PREFIXES = ("module.ar.runtime.backbone.", "module.")
_ENCODER_TOP = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit any known layout."""


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def read_pth(path: str | os.PathLike) -> dict[str, Any]:
    """Load an upstream ``.pth`` without executing code: ``weights_only=True`` with only
    ``argparse.Namespace`` (present in the official files) allowed besides tensors and containers."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors and argparse.Namespace, so it was not loaded (unpickling "
            f"untrusted files can run code). Details: {str(e).splitlines()[0]}. If you trust the file, load it "
            "yourself and pass its state dict to m2d2_embed.convert.from_state_dict()") from e
    except RuntimeError as e:
        if "mmap" in str(e) or "zip" in str(e).lower():  # legacy (non-zip) serialization cannot be mmapped
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def _upstream_name(path: Path) -> str:
    """The upstream release folder name, e.g. ``m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025``."""
    return path.parent.name if path.suffix == ".pth" else path.stem


def _parse_upstream_name(name: str) -> dict[str, Any]:
    """Sizes written in an upstream folder name: ``<model>-<F>x<T>p<ph>x<pw>[p<sr>k...]-<date>``."""
    m = re.match(r"^[^-]+-(\d+)x(\d+)p(\d+)x(\d+)(?:p(16|32)k)?", name)
    if not m:
        return {}
    out: dict[str, Any] = {"input_size": (int(m[1]), int(m[2])), "patch_size": (int(m[3]), int(m[4]))}
    if m[5]:
        out["sample_rate"] = int(m[5]) * 1000
    return out


# ---------------------------------------------------------------------------------------------------
# Upstream layouts -> ours
# ---------------------------------------------------------------------------------------------------

def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _count_layers(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if idx and idx != set(range(len(idx))):
        raise CheckpointError(f"layers under {prefix!r} are not numbered 0..N-1: {sorted(idx)}")
    return len(idx)


def text_config_from_state_dict(sd: dict[str, torch.Tensor], prefix: str, pooling: str = "cls") -> TextConfig:
    """The BERT-architecture text encoder's config from tensor shapes (keys ``prefix + 'embeddings...'``)."""
    we = sd[prefix + "embeddings.word_embeddings.weight"]
    return TextConfig(vocab_size=we.shape[0], hidden_size=we.shape[1],
                      num_layers=_count_layers(sd, prefix + "encoder.layer."),
                      num_heads=we.shape[1] // HEAD_DIM,
                      intermediate_size=sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_position=sd[prefix + "embeddings.position_embeddings.weight"].shape[0],
                      type_vocab_size=sd[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
                      pooling=pooling,
                      proj_dim=sd["text_proj.weight"].shape[0] if "text_proj.weight" in sd else None)


def from_state_dict(sd: dict[str, Any], name: str = "",
                    args: Any = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Map an upstream state dict (any known layout) to ours and infer the config from tensor shapes.

    Args:
        sd: the checkpoint's state dict (``ckpt['model']`` or a bare dict of tensors).
        name: the upstream release folder name, used only for what shapes cannot tell (sample rate, and the
            chunk width when the checkpoint's ``args`` lacks ``input_size``).
        args: the checkpoint's ``args`` namespace, if any.
    Returns:
        (state dict with keys ``encoder.*``, ``audio_proj.*``, ``text_encoder.*``, config)
    """
    sd = {k: v for k, v in _strip(sd).items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):  # M2D2 2025: backbone.* and text_encoder.text_encoder.*
        sd = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in sd.items()}
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:8])
        raise CheckpointError(f"not an M2D checkpoint: missing encoder tensors {missing} (found keys like: {sample}). "
                              "Supported: M2D2 2025, M2D-CLAP 2024, M2D and M2D-AS releases, and their fine-tuned "
                              "(EVAR) checkpoints")
    named = _parse_upstream_name(name)
    arg = vars(args) if isinstance(args, argparse.Namespace) else (args or {})

    # --- encoder: shapes first -------------------------------------------------------------------------
    D = sd["cls_token"].shape[-1]
    ph, pw = sd["patch_embed.proj.weight"].shape[-2:]
    n_tokens = sd["pos_embed"].shape[1] - 1
    n_mels = int(named.get("input_size", (80,))[0])
    if arg.get("input_size"):
        n_mels = int(arg["input_size"][0])
    f = n_mels // ph
    if n_tokens % f:
        raise CheckpointError(f"pos_embed has {n_tokens} patch positions, not a multiple of {f} frequency patches")
    t = n_tokens // f
    if arg.get("input_size"):
        width = int(arg["input_size"][1])
    elif "input_size" in named:
        width = named["input_size"][1]
    else:
        width = t * pw
        log.warning("chunk width not recorded in the checkpoint or its folder name; assuming %d frames", width)
    if width // pw != t:
        raise CheckpointError(f"chunk width {width} frames does not fit pos_embed's {t} time patches of {pw}")
    depth = _count_layers(sd, "blocks.")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    enc = EncoderConfig(input_size=(n_mels, width), patch_size=(int(ph), int(pw)), embed_dim=D, depth=depth,
                        num_heads=D // HEAD_DIM, mlp_ratio=hidden / D)
    out = {"encoder." + k: v for k, v in sd.items() if k.startswith(_ENCODER_TOP)}

    # --- front end ---------------------------------------------------------------------------------------
    rate = named.get("sample_rate")
    if rate is None and isinstance(arg.get("sr"), str) and arg["sr"].endswith("k"):
        rate = int(arg["sr"][:-1]) * 1000
    stats = sd["norm_stats"].tolist() if "norm_stats" in sd else list(DEFAULT_NORM_STATS)
    front = FrontEndConfig.for_rate(rate or 16000, n_mels=n_mels, norm_mean=float(stats[0]),
                                    norm_std=float(stats[1]))

    # --- CLAP audio head -----------------------------------------------------------------------------------
    head = None
    if "audio_proj.sem_token" in sd:
        hd = sd["audio_proj.sem_token"].shape[-1]
        head = AudioHeadConfig(kind="semantic", dim=hd, out_dim=hd, depth=_count_layers(sd, "audio_proj.sem_blocks."),
                               num_heads=1, mlp_ratio=sd["audio_proj.sem_blocks.0.mlp.fc1.weight"].shape[0] / hd)
    elif "audio_proj.0.weight" in sd:
        head = AudioHeadConfig(kind="mlp", dim=sd["audio_proj.0.weight"].shape[1],
                               out_dim=sd["audio_proj.2.weight"].shape[0])
    if head is not None:
        out.update({k: v for k, v in sd.items() if k.startswith("audio_proj.")})

    # --- text encoder --------------------------------------------------------------------------------------
    text = None
    tp = "text_encoder.text_encoder."
    if any(k.startswith(tp) for k in sd):
        text = text_config_from_state_dict(sd, tp)
        out.update({"text_encoder." + k[len(tp):]: v for k, v in sd.items() if k.startswith(tp)})
        if "text_proj.weight" in sd:
            out["text_encoder.text_proj.weight"] = sd["text_proj.weight"]
            if "text_proj.bias" in sd:
                out["text_encoder.text_proj.bias"] = sd["text_proj.bias"]

    used = {k for k in sd if k.startswith(_ENCODER_TOP) or k == "norm_stats"
            or (head is not None and k.startswith("audio_proj.")) or (text is not None and k.startswith(tp))
            or (text is not None and k.startswith("text_proj."))}
    ignored = sorted(set(sd) - used)
    if ignored:
        groups = sorted({k.split(".")[0] for k in ignored})
        log.info("ignored %d training-only tensors (%s)", len(ignored), ", ".join(groups))
        log.debug("ignored tensors: %s", ignored)
    cfg = ModelConfig(name=name or "m2d", frontend=front, encoder=enc, audio_head=head, text=text)
    return out, cfg


# ---------------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------------

def _atomic_write(dst: Path, write) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(state_dict: dict[str, torch.Tensor], config: ModelConfig, dst: str | os.PathLike) -> Path:
    """Write our format. ``dst`` ending in ``.safetensors``: one file with the config in its metadata;
    otherwise a directory with ``model.safetensors`` and ``config.json``. Writes are atomic."""
    from safetensors.torch import save_file

    dst = Path(dst)
    meta_cfg = json.dumps({**config.to_dict(), "format_version": FORMAT_VERSION})
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", "m2d2_embed_config": meta_cfg}
    if dst.suffix == ".safetensors":
        _atomic_write(dst, lambda p: save_file(tensors, p, metadata=meta))
        return dst
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory; give a directory or a .safetensors path")
    _atomic_write(dst / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    _atomic_write(dst / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(json.loads(meta_cfg), indent=2)))
    return dst


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our format (a ``.safetensors`` file or a directory) -> (state dict, config). Tensors are memory-mapped."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}; convert a checkpoint with `m2d2-embed convert SRC DST`")
    cfg_file = weights.parent / CONFIG_NAME
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if "m2d2_embed_config" in meta:
        cfg = json.loads(meta["m2d2_embed_config"])
    elif cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
    else:
        raise CheckpointError(f"{weights} has no m2d2_embed config (neither in its metadata nor a {CONFIG_NAME} beside "
                              "it); it was not written by m2d2_embed. Convert the upstream .pth instead")
    if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise CheckpointError(f"{weights} uses format version {cfg['format_version']}; upgrade m2d2_embed")
    return load_file(str(weights)), ModelConfig.from_dict(cfg)


def read_any(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A local upstream ``.pth`` or our format -> (state dict, config)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() or path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pth(path)
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    return from_state_dict(sd, name=_upstream_name(path), args=obj.get("args"))


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert an upstream ``.pth`` (or re-save our format) to our safetensors format at ``dst``
    (a directory, or a path ending in ``.safetensors`` for a single file). Returns ``dst``."""
    sd, cfg = read_any(src)
    out = save_model(sd, cfg, dst)
    log.info("converted %s -> %s (%d tensors)", src, out, len(sd))
    return out
