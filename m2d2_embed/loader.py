"""``load()``: a name, path or URL -> a ready ``M2D2`` on the requested device and dtype."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path

import torch

from . import registry
from .convert import CheckpointError, read_any
from .encoder import cpu_int8_full_range, cpu_native_bf16, pack_for_cpu
from .model import M2D2

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """None -> bfloat16 on CUDA, float32 elsewhere; 'int8' (CPU only) -> dynamic int8 Linear layers.

    Warns (``RuntimeWarning``) for bfloat16/float16 on a CPU that lacks native bfloat16 arithmetic, where they
    run emulated at a fraction of float32's speed."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16, float16 or 'int8' (CPU)")
    else:
        key = str(dtype).lower()
        if key in ("int8", "qint8"):
            if device.type != "cpu":
                raise ValueError("dtype='int8' (dynamic quantization) runs on the CPU only; use bf16 on CUDA")
            return "int8"
        if key not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of fp32, bf16, fp16, int8")
        dtype = _DTYPES[key]
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_native_bf16():
        # measured on a 2-core Zen 3 (AVX2, no AVX512-BF16): the bf16 encoder ran at 0.32x float32 (issue 14)
        warnings.warn(f"dtype={dtype} on a CPU without native bfloat16 (no AVX512-BF16/AMX) is emulated and was "
                      f"measured at about 0.3x the speed of float32; use the default float32 (or dtype='int8' "
                      f"for speed)", RuntimeWarning, stacklevel=3)
    return dtype


class _SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Skip random weight initialisation while the model is built on the meta device (the checkpoint supplies
    every weight). On meta tensors ``normal_`` (nn.Embedding's init) runs a Python decomposition whose first use
    imports torch._dynamo, about 1 s of a 1.1 s load. Thread-local, like every torch function mode."""

    _SKIPPED = frozenset({torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SKIPPED:
            t = args[0] if args else kwargs.get("tensor")  # nn.init passes the tensor by keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build_model(state_dict: dict[str, torch.Tensor], config, device: torch.device,
                dtype: torch.dtype | str, compile: bool = False) -> M2D2:
    """Rebuild an ``M2D2`` from our state dict without allocating random weights first."""
    with torch.device("meta"), _SkipRandomInit():
        model = M2D2(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    if missing:
        raise CheckpointError(f"checkpoint {config.name!r} lacks {len(missing)} learned tensors: {missing[:10]}")
    unexpected = sorted(set(state_dict) - expected)
    if unexpected:
        log.warning("ignoring %d unexpected tensors: %s", len(unexpected), unexpected[:10])
    for k, v in model.state_dict().items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"tensor {k} has shape {tuple(state_dict[k].shape)}, "
                                  f"the config expects {tuple(v.shape)}")
    model.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
    if dtype == "int8":
        if compile:
            raise ValueError("compile=True does not support dtype='int8' (dynamically quantized layers); "
                             "use one or the other")
        model.float()
        quantize_int8(model)
        return model.eval()
    # the front end stays float32 (its buffers are not parameters of the checkpoint)
    model.encoder.to(device=device, dtype=dtype)
    if model.audio_proj is not None:
        model.audio_proj.to(device=device, dtype=dtype)
    if model.text_encoder is not None:
        model.text_encoder.to(device=device, dtype=dtype)
    model.frontend.to(device)
    model.eval()
    if compile:
        compile_encoder(model)
    elif device.type == "cpu" and dtype == torch.float32:
        pack_for_cpu(model.encoder)  # fused oneDNN matmuls for float32 CPU inference (see encoder.py)
        if model.audio_proj is not None:
            pack_for_cpu(model.audio_proj)
    return model


def quantize_int8(model: M2D2) -> None:
    """Dynamic int8 quantization (CPU) of the Linear layers of the audio encoder and the CLAP audio head, in place.

    Weights are quantized per output channel once; activations per tensor at run time (``quantize_dynamic``
    with ``per_channel_dynamic_qconfig``). Attention, LayerNorm, the patch projection and the text encoder
    stay float32. About 1.6-1.9x the (fused) float32 encoder on a 2-core AVX-512 VNNI CPU; outputs agree with
    float32 to a cosine of about 0.998 or better (see benchmarks/README.md).
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # torch.ao.quantization is deprecated in favour of torchao
        raise RuntimeError(f"dtype='int8' needs torch.ao.quantization.quantize_dynamic, which PyTorch "
                           f"{torch.__version__} does not provide; use dtype='fp32'") from e
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "onednn", "qnnpack")):
        raise RuntimeError(f"dtype='int8' needs a quantized CPU engine; this PyTorch build has {engines}")
    spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
    mapping = {torch.nn.Linear: _full_range_int8_linear()} if cpu_int8_full_range() else None
    with warnings.catch_warnings():
        # torch >= 2.10 warns that torch.ao.quantization moves to torchao; the eager dynamic path still works
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        model.encoder = quantize_dynamic(model.encoder, spec, dtype=torch.qint8, mapping=mapping)
        if model.audio_proj is not None:
            model.audio_proj = quantize_dynamic(model.audio_proj, spec, dtype=torch.qint8, mapping=mapping)


def _full_range_int8_linear() -> type:
    """PyTorch's dynamic int8 Linear, with activations quantized to all 8 bits instead of 7 (``reduce_range``).

    The 7-bit range guards fbgemm's AVX2 kernels against int16 saturation; on AVX512-VNNI/AMX CPUs products sum
    in int32, and the full range halves the activation rounding error: min token cosine vs float32 0.9987 -> 0.9995
    on ViT-B at the same speed (benchmarks/README.md)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeInt8Linear(DynamicLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._packed_params.dtype != torch.qint8:
                return super().forward(x)
            packed = self._packed_params._packed_params  # noqa: SLF001 (PyTorch's own packed weights)
            y = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)
            return y.to(x.dtype)

    return FullRangeInt8Linear


def compile_encoder(model: M2D2) -> None:
    """``torch.compile`` the audio encoder in place (state dict keys unchanged).

    Only full chunks (10 s, the encoder's training width) run through the compiled graph; their micro-batches
    are padded up to a few fixed sizes (``batch_size`` and its halvings, see ``M2D2._run_encoder``), so the
    encoder compiles once per size actually used and never per batch. Shorter last chunks of a clip run
    eagerly. The first call of each size pays the compilation (tens of seconds on a GPU).
    """
    model.encoder.compile(dynamic=False)
    model._compiled = True
    log.info("audio encoder compiled with torch.compile (dynamic=False); the first batches pay the compilation")


def load(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, cache_dir: str | os.PathLike | None = None,
         offline: bool | None = None, compile: bool = False) -> M2D2:
    """Load an M2D2 model.

    Args:
        name_or_path: a registry name (see :func:`available_models`; default ``"m2d2-clap-2025"``), a local
            upstream ``.pth``, one of our ``.safetensors`` files or a directory holding our converted format.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default CUDA when available.
        dtype: default bfloat16 on CUDA, float32 on CPU; ``torch.float32`` gives reference-exact numbers.
            ``"int8"``: dynamic int8 quantization of the Linear layers (CPU).
        cache_dir: where downloaded and converted weights live (default ``$M2D2_EMBED_CACHE`` or
            ``~/.cache/m2d2_embed``).
        offline: only use the cache; never download.
        compile: ``torch.compile`` the audio encoder (worth it for long jobs on a GPU). Full 10-s chunks run
            through the compiled graph in micro-batches padded to a few fixed sizes, so it compiles once per size
            (a one-off warm-up of tens of seconds), not per batch. Not with ``dtype='int8'``. On the CPU it is
            slower than the default fused float32 path and warns (``RuntimeWarning``).

    On the CPU in float32 the encoder's blocks run fused oneDNN matmuls on weights reordered at load time
    (:func:`m2d2_embed.encoder.pack_for_cpu`); bfloat16/float16 on a CPU without native bfloat16 warns.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if compile and dev.type == "cpu":
        warnings.warn("compile=True on the CPU does not pay: it replaces the fused oneDNN float32 path and ran at "
                      "0.6-0.7x its speed on a 2-core Zen 4 (0.9-1.0x the plain eager encoder on an AVX2 Zen 3), "
                      "after a warm-up of 1-5 minutes per batch size (benchmarks/README.md); leave compile=False "
                      "on the CPU", RuntimeWarning, stacklevel=2)
    target = registry.DEFAULT_MODEL if name_or_path is None else name_or_path
    path = _resolve(target, cache_dir=cache_dir, offline=offline)
    sd, cfg = read_any(path)
    if cfg.text is not None and cfg.text_weights and not any(k.startswith("text_encoder.") for k in sd):
        from .hub import fetch_text_weights  # e.g. GTE-base for the 2024 M2D-CLAP, from the Hub's cache

        text_sd, text_cfg = fetch_text_weights(cfg, offline=offline)
        sd, cfg = {**sd, **text_sd}, dataclasses.replace(cfg, text=text_cfg)
    model = build_model(sd, cfg, dev, dt, compile=compile)
    log.info("loaded %s from %s on %s (%s%s)", cfg.name, path, dev, dt, ", compiled" if compile else "")
    return model


def _resolve(target: str | os.PathLike, *, cache_dir, offline) -> Path:
    """A name, path or URL -> a local path that ``read_any`` understands."""
    s = os.fspath(target)
    if s in registry.MODELS:
        from .hub import fetch_registry_model

        return fetch_registry_model(registry.get(s), cache_dir=cache_dir, offline=offline)
    if s.startswith(("http://", "https://", "hf://")):
        from .hub import fetch_remote

        return fetch_remote(s, cache_dir=cache_dir, offline=offline)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if os.sep in s or s.endswith((".pth", ".safetensors", ".pt")):
        raise FileNotFoundError(f"checkpoint not found: {p}")
    registry.get(s)  # raises: unknown model name, listing the available ones
    raise AssertionError("unreachable")
