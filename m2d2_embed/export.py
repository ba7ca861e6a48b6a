"""Export a model for other runtimes: the audio encoder (and the CLAP audio head) as ONNX, plus a JSON manifest of
the front-end settings, the norm stats and the tensor contracts, so that ONNX Runtime, OpenVINO and the like can
run the model without this package.

Needs the ``onnx`` extra (``pip install 'm2d2-embed[onnx]'``: onnx and onnxscript, which PyTorch's exporter uses;
onnxruntime to run the result). The exported weights are still NTT's, under the licence of the checkpoint they
came from (see the README): not for redistribution.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .encoder import Block
from .model import M2D2

log = logging.getLogger(__name__)

MANIFEST = "m2d2_export.json"
ENCODER_FILE = "encoder.onnx"
HEAD_FILE = "audio_head.onnx"
FORMAT_VERSION = 1


def export_onnx(
    model: M2D2 | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    heads: bool = True,
    opset: int | None = None,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path:
    """Write ``out_dir/encoder.onnx`` (and ``audio_head.onnx``) and ``out_dir/m2d2_export.json``; returns the JSON.

    ``encoder.onnx``: input ``lms`` float32 [batch, 1, n_mels, frames], the normalised log-mel of chunks of
    ``frames = 16 * t`` frames (1 <= t <= the model's time patches, 62: 10 s), batch and frames dynamic; output
    ``tokens`` float32 [batch, f * t, D] (f = 5 frequency patches, D = 768), in (frequency, time) order, exactly the
    encoder call of :class:`M2D2` (the CLS token dropped). ``audio_head.onnx`` (CLAP models): input ``tokens``
    float32 [batch, N, D] (any N: the head ignores token order), output ``embedding`` float32 [batch, out_dim],
    before L2 normalisation. The manifest holds the front-end settings and norm stats, the chunking rules and
    the weights' fingerprint.

    Args:
        model: a loaded float32 CPU model, or a name/path/URL for :func:`m2d2_embed.load` (loaded on the CPU in
            float32).
        out_dir: created if missing; existing export files are replaced only with ``overwrite``.
        heads: also export the CLAP audio head, when the model has one.
        opset: ONNX opset (default: PyTorch's exporter's default).
        cache_dir, offline: as for :func:`m2d2_embed.load`, when ``model`` is a name.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript; fail early with the extra's name)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the onnx extra: pip install 'm2d2-embed[onnx]' (onnx, onnxscript); missing: {e.name}"
        ) from e
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6):
        raise RuntimeError(
            f"ONNX export needs PyTorch >= 2.6 (its torch.export-based exporter); this is "
            f"{torch.__version__}: upgrade torch to export"
        )
    if not isinstance(model, M2D2):
        from .loader import load

        model = load(model, device="cpu", dtype=torch.float32, cache_dir=cache_dir, offline=offline)
    if (
        model.device.type != "cpu"
        or model.dtype != torch.float32
        or not isinstance(model.encoder.pos_embed, torch.nn.Parameter)
    ):
        raise ValueError(
            f"export needs a float32 CPU model, got {model.dtype} on {model.device}; load it with "
            "m2d2_embed.load(name, device='cpu', dtype='fp32') (int8 and compiled models do not export)"
        )
    out = Path(out_dir)
    targets = [out / MANIFEST, out / ENCODER_FILE]
    head = model.audio_proj if heads else None
    if head is not None:
        targets.append(out / HEAD_FILE)
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (CLI: --overwrite) to replace the export")
    out.mkdir(parents=True, exist_ok=True)

    enc_cfg = model.config.encoder
    (F, T), pw = enc_cfg.grid, enc_cfg.patch_size[1]
    batch, t = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("time_patches", min=1, max=T)
    packed = [b for b in model.modules() if isinstance(b, Block) and b.packed]
    for b in packed:  # trace the plain nn.Linear path: the fused oneDNN ops have no ONNX form
        b.unpack()
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        example = torch.zeros(2, 1, enc_cfg.input_size[0], T * pw)
        _export(model.encoder, (example,), tmp / ENCODER_FILE, ["lms"], ["tokens"], {"x": {0: batch, 3: pw * t}}, opset)
        if head is not None:
            n_tokens = torch.export.Dim("tokens", min=1, max=1 << 20)
            _export(
                _HeadNoMask(head),
                (torch.zeros(2, F * T, model.embed_dim),),
                tmp / HEAD_FILE,
                ["tokens"],
                ["embedding"],
                {"tokens": {0: batch, 1: n_tokens}},
                opset,
            )
        manifest = export_manifest(model, head is not None)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):  # the manifest last: marks a whole export
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for b in packed:
            b.pack_for_cpu()
    log.info("exported %s to %s", model.name, out)
    return out / MANIFEST


class _HeadNoMask(torch.nn.Module):
    """The CLAP audio head without a key mask (every token real), the form the exporter traces."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens)


def _export(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic_shapes: dict,
    opset: int | None,
) -> None:
    kw: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            optimize=True,
            verbose=False,
            **kw,
        )
    # weights beside the graph (encoder.onnx.data): ONNX protobufs stop at 2 GiB, and one layout for every size
    program.save(str(path), external_data=True)


def export_manifest(model: M2D2, with_head: bool) -> dict[str, Any]:
    """The JSON that travels with an ONNX export: what to feed the encoder and how to read its tokens."""
    from . import __version__
    from .files import weights_fingerprint

    cfg = model.config
    (F, T), (ph, pw) = cfg.encoder.grid, cfg.encoder.patch_size
    m: dict[str, Any] = {
        "format": "m2d2-embed-onnx",
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "weights_fingerprint": weights_fingerprint(model),
        "m2d2_embed": __version__,
        "torch": torch.__version__,
        "licence": "The weights are NTT's and keep the licence of the checkpoint they were converted from; "
        "exported files are not for redistribution (see the m2d2-embed README).",
        "frontend": {
            **dataclasses.asdict(cfg.frontend),
            "window": "periodic Hann of win_length samples, centred frames with reflect padding of n_fft // 2",
            "spectrum": "power (|STFT|^2), one-sided",
            "mel": "Slaney mel scale, Slaney area normalisation, n_mels triangular filters over [f_min, f_max]",
            "log": "natural log(mel + 1.1920929e-07) (float32 machine epsilon)",
            "normalise": "(log_mel - norm_mean) / norm_std",
            "frames": "1 + num_samples // hop_length",
        },
        "chunking": {
            "chunk_frames": cfg.encoder.chunk_frames,
            "rule": f"consecutive non-overlapping chunks of chunk_frames log-mel frames; each chunk is cut or "
            f"zero-padded (after normalisation) to {pw} * t frames, t = min({T}, ceil(width / {pw})); "
            f"frames past the last whole patch are ignored",
        },
        "encoder": {
            "file": ENCODER_FILE,
            "input": "lms",
            "output": "tokens",
            "input_shape": ["batch", 1, cfg.encoder.input_size[0], f"{pw} * t"],
            "time_patches_max": T,
            "output_shape": ["batch", f"{F} * t", cfg.encoder.embed_dim],
            "patch_size": [ph, pw],
            "freq_patches": F,
            "embed_dim": cfg.encoder.embed_dim,
            "token_order": "frequency-major: token i is frequency patch i // t, time patch i % t",
            "frame_embeddings": f"tokens.reshape(batch, {F}, t, D).permute(0, 2, 1, 3).reshape(batch, t, {F} * D)"
            f"; one frame per {pw} log-mel frames ({pw * cfg.frontend.hop_length} samples); "
            "chunks joined in time",
        },
    }
    if with_head:
        m["audio_head"] = {
            "file": HEAD_FILE,
            "kind": cfg.audio_head.kind,
            "input": "tokens",
            "output": "embedding",
            "input_shape": ["batch", "tokens", cfg.encoder.embed_dim],
            "output_shape": ["batch", cfg.audio_head.out_dim],
            "use": "all patch tokens of the whole clip, all chunks together (m2d2_embed does so up "
            "to 300 s; beyond, it averages the head's outputs over 10-s chunks); "
            "L2-normalise for similarities",
        }
    return m
