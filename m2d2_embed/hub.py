"""Registry names, URLs and hf:// specs -> converted weights in the local cache.

Cache layout (``<cache>`` from :func:`m2d2_embed.download.cache_dir`)::

    <cache>/<name>/model.safetensors, config.json     converted registry model (what load() reads)
    <cache>/downloads/<release>.zip[.sha256]          the official archive (removed after conversion
    <cache>/downloads/<folder>/checkpoint-NN.pth      unless keep_source=True)
    <cache>/url-<hash>/...                            the same for a model loaded from an http(s) URL
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from . import download as dl
from .registry import LICENSE_SUMMARY, LICENSE_URL, MODELS, ModelInfo

log = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$M2D2_EMBED_CACHE``, else ``$XDG_CACHE_HOME/m2d2_embed``, else ``~/.cache/m2d2_embed``."""
    return dl.cache_dir(cache_dir)


def converted_path(info: ModelInfo, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted safetensors of a registry model live in the cache."""
    return default_cache_dir(cache_dir) / info.name


def _is_converted(d: Path) -> bool:
    return (d / "model.safetensors").is_file() and (d / "config.json").is_file()


def _convert_into(pth: Path, dst: Path, text_weights: str | None = None) -> None:
    import dataclasses

    from .config import TextConfig
    from .convert import read_any, save_model

    tmp = dst.with_name(dst.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    sd, cfg = read_any(pth)
    cfg = dataclasses.replace(cfg, name=dst.name)
    if text_weights and cfg.text is None:  # the text encoder lives elsewhere; fetched at load time
        cfg = dataclasses.replace(cfg, text=TextConfig(pooling="mean"), text_weights=text_weights)
    save_model(sd, cfg, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)  # the converted folder appears whole or not at all


def _fetch_archive_member(url: str, member: str, member_sha256: str | None, work: Path, *, progress: bool | None,
                          hint: str) -> Path:
    """Download a release zip (or a bare checkpoint) into ``work`` and return the verified checkpoint path."""
    name = PurePosixPath(unquote(urlparse(url).path)).name or "download"
    if name.endswith(".zip"):
        archive = dl.download_url(url, work / name, progress=progress, hint=hint)
        if member == "":
            member = _pick_member(archive)
        target = work / member
        dl.extract_member(archive, member, target)
    else:
        archive = None
        target = dl.download_url(url, work / name, sha256=member_sha256, progress=progress, hint=hint)
    if member_sha256 and archive is not None:
        got = dl.sha256_file(target)
        if got != member_sha256:
            target.unlink(missing_ok=True)
            archive.unlink(missing_ok=True)
            raise dl.DownloadError(f"SHA-256 mismatch for {member} extracted from {url}: expected {member_sha256}, got "
                                   f"{got}. The archive was removed; run the command again to re-download it")
    return target


def _pick_member(archive: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        found = [n for n in zf.namelist() if n.endswith(_CHECKPOINT_SUFFIXES)]
    if len(found) != 1:
        listed = ", ".join(found[:10]) or "none"
        raise dl.DownloadError(f"{archive.name} holds {len(found)} checkpoint files ({listed});"
                               " expected exactly one .pth or .safetensors")
    return found[0]


def _cleanup(work: Path, keep_source: bool) -> None:
    if keep_source:
        return
    for p in sorted(work.rglob("*"), reverse=True):
        if p.suffix == ".lock":
            continue
        if p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def fetch_registry_model(info: ModelInfo, *, cache_dir=None, offline: bool | None = None,
                         progress: bool | None = None, keep_source: bool = False) -> Path:
    """Converted weights of a registry model: from the cache, else downloaded, verified and converted."""
    dst = converted_path(info, cache_dir)
    if _is_converted(dst):
        return dst
    hint = f"fetch it while online with `m2d2-embed download {info.name}`, or pass a local checkpoint path"
    if dl.is_offline(offline):
        raise dl.DownloadError(f"model {info.name!r} is not in the cache ({dst}) and offline mode is on "
                               f"(offline=True, M2D2_EMBED_OFFLINE=1 or HF_HUB_OFFLINE=1); {hint}")
    root = default_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    import filelock

    with filelock.FileLock(str(dst) + ".lock"):
        if _is_converted(dst):  # another process finished it while we waited
            return dst
        log.warning("downloading %s (about %d MB) from %s\nLicence: %s (%s)", info.name, info.size_mb, info.url,
                    LICENSE_SUMMARY, LICENSE_URL)
        work = root / "downloads"
        ckpt = _fetch_archive_member(info.url, info.member, info.sha256, work, progress=progress, hint=hint)
        _convert_into(ckpt, dst, info.text_weights)
        _cleanup(work, keep_source)
    return dst


def fetch_remote(spec: str, *, cache_dir=None, offline: bool | None = None, progress: bool | None = None,
                 keep_source: bool = False) -> Path:
    """``hf://owner/repo[/path][@rev]`` or an ``http(s)://`` URL (zip, .pth or .safetensors) -> a local path."""
    if spec.startswith("hf://"):
        return dl.hf_download(spec, offline=offline, hint="download it once while online")
    name = PurePosixPath(unquote(urlparse(spec).path)).name
    if not name.endswith((".zip", *_CHECKPOINT_SUFFIXES)):
        raise ValueError(f"cannot tell what {spec!r} holds; a URL must end in .zip, .pth, .pt or .safetensors")
    root = default_cache_dir(cache_dir) / f"url-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"
    hint = f"fetch it while online with `m2d2-embed download {spec}`"
    if name.endswith(".safetensors"):
        return dl.download_url(spec, root / name, progress=progress, offline=offline, hint=hint)
    dst = root / "converted"
    if _is_converted(dst):
        return dst
    if dl.is_offline(offline):
        raise dl.DownloadError(f"{spec} is not in the cache ({dst}) and offline mode is on; {hint}")
    root.mkdir(parents=True, exist_ok=True)
    import filelock

    with filelock.FileLock(str(dst) + ".lock"):
        if _is_converted(dst):
            return dst
        ckpt = _fetch_archive_member(spec, "", None, root / "source", progress=progress, hint=hint)
        _convert_into(ckpt, dst)
        _cleanup(root / "source", keep_source)
    return dst


def download_model(name_or_url: str, *, cache_dir=None, progress: bool | None = None,
                   keep_source: bool = False) -> Path:
    """Download (if needed), verify and convert a registry model or URL into the cache; return the converted path."""
    if name_or_url in MODELS:
        return fetch_registry_model(MODELS[name_or_url], cache_dir=cache_dir, offline=False, progress=progress,
                                    keep_source=keep_source)
    if name_or_url.startswith(("http://", "https://", "hf://")):
        return fetch_remote(name_or_url, cache_dir=cache_dir, offline=False, progress=progress, keep_source=keep_source)
    raise ValueError(f"unknown model {name_or_url!r}; available: {', '.join(MODELS)}, or an http(s):// or hf:// URL")


def _dir_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def list_models(cache_dir=None) -> list[dict]:
    """One dict per registry model: name, description, kind, size_mb, url, license, cached (bool), path."""
    out = []
    for info in MODELS.values():
        dst = converted_path(info, cache_dir)
        out.append({"name": info.name, "description": info.description, "kind": info.kind, "size_mb": info.size_mb,
                    "url": info.url, "license": LICENSE_SUMMARY, "cached": _is_converted(dst), "path": dst})
    return out


def cache_summary(cache_dir=None) -> dict:
    """{'path': Path, 'total_bytes': int, 'entries': [{'name': str, 'bytes': int}], 'clear_hint': str}."""
    root = default_cache_dir(cache_dir)
    entries = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.suffix != ".lock":
                entries.append({"name": p.name, "bytes": _dir_bytes(p)})
    return {"path": root, "total_bytes": sum(e["bytes"] for e in entries), "entries": entries,
            "clear_hint": f"remove the folder to clear it: rm -r {root} (or delete single entries inside it)"}


def fetch_text_weights(config, *, offline: bool | None = None) -> tuple[dict, object]:
    """(state dict ``text_encoder.*``, TextConfig) of a text encoder kept outside the checkpoint, e.g. GTE-base
    from the Hub (``config.text_weights``), fetched through ``huggingface_hub`` and its cache. The config comes
    from the tensor shapes; the pooling from ``config.text``."""
    from safetensors.torch import load_file

    from .convert import text_config_from_state_dict

    spec = config.text_weights
    if not spec.startswith("hf://"):
        raise ValueError(f"unsupported text_weights location {spec!r}; expected hf://owner/repo/file.safetensors")
    path = dl.hf_download(spec, offline=offline, hint="load the model once while online to cache its text encoder")
    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        for prefix in ("bert.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            out["text_encoder." + k] = v
    if "text_encoder.embeddings.word_embeddings.weight" not in out:
        raise ValueError(f"{spec} does not hold BERT-style text encoder weights (found e.g. {sorted(sd)[:5]})")
    text = text_config_from_state_dict(out, "text_encoder.", pooling=config.text.pooling)
    if "text_encoder.pooler.dense.weight" not in out:  # the pooler is unused; some exports drop it
        import torch

        d = text.hidden_size
        out["text_encoder.pooler.dense.weight"] = torch.zeros(d, d)
        out["text_encoder.pooler.dense.bias"] = torch.zeros(d)
    return out, text
