"""Training companion of ``m2d2_embed``: M2D + CLAP pre-training (stage 1, also continuing upstream's
pre-training checkpoints), the CLAP text side (stage 2), fine-tuning and linear probes (ours or EVAR's
recipes), caption embeddings, single-process or under ``torchrun``.

Run ``python -m m2d2_embed.train --help``. Nothing here is imported by ``import m2d2_embed``; importing this
package itself is cheap (the submodules load on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_config": "config",
    "Stage1Config": "config",
    "Stage2Config": "config",
    "FinetuneConfig": "config",
    "run": "stages",
    "Trainer": "loop",
    "info_nce": "losses",
    "linear_probe": "downstream",
    "make_synthetic_dataset": "data",
    "load_caption_embeddings": "data",
    "read_upstream_caption_embeddings": "data",
    "caption_embeddings": "captions",
    "read_training_state": "upstream",
    "write_upstream_checkpoint": "upstream",
    "Lars": "loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
