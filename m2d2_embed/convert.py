"""The only place that knows upstream checkpoint layouts.

Upstream ``.pth`` files -> our state dict (``encoder.*``, ``audio_proj.*``, ``text_encoder.*``, ``classifier.*``)
plus a ``ModelConfig`` (a registry entry's, checked against the tensor shapes, or inferred from them); and our own
format: ``model.safetensors`` + ``config.json`` (+ ``checksum.json``, + ``classifier.safetensors`` of a model
fine-tuned by ``m2d2_embed.train finetune``) in a directory, or a single ``.safetensors`` file carrying the config
JSON in its metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import AudioHeadConfig, ClassifierConfig, EncoderConfig, FrontEndConfig, ModelConfig, TextConfig
from .download import cache_dir, sha256_file
from .outputs import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKSUM_NAME = "checksum.json"  # SHA-256, size and mtime of WEIGHTS_NAME, recorded when it is written
CLASSIFIER_NAME = "classifier.safetensors"  # task head written by `m2d2_embed.train finetune` (export_extra)
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


def describe_bytes(head: bytes, size: int) -> str:
    """What a file that should be a checkpoint or an archive looks like, from its first bytes: "an HTML page",
    "empty (0 bytes)", "a zip archive", "text starting 'abc'", ... (for error messages)."""
    if size == 0:
        return "empty (0 bytes)"
    start = head.lstrip()[:64]
    low = start.lower()
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head[:1024].lower():
        return "an HTML page (a proxy, login or error page?)"
    if low.startswith((b"<?xml", b"<error", b"<")):
        return "an XML document (a cloud storage error?)"
    if low.startswith((b"{", b"[")):
        return "JSON text (an API error?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= 5:
        return "a Python pickle"
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting {head[:8].hex(' ')}"
    return f"text starting {text[:40]!r}"


def describe_file(path: str | os.PathLike) -> str:
    """``"<size> bytes that look like <what>"`` for a file that failed to load (see :func:`describe_bytes`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        return f"unreadable ({e})"
    return f"{size:,} bytes that look like {describe_bytes(head, size)}"


def _refused(path: Path, err: BaseException) -> CheckpointError:
    """Our message for a ``torch.load`` failure: what the file is, why it is refused, what to do. Torch's own
    advice (to turn the safety off) is deliberately not repeated: the file may not be trustworthy."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand \S+", text)
        what = describe_file(path)
        if "pickle" not in what and "zip" not in what:
            return CheckpointError(
                f"{path} is not a PyTorch checkpoint: {what}. If it was downloaded, the download "
                "is damaged or was an error page: delete it and download it again"
            )
        detail = f" ({found[1] if found.groups() else found[0]})" if found else ""
        return CheckpointError(
            f"{path} was not loaded: it holds Python objects other than tensors, containers and argparse.Namespace"
            f"{detail}, and unpickling untrusted files can run code. Official M2D checkpoints do not; if this one "
            "should be one, download it again from the official release. If it is your own checkpoint, save only "
            "its state dict (torch.save(model.state_dict(), path)) and load that, or convert the dict in Python with "
            "m2d2_embed.convert.from_state_dict()"
        )
    if isinstance(err, (EOFError, zipfile.BadZipFile)) or "failed finding central directory" in text or not text:
        return CheckpointError(f"{path} is truncated or damaged ({describe_file(path)}); download or copy it again")
    return CheckpointError(
        f"cannot read {path} as a PyTorch checkpoint ({describe_file(path)}): "
        f"{text.splitlines()[0] if text else type(err).__name__}. Download or copy it again"
    )


def _torch_load(path: Path, mmap: bool) -> Any:
    with warnings.catch_warnings(), torch.serialization.safe_globals(_SAFE_GLOBALS):
        warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise next to our own message
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_pth(path: str | os.PathLike) -> dict[str, Any]:
    """Load an upstream ``.pth`` without executing code: ``weights_only=True`` with only
    ``argparse.Namespace`` (present in the official files) allowed besides tensors and containers.

    Raises:
        CheckpointError: the file holds other Python objects, is not a checkpoint (e.g. an HTML page), is
            truncated, or is not a dict. The message says what the file looks like and what to do.
    """
    path = Path(path)
    try:
        try:
            obj = _torch_load(path, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = _torch_load(path, mmap=False)  # legacy (non-zip) serialization cannot be memory-mapped
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _refused(path, e) from e
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
                k = k[len(p) :]
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
    return TextConfig(
        vocab_size=we.shape[0],
        hidden_size=we.shape[1],
        num_layers=_count_layers(sd, prefix + "encoder.layer."),
        num_heads=we.shape[1] // HEAD_DIM,
        intermediate_size=sd[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position=sd[prefix + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=sd[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
        pooling=pooling,
        proj_dim=sd["text_proj.weight"].shape[0] if "text_proj.weight" in sd else None,
    )


def _classifier_from_state_dict(
    sd: dict[str, torch.Tensor], template: ClassifierConfig | None
) -> tuple[dict[str, torch.Tensor], ClassifierConfig | None]:
    """EVAR's task head (``head.norm.running_mean/var``: BatchNorm1d without affine; ``head.mlp.mlp.0.*``: Linear)
    -> ``classifier.*`` and its config. Labels: the template's, else AudioSet's for 527 classes."""
    w, b = sd.get("head.mlp.mlp.0.weight"), sd.get("head.mlp.mlp.0.bias")
    if w is None or b is None or w.ndim != 2:
        return {}, None
    out = {"classifier.linear.weight": w, "classifier.linear.bias": b}
    norm = "head.norm.running_mean" in sd and "head.norm.running_var" in sd
    if norm:
        out["classifier.norm.running_mean"] = sd["head.norm.running_mean"]
        out["classifier.norm.running_var"] = sd["head.norm.running_var"]
    n, d = int(w.shape[0]), int(w.shape[1])
    labels = template.labels if template is not None and template.num_classes == n else None
    if labels is None and n == 527:
        from .registry import audioset_labels

        labels = audioset_labels()
        log.info("classification head with 527 outputs: AudioSet labels in upstream's order (sorted by mid)")
    if template is not None and template.in_features != d:
        log.warning(
            "the classification head takes %d-d features, not %d as expected; using the weights' width",
            d,
            template.in_features,
        )
    return out, ClassifierConfig(in_features=d, num_classes=n, norm=norm, labels=labels, multi_label=True)


def from_state_dict(
    sd: dict[str, Any], name: str = "", args: Any = None, config: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Map an upstream state dict (any known layout) to ours, with its config.

    Args:
        sd: the checkpoint's state dict (``ckpt['model']`` or a bare dict of tensors).
        name: the upstream release folder name. Used only without ``config`` and only for what neither the
            shapes nor ``args`` tell (sample rate, chunk width): a last resort, logged when used.
        args: the checkpoint's ``args`` namespace, if any.
        config: the model the checkpoint should hold (a registry entry's). Its front end, chunk width and
            heads are used as they are; the tensors must fit them. Only the log-mel statistics come from the
            checkpoint's ``norm_stats`` when it has them, and the classifier's width from its weights.
    Returns:
        (state dict with keys ``encoder.*``, ``audio_proj.*``, ``text_encoder.*``, ``classifier.*``, config)
    Raises:
        CheckpointError: not an M2D checkpoint, or it does not fit ``config``.
    """
    sd = {k: v for k, v in _strip(sd).items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):  # M2D2 2025: backbone.* and text_encoder.text_encoder.*
        sd = {(k[len("backbone.") :] if k.startswith("backbone.") else k): v for k, v in sd.items()}
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:8])
        raise CheckpointError(
            f"not an M2D checkpoint: missing encoder tensors {missing} (found keys like: {sample}). "
            "Supported: M2D2 2025, M2D-CLAP 2024, M2D and M2D-AS releases, and their fine-tuned "
            "(EVAR) checkpoints"
        )
    arg = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    if isinstance(arg.get("input_size"), str):  # the training command line's "80x608"
        arg["input_size"] = [int(x) for x in arg["input_size"].split("x")]
    label = name or (config.name if config is not None else "checkpoint")

    # --- encoder: shapes first -------------------------------------------------------------------------
    D = sd["cls_token"].shape[-1]
    ph, pw = (int(x) for x in sd["patch_embed.proj.weight"].shape[-2:])
    n_tokens = sd["pos_embed"].shape[1] - 1
    named: dict[str, Any] = {}
    if config is not None:
        n_mels, width = config.encoder.input_size
    else:
        if not arg.get("input_size") or not (isinstance(arg.get("sr"), str) and arg["sr"].endswith("k")):
            named = _parse_upstream_name(name)
        n_mels = int(arg["input_size"][0]) if arg.get("input_size") else int(named.get("input_size", (80,))[0])
        width = None
        if arg.get("input_size"):
            width = int(arg["input_size"][1])
        elif "input_size" in named:
            width = named["input_size"][1]
            log.warning(
                "%s: chunk width %d frames taken from the folder name (the checkpoint does not record it)", label, width
            )
    f = n_mels // ph
    if f == 0 or n_tokens % f:
        raise CheckpointError(
            f"{label}: pos_embed has {n_tokens} patch positions, not a multiple of {f} frequency "
            f"patches ({n_mels} mel bins / {ph})"
        )
    t = n_tokens // f
    if width is None:
        width = t * pw
        log.warning(
            "%s: chunk width not recorded in the checkpoint or its folder name; assuming %d frames", label, width
        )
    if width // pw != t:
        raise CheckpointError(f"{label}: chunk width {width} frames does not fit pos_embed's {t} time patches of {pw}")
    depth = _count_layers(sd, "blocks.")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    enc = EncoderConfig(
        input_size=(n_mels, width),
        patch_size=(ph, pw),
        embed_dim=D,
        depth=depth,
        num_heads=D // HEAD_DIM,
        mlp_ratio=hidden / D,
    )
    out = {"encoder." + k: v for k, v in sd.items() if k.startswith(_ENCODER_TOP)}

    # --- front end ---------------------------------------------------------------------------------------
    stats = sd["norm_stats"].tolist() if "norm_stats" in sd else None
    if config is not None:
        front = config.frontend
        if stats is not None:
            front = dataclasses.replace(front, norm_mean=float(stats[0]), norm_std=float(stats[1]))
    else:
        rate = None
        if isinstance(arg.get("sr"), str) and arg["sr"].endswith("k"):
            rate = int(arg["sr"][:-1]) * 1000
        elif "sample_rate" in named:
            rate = named["sample_rate"]
            log.warning("%s: sample rate %d Hz taken from the folder name", label, rate)
        stats = stats or list(DEFAULT_NORM_STATS)
        front = FrontEndConfig.for_rate(
            rate or 16000, n_mels=n_mels, norm_mean=float(stats[0]), norm_std=float(stats[1])
        )

    # --- CLAP audio head -----------------------------------------------------------------------------------
    head = None
    if "audio_proj.sem_token" in sd:
        hd = sd["audio_proj.sem_token"].shape[-1]
        head = AudioHeadConfig(
            kind="semantic",
            dim=hd,
            out_dim=hd,
            depth=_count_layers(sd, "audio_proj.sem_blocks."),
            num_heads=1,
            mlp_ratio=sd["audio_proj.sem_blocks.0.mlp.fc1.weight"].shape[0] / hd,
        )
    elif "audio_proj.0.weight" in sd:
        head = AudioHeadConfig(
            kind="mlp", dim=sd["audio_proj.0.weight"].shape[1], out_dim=sd["audio_proj.2.weight"].shape[0]
        )
    if head is not None:
        out.update({k: v for k, v in sd.items() if k.startswith("audio_proj.")})

    # --- text encoder --------------------------------------------------------------------------------------
    text = None
    tp = "text_encoder.text_encoder."
    if any(k.startswith(tp) for k in sd):
        text = text_config_from_state_dict(sd, tp, pooling=config.text.pooling if config and config.text else "cls")
        out.update({"text_encoder." + k[len(tp) :]: v for k, v in sd.items() if k.startswith(tp)})
        if "text_proj.weight" in sd:
            out["text_encoder.text_proj.weight"] = sd["text_proj.weight"]
            if "text_proj.bias" in sd:
                out["text_encoder.text_proj.bias"] = sd["text_proj.bias"]

    # --- task head (fine-tuned EVAR checkpoints) ------------------------------------------------------------
    cls_sd, classifier = _classifier_from_state_dict(sd, config.classifier if config is not None else None)
    out.update(cls_sd)

    used = {
        k
        for k in sd
        if k.startswith(_ENCODER_TOP)
        or k == "norm_stats"
        or (head is not None and k.startswith("audio_proj."))
        or (text is not None and k.startswith(tp))
        or (text is not None and k.startswith("text_proj."))
        or (classifier is not None and k.startswith(("head.norm.running_", "head.mlp.mlp.0.")))
    }
    ignored = sorted(set(sd) - used)
    if ignored:
        groups = sorted({k.split(".")[0] for k in ignored})
        log.info("ignored %d training-only tensors (%s)", len(ignored), ", ".join(groups))
        log.debug("ignored tensors: %s", ignored)
    found = ModelConfig(
        name=name or "m2d", frontend=front, encoder=enc, audio_head=head, text=text, classifier=classifier
    )
    if config is None:
        return out, found
    _check_fits(found, config, label)
    if config.text is not None and text is None and not config.text_weights:
        raise CheckpointError(f"{label}: the checkpoint has no text encoder, but the model should have one")
    cfg = dataclasses.replace(
        config, frontend=front, text=text if text is not None else config.text, classifier=classifier
    )
    if config.classifier is not None and classifier is None:
        log.warning("%s: the checkpoint carries no classification head; tag() will not be available", label)
    return out, cfg


def _check_fits(found: ModelConfig, want: ModelConfig, label: str) -> None:
    """The tensors' shapes against the configuration a registry entry states."""
    problems = []
    fe, we = found.encoder, want.encoder
    for field in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(fe, field) != getattr(we, field):
            problems.append(f"encoder {field} {getattr(fe, field)} (expected {getattr(we, field)})")
    if fe.grid != we.grid:
        problems.append(f"patch grid {fe.grid} (expected {we.grid})")
    if found.audio_head != want.audio_head:
        problems.append(f"audio head {found.audio_head} (expected {want.audio_head})")
    if found.text is not None and want.text is not None and found.text != want.text:
        problems.append(f"text encoder {found.text} (expected {want.text})")
    if (
        found.classifier is not None
        and want.classifier is not None
        and found.classifier.num_classes != want.classifier.num_classes
    ):
        problems.append(f"{found.classifier.num_classes} classes (expected {want.classifier.num_classes})")
    if problems:
        raise CheckpointError(
            f"{label}: the checkpoint does not hold the model its registry entry describes: "
            f"{'; '.join(problems)}. The release file may have changed; report it, and load the "
            "file by path meanwhile"
        )


# ---------------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------------


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def record_checksum(weights: str | os.PathLike) -> dict[str, Any]:
    """Write ``checksum.json`` beside ``weights`` (our ``model.safetensors``): its SHA-256, size and mtime.
    Returns the record."""
    weights = Path(weights)
    size, mtime = _stat(weights)
    rec = {"file": weights.name, "sha256": sha256_file(weights), "size": size, "mtime_ns": mtime}
    atomic_write(weights.parent / CHECKSUM_NAME, lambda p: Path(p).write_text(json.dumps(rec, indent=2)))
    return rec


def verify_checksum(weights: str | os.PathLike, *, full: bool = False) -> bool | None:
    """Check ``weights`` against its ``checksum.json``.

    Cheap by default: the file is hashed only when its size or mtime differ from the record (a copied cache
    is hashed once, and its record updated when writable). ``full=True`` always hashes.

    Returns:
        True when verified (or unchanged since recorded), None when there is no record.
    Raises:
        CheckpointError: the weights changed since they were written (the message names the file and the fix).
    """
    weights = Path(weights)
    side = weights.parent / CHECKSUM_NAME
    try:
        rec = json.loads(side.read_text())
        if rec.get("file") != weights.name:
            return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{side} is unreadable ({e}); {_fix(weights)}") from e
    size, mtime = _stat(weights)
    if not full and size == rec.get("size") and mtime == rec.get("mtime_ns"):
        return True
    if size != rec.get("size"):
        raise CheckpointError(
            f"{weights} is damaged: {size:,} bytes, but {rec.get('size'):,} were written; {_fix(weights)}"
        )
    got = sha256_file(weights)
    if got != rec.get("sha256"):
        raise CheckpointError(
            f"{weights} is damaged: its SHA-256 is {got}, but {rec.get('sha256')} was recorded "
            f"when it was written; {_fix(weights)}"
        )
    if mtime != rec.get("mtime_ns"):
        try:
            record_checksum(weights)  # same bytes, new mtime (copied or touched): remember it, skip hashing next time
        except OSError:
            pass
    return True


def _in_cache(folder: Path) -> bool:
    try:
        return folder.resolve().is_relative_to(cache_dir().resolve())
    except OSError:
        return False


def _fix(weights: Path) -> str:
    """What to do about a damaged converted model, cache entries named by their command."""
    folder = weights.parent if weights.name == WEIGHTS_NAME else weights
    if _in_cache(folder):
        return (
            f"remove it with `m2d2-embed cache --clear {folder.name}` (the next load downloads and converts it again)"
        )
    return (
        "convert the upstream checkpoint again (`m2d2-embed convert SRC DST`), or, if it came from the model "
        f"cache, remove it with `m2d2-embed cache --clear {folder.name}`"
    )


def save_model(state_dict: dict[str, torch.Tensor], config: ModelConfig, dst: str | os.PathLike) -> Path:
    """Write our format. ``dst`` ending in ``.safetensors``: one file with the config in its metadata;
    otherwise a directory with ``model.safetensors``, ``config.json`` and ``checksum.json`` (the weights'
    SHA-256, checked at load when the file's size or mtime changed). Writes are atomic."""
    from safetensors.torch import save_file

    dst = Path(dst)
    check_finite(state_dict, f"the state dict to save as {dst}", fix="nothing was written")
    meta_cfg = json.dumps({**config.to_dict(), "format_version": FORMAT_VERSION})
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", "m2d2_embed_config": meta_cfg}
    if dst.suffix == ".safetensors":
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dst, lambda p: save_file(tensors, p, metadata=meta))
        return dst
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory; give a directory or a .safetensors path")
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write(dst / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))
    atomic_write(dst / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(json.loads(meta_cfg), indent=2)))
    record_checksum(dst / WEIGHTS_NAME)
    return dst


def _damaged(weights: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{weights} is damaged or not a safetensors file ({describe_file(weights)}: {err}); {_fix(weights)}"
    )


def _read_classifier(path: Path) -> tuple[dict[str, torch.Tensor], ClassifierConfig]:
    """``classifier.safetensors`` of ``m2d2_embed.train finetune``: tensors ``linear.weight`` / ``linear.bias``
    (earlier exports: ``weight`` / ``bias``) and, for a BatchNorm head, ``norm.running_mean`` / ``running_var``;
    metadata ``labels`` and ``multi_label`` as JSON (and ``classifier_config``) -> ``classifier.*`` and its config."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as e:
        raise _damaged(path, e) from e
    sd = {("linear." + k if k in ("weight", "bias") else k): v for k, v in sd.items()}
    w, b = sd.get("linear.weight"), sd.get("linear.bias")
    norm = "norm.running_mean" in sd and "norm.running_var" in sd
    if (
        w is None
        or b is None
        or w.ndim != 2
        or set(sd) - {"linear.weight", "linear.bias", "norm.running_mean", "norm.running_var"}
    ):
        raise CheckpointError(
            f"{path} is not a classifier head (expected tensors 'linear.weight' [C, D] and "
            f"'linear.bias' [C], optionally 'norm.running_mean'/'norm.running_var' [D], found "
            f"{sorted(sd)}); delete it or fine-tune again"
        )
    try:
        labels = json.loads(meta["labels"]) if "labels" in meta else None
        multi = bool(json.loads(meta.get("multi_label", "false")))
        eps = (
            float(json.loads(meta["classifier_config"]).get("norm_eps", 1e-5)) if "classifier_config" in meta else 1e-5
        )
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} has unreadable metadata ({e}); export the classifier again") from e
    if labels is not None and len(labels) != w.shape[0]:
        raise CheckpointError(f"{path} names {len(labels)} labels for {w.shape[0]} outputs; export it again")
    cfg = ClassifierConfig(
        in_features=int(w.shape[1]),
        num_classes=int(w.shape[0]),
        norm=norm,
        norm_eps=eps,
        labels=tuple(labels) if labels is not None else None,
        multi_label=multi,
    )
    return {f"classifier.{k}": v for k, v in sd.items()}, cfg


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our format (a ``.safetensors`` file or a directory) -> (state dict, config). Tensors are memory-mapped.

    A directory's weights are checked against its ``checksum.json`` when their size or mtime changed; a
    ``classifier.safetensors`` beside them (from ``m2d2_embed.train finetune``) adds ``classifier.*``.

    Raises:
        CheckpointError: damaged, truncated or foreign file; weights changed since they were written; the
            message names the file and the fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    cfg = _config_dict(weights, path)
    verified = verify_checksum(weights) if weights.name == WEIGHTS_NAME else None
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise _damaged(weights, e) from e
    if not verified:  # recorded checksums cover weights found finite when written
        check_finite(sd, path)
        if verified is None and weights.name == WEIGHTS_NAME and _in_cache(weights.parent):
            try:  # converted by an older version: record now, so later loads only compare size and mtime
                record_checksum(weights)
                log.info("recorded the SHA-256 of %s", weights)
            except OSError as e:
                log.debug("could not record the SHA-256 of %s: %s", weights, e)
    config = ModelConfig.from_dict(cfg)
    extra = weights.parent / CLASSIFIER_NAME
    if extra.is_file() and config.classifier is None and not any(k.startswith("classifier.") for k in sd):
        cls_sd, cls_cfg = _read_classifier(extra)
        sd.update(cls_sd)
        config = dataclasses.replace(config, classifier=cls_cfg)
        log.info("classification head from %s: %d classes", extra, cls_cfg.num_classes)
    return sd, config


def _config_dict(weights: Path, path: Path) -> dict[str, Any]:
    """The config JSON of our weights file ``weights`` (from its metadata or a config.json beside it)."""
    from safetensors import SafetensorError, safe_open

    if not weights.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}; convert a checkpoint with `m2d2-embed convert SRC DST`")
    cfg_file = weights.parent / CONFIG_NAME
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise _damaged(weights, e) from e
    if "m2d2_embed_config" in meta:
        cfg = json.loads(meta["m2d2_embed_config"])
    elif cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
    else:
        raise CheckpointError(
            f"{weights} has no m2d2_embed config (neither in its metadata nor a {CONFIG_NAME} beside "
            "it); it was not written by m2d2_embed. Convert the upstream .pth instead"
        )
    if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise CheckpointError(f"{weights} uses format version {cfg['format_version']}; upgrade m2d2_embed")
    return cfg


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The config of our format (a ``.safetensors`` file or a directory) without reading its weights (a few
    kilobytes: the safetensors header). The classifier of a ``classifier.safetensors`` beside it is not included.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`read_safetensors`.
    """
    path = Path(path)
    return ModelConfig.from_dict(_config_dict(path / WEIGHTS_NAME if path.is_dir() else path, path))


def check_finite(state_dict: dict[str, torch.Tensor], source: str | os.PathLike, fix: str | None = None) -> None:
    """Raise CheckpointError naming ``source``, the first tensors holding NaN or infinity, and ``fix`` (default:
    how to replace the damaged file).

    One reduction per tensor (a sum is finite when no element is NaN/inf; an overflowing sum is told apart by
    a second, exact check), so it costs about as much as reading the weights once."""
    bad = []
    for k, v in state_dict.items():
        if not v.is_floating_point() or not v.numel():
            continue
        total = v.sum() if v.dtype in (torch.float32, torch.float64) else v.sum(dtype=torch.float32)
        if not torch.isfinite(total):
            if not bool(torch.isfinite(v).all()):
                bad.append(k)
    if bad:
        src = Path(source)
        weights = src / WEIGHTS_NAME if src.is_dir() else src
        if fix is None:
            fix = "the file is damaged: " + (
                _fix(weights) if weights.suffix == ".safetensors" else "download or copy the checkpoint again"
            )
        raise CheckpointError(
            f"{source} holds NaN or infinite weights in {len(bad)} tensors ({', '.join(bad[:5])}); {fix}"
        )


def read_any(path: str | os.PathLike, config: ModelConfig | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A local upstream ``.pth`` or our format -> (state dict, config). ``config``: the model an upstream
    checkpoint should hold (a registry entry's); without it the config is inferred (see :func:`from_state_dict`).

    Raises:
        CheckpointError: unreadable, damaged or foreign file, or weights that are not finite.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir() or path.suffix == ".safetensors":
        return read_safetensors(path)  # checks finiteness unless a recorded checksum vouches for the weights
    obj = read_pth(path)
    raw = obj["model"] if isinstance(obj.get("model"), dict) else obj
    sd, cfg = from_state_dict(raw, name=_upstream_name(path), args=obj.get("args"), config=config)
    check_finite(sd, path)
    return sd, cfg


def convert(src: str | os.PathLike, dst: str | os.PathLike, config: ModelConfig | None = None) -> Path:
    """Convert an upstream ``.pth`` (or re-save our format) to our safetensors format at ``dst``
    (a directory, or a path ending in ``.safetensors`` for a single file). Returns ``dst``.
    ``config``: the model the checkpoint should hold (see :func:`from_state_dict`)."""
    sd, cfg = read_any(src, config)
    out = save_model(sd, cfg, dst)
    log.info("converted %s -> %s (%d tensors)", src, out, len(sd))
    return out
