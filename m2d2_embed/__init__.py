"""m2d2_embed: frame-level, clip-level and text-aligned (CLAP) audio embeddings from NTT's M2D2.

import m2d2_embed as m2d2
model = m2d2.load()                      # m2d2-clap-2025
clip = model.clip_embeddings(wave, sample_rate=16000)
"""

from __future__ import annotations

import logging

from .audio import load_audio
from .config import ModelConfig
from .convert import convert
from .loader import list_models, load
from .model import M2D2, similarity
from .outputs import EmbeddingSet, read_embeddings
from .registry import available_models

__version__ = "0.1.0.dev0"
__all__ = [
    "M2D2",
    "EmbeddingSet",
    "ModelConfig",
    "__version__",
    "available_models",
    "convert",
    "list_models",
    "load",
    "load_audio",
    "read_embeddings",
    "similarity",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
