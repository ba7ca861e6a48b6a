"""Registry names, URLs and hf:// specs -> converted weights in the local cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .registry import ModelInfo

log = logging.getLogger(__name__)


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("M2D2_EMBED_CACHE"):
        return Path(os.environ["M2D2_EMBED_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "m2d2_embed"


def converted_path(info: ModelInfo, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted safetensors of a registry model live in the cache."""
    return default_cache_dir(cache_dir) / info.name


def fetch_registry_model(info: ModelInfo, *, cache_dir=None, offline=None) -> Path:
    dst = converted_path(info, cache_dir)
    if (dst / "model.safetensors").exists():
        return dst
    raise FileNotFoundError(f"model {info.name!r} is not in the cache ({dst}); fetch it with "
                            f"`m2d2-embed download {info.name}` or pass a local checkpoint path")


def fetch_remote(spec: str, *, cache_dir=None, offline=None) -> Path:
    raise NotImplementedError("downloading from URLs is not available yet")


def download_model(name_or_url: str, *, cache_dir=None, progress: bool | None = None, keep_source: bool = False) -> Path:
    """Download (if needed), verify and convert a registry model or URL into the cache; return the converted path."""
    raise NotImplementedError


def list_models(cache_dir=None) -> list[dict]:
    """One dict per registry model: name, description, kind, size_mb, url, license, cached (bool), path."""
    raise NotImplementedError


def cache_summary(cache_dir=None) -> dict:
    """{'path': Path, 'total_bytes': int, 'entries': [{'name': str, 'bytes': int}], 'clear_hint': str}."""
    raise NotImplementedError
