"""``load()``: a name, path or URL -> a ready ``M2D2`` on the requested device and dtype.

The whole load path reads top to bottom in this file: a registry name (or URL) -> the converted weights in the
cache (downloaded, checked and converted once) -> our state dict and config -> the model.

Cache layout (``<cache>`` from :func:`m2d2_embed.download.cache_dir`)::

    <cache>/<name>/model.safetensors, config.json,    converted registry model (what load() reads); the
                   checksum.json                      weights' SHA-256, recorded when converted
    <cache>/downloads/<release>.zip[.sha256]          the official archive (removed after conversion
    <cache>/downloads/<folder>/checkpoint-NN.pth      unless keep_source=True)
    <cache>/url-<hash>/...                            the same for a model loaded from an http(s) URL

Nothing bad stays in the cache: a download that is not a valid archive or checkpoint is deleted with everything
derived from it, and hashes are recorded only once conversion succeeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from . import download as dl
from . import fp8, registry
from .backends import attach_backend, check_backend
from .config import ModelConfig, TextConfig
from .convert import (
    CHECKSUM_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_finite,
    describe_file,
    read_any,
    read_config,
    read_safetensors,
    record_checksum,
    save_model,
    text_config_from_state_dict,
    verify_checksum,
)
from .download import DownloadError
from .encoder import cpu_int8_full_range, cpu_native_bf16, pack_for_cpu
from .model import M2D2
from .registry import LICENSE_SUMMARY, LICENSE_URL, MODELS, ModelInfo

log = logging.getLogger(__name__)

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
_FP8 = {  # dtype names -> fp8.POLICIES
    **dict.fromkeys(("fp8", "float8", "fp8_e4m3", "float8_e4m3", "float8_e4m3fn"), "fp8"),
    **dict.fromkeys(("fp8-all", "fp8_all", "float8-all", "float8_all"), "fp8-all"),
}


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
    """None -> bfloat16 on CUDA, float32 elsewhere; 'int8' (CPU only) -> dynamic int8 Linear layers; 'fp8' (also
    'float8', 'fp8_e4m3'; CUDA, compute capability 8.9+) -> float8 Linear layers in the later half of the encoder's
    blocks, bfloat16 elsewhere; 'fp8-all' -> in every block.

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
        if key in _FP8:
            fp8.check_support(device)  # raises on the CPU, on GPUs older than Ada/Hopper, on old PyTorch builds
            return _FP8[key]
        if key not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of fp32, bf16, fp16, int8, fp8, fp8-all")
        dtype = _DTYPES[key]
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_native_bf16():
        # measured on a 2-core Zen 3 (AVX2, no AVX512-BF16): the bf16 encoder ran at 0.32x float32 (issue 14)
        warnings.warn(
            f"dtype={dtype} on a CPU without native bfloat16 (no AVX512-BF16/AMX) is emulated and was "
            f"measured at about 0.3x the speed of float32; use the default float32 (or dtype='int8' "
            f"for speed)",
            RuntimeWarning,
            stacklevel=3,
        )
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


def build_model(
    state_dict: dict[str, torch.Tensor],
    config,
    device: torch.device,
    dtype: torch.dtype | str,
    compile: bool = False,
    pack: bool = True,
) -> M2D2:
    """Rebuild an ``M2D2`` from our state dict without allocating random weights first. ``pack=False`` leaves out
    the fused CPU weights (for a model whose encoder another runtime runs)."""
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
            raise CheckpointError(
                f"tensor {k} has shape {tuple(state_dict[k].shape)}, the config expects {tuple(v.shape)}"
            )
    model.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
    if dtype == "int8":
        if compile:
            raise ValueError(
                "compile=True does not support dtype='int8' (dynamically quantized layers); use one or the other"
            )
        model.float()
        quantize_int8(model)
        model.quantization = "int8"
        return model.eval()
    if dtype in fp8.POLICIES:
        # the Linear weights are quantized from the checkpoint's float32 on the device; every other module then
        # runs as the bfloat16 model (FP8Linear keeps its float8 weights through the casts below)
        if not fp8.EMULATE:
            fp8.probe(device)
        model.encoder.to(device=device)
        depth = model.config.encoder.depth
        first = fp8.POLICIES[dtype](depth)  # type: ignore[index]
        n = fp8.quantize_encoder(model.encoder, first_block=first)
        log.info(
            "dtype=%r: %d Linear layers (blocks %d-%d of %d) in float8_e4m3fn, the rest in bfloat16",
            dtype,
            n,
            first,
            depth - 1,
            depth,
        )
        model.quantization = dtype
        dtype = torch.bfloat16
    # the front end stays float32 (its buffers are not parameters of the checkpoint)
    model.encoder.to(device=device, dtype=dtype)
    if model.audio_proj is not None:
        model.audio_proj.to(device=device, dtype=dtype)
    if model.text_encoder is not None:
        model.text_encoder.to(device=device, dtype=dtype)
    if model.classifier is not None:  # the task head stays float32 (see heads.Classifier)
        model.classifier.to(device=device, dtype=torch.float32)
    model.frontend.to(device)
    model.eval()
    if compile:
        compile_encoder(model)
    elif device.type == "cpu" and dtype == torch.float32 and pack:
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
    model.encoder = quantize_linears_int8(model.encoder)
    if model.audio_proj is not None:
        model.audio_proj = quantize_linears_int8(model.audio_proj)


def quantize_linears_int8(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its ``nn.Linear`` layers replaced by the dynamic int8 Linear of ``dtype="int8"`` (CPU).

    Weights per output channel; activations per tensor at run time, on all 8 bits on VNNI/AMX CPUs
    (``encoder.cpu_int8_full_range``), else PyTorch's 7-bit range. Returns the quantized module (a copy; a
    bare ``nn.Linear`` is quantized too). Raises ``RuntimeError`` when this PyTorch build cannot quantize.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # torch.ao.quantization is deprecated in favour of torchao
        raise RuntimeError(
            f"dtype='int8' needs torch.ao.quantization.quantize_dynamic, which PyTorch "
            f"{torch.__version__} does not provide; use dtype='fp32'"
        ) from e
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "onednn", "qnnpack")):
        raise RuntimeError(f"dtype='int8' needs a quantized CPU engine; this PyTorch build has {engines}")
    spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
    mapping = {torch.nn.Linear: _full_range_int8_linear()} if cpu_int8_full_range() else None
    holder = torch.nn.Sequential(module) if isinstance(module, torch.nn.Linear) else module
    with warnings.catch_warnings():
        # torch >= 2.10 warns that torch.ao.quantization moves to torchao; the eager dynamic path still works
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        out = quantize_dynamic(holder, spec, dtype=torch.qint8, mapping=mapping)
    return out[0] if holder is not module else out


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
    model.compiled = True
    log.info("audio encoder compiled with torch.compile (dynamic=False); the first batches pay the compilation")


def load(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    compile: bool = False,
    backend: str | None = None,
) -> M2D2:
    """Load an M2D2 model.

    Args:
        name_or_path: a registry name (see :func:`available_models` and :func:`list_models`; default
            ``"m2d2-clap-2025"``), a local upstream ``.pth``, one of our ``.safetensors`` files or a directory
            holding our converted format, an ``http(s)://`` URL or ``hf://owner/repo[/file][@rev]``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default CUDA when available.
        dtype: default bfloat16 on CUDA, float32 on CPU; ``torch.float32`` gives reference-exact numbers.
            ``"int8"``: dynamic int8 quantization of the Linear layers (CPU). ``"fp8"``: the Linear layers of the
            later half of the encoder's blocks in float8 e4m3 (per-channel weight and per-token activation scales,
            :mod:`m2d2_embed.fp8`), all else in bfloat16; ``"fp8-all"``: of every block (faster, less accurate);
            NVIDIA GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell) only. ``model.dtype`` is then
            ``torch.bfloat16`` (the activations) and ``model.quantization`` is ``"fp8"`` or ``"fp8-all"``.
        cache_dir: where downloaded and converted weights live (default ``$M2D2_EMBED_CACHE`` or
            ``~/.cache/m2d2_embed``).
        offline: only use the cache; never download.
        compile: ``torch.compile`` the audio encoder (worth it for long jobs on a GPU). Full 10-s chunks run
            through the compiled graph in micro-batches padded to a few fixed sizes, so it compiles once per size
            (a one-off warm-up of tens of seconds), not per batch. Not with ``dtype='int8'``. On the CPU it is
            slower than the default fused float32 path and warns (``RuntimeWarning``).
        backend: who runs the audio encoder: ``"torch"`` (default), or on the CPU in float32 ``"onnxruntime"``
            or ``"openvino"`` (extras ``onnx`` / ``openvino``). The encoder is exported to ONNX once per weights
            (about 20 s for ViT-B) and cached under ``<cache>/onnx/``; every output keeps its shape and meaning
            (tokens within about 1e-5 of PyTorch). See :mod:`m2d2_embed.backends` for when it pays.

    On the CPU in float32 the encoder's blocks run fused oneDNN matmuls on weights reordered at load time
    (:func:`m2d2_embed.encoder.pack_for_cpu`); bfloat16/float16 on a CPU without native bfloat16 warns.

    Raises:
        ValueError: unknown name, device, dtype or backend, or a backend with a device/dtype it cannot run;
            ``dtype="fp8"`` on the CPU or on a GPU without FP8 tensor cores.
        ImportError: the backend's runtime is not installed (the message names the extra).
        RuntimeError: ``dtype="fp8"`` with a PyTorch build whose FP8 matmul is missing or fails its probe.
        DownloadError: the weights could not be downloaded (the message says how to work offline instead).
        CheckpointError: the weights are damaged, not finite or of an unknown layout (the message names the
            file and the fix).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    backend = check_backend(backend, dev, dt, compile)
    if compile and dev.type == "cpu":
        warnings.warn(
            "compile=True on the CPU does not pay: it replaces the fused oneDNN float32 path and ran at "
            "0.6-0.7x its speed on a 2-core Zen 4 (0.9-1.0x the plain eager encoder on an AVX2 Zen 3), "
            "after a warm-up of 1-5 minutes per batch size (benchmarks/README.md); leave compile=False "
            "on the CPU",
            RuntimeWarning,
            stacklevel=2,
        )
    target = registry.DEFAULT_MODEL if name_or_path is None else name_or_path
    path = _resolve(target, cache_dir=cache_dir, offline=offline)
    sd, cfg = read_any(path)
    if cfg.text is not None and cfg.text_weights and not any(k.startswith("text_encoder.") for k in sd):
        text_sd, text_cfg = fetch_text_weights(cfg, offline=offline)  # e.g. GTE-base for the 2024 M2D-CLAP
        sd, cfg = {**sd, **text_sd}, dataclasses.replace(cfg, text=text_cfg)
    on_torch = backend == "torch"
    model = build_model(sd, cfg, dev, dt if on_torch else torch.float32, compile=compile, pack=on_torch)
    if not on_torch:
        attach_backend(model, backend, cache_dir, int8=dt == "int8")
    extra = ", compiled" if compile else "" if backend == "torch" else f", encoder in {backend}"
    log.info("loaded %s from %s on %s (%s%s)", cfg.name, path, dev, dt, extra)
    return model


def peek_config(
    name_or_path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
) -> ModelConfig | None:
    """The config :func:`load` would give, read without the weights, when the model is already here in our format
    (a converted directory or ``.safetensors`` file, or a registry model in the cache); None otherwise (a
    download, a URL, an upstream ``.pth`` to convert, an unreadable file: :func:`load` then says what is wrong).
    Lets work that depends only on the model's geometry (its sample rate, chunk length) start while it loads."""
    s = os.fspath(registry.DEFAULT_MODEL if name_or_path is None else name_or_path)
    if s in MODELS:
        path = converted_path(registry.get(s), cache_dir)
    elif s.startswith(("http://", "https://", "hf://")):
        return None
    else:
        path = Path(s).expanduser()
    if not (path.is_dir() or path.suffix == ".safetensors"):
        return None
    try:
        return read_config(path)
    except (OSError, ValueError, TypeError, KeyError, CheckpointError) as e:
        log.debug("no config of %s before loading: %s", s, e)
        return None


def _resolve(target: str | os.PathLike, *, cache_dir, offline) -> Path:
    """A name, path or URL -> a local path that ``read_any`` understands."""
    s = os.fspath(target)
    if s in MODELS:
        return fetch_registry_model(registry.get(s), cache_dir=cache_dir, offline=offline)
    if s.startswith(("http://", "https://", "hf://")):
        return fetch_remote(s, cache_dir=cache_dir, offline=offline)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if os.sep in s or s.endswith((".pth", ".safetensors", ".pt")):
        raise FileNotFoundError(f"checkpoint not found: {p}")
    registry.get(s)  # raises: unknown model name, listing the available ones
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------
# Registry names and URLs -> converted weights in the cache
# ---------------------------------------------------------------------------------------------------

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def converted_path(info: ModelInfo, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted safetensors of a registry model live in the cache."""
    return dl.cache_dir(cache_dir) / info.name


def _is_converted(d: Path) -> bool:
    return (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file()


def _offline_advice(name: str) -> str:
    return (
        f"To work without this download, pass a local checkpoint instead (`--model PATH` on the command line, "
        f"`m2d2_embed.load(PATH)` in Python: an upstream .pth or a converted folder), or run "
        f"`m2d2-embed download {name}` on a machine that can reach the release and copy its cache folder "
        f"(`m2d2-embed cache` prints it) here, pointing {dl.ENV_CACHE} at the copy"
    )


class _BadPayload(Exception):
    """The server answered, but what it sent is not a usable archive or checkpoint."""


def _pick_member(archive: Path) -> str:
    with zipfile.ZipFile(archive) as zf:
        found = [n for n in zf.namelist() if n.endswith(_CHECKPOINT_SUFFIXES)]
    if len(found) != 1:
        listed = ", ".join(found[:10]) or "none"
        raise _BadPayload(
            f"it holds {len(found)} checkpoint files ({listed}); expected exactly one .pth or .safetensors"
        )
    return found[0]


def _convert_into(pth: Path, dst: Path, config: ModelConfig | None, text_weights: str | None = None) -> None:
    """Convert ``pth`` into the folder ``dst``, which appears whole or not at all."""
    tmp = dst.with_name(dst.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    sd, cfg = read_any(pth, config)
    cfg = dataclasses.replace(cfg, name=dst.name)
    if text_weights and cfg.text is None:  # the text encoder lives elsewhere; fetched at load time
        cfg = dataclasses.replace(cfg, text=TextConfig(pooling="mean"), text_weights=text_weights)
    try:
        save_model(sd, cfg, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(*paths: Path | None) -> None:
    """Delete a bad download and everything derived from it (sidecars, partial and extracted files)."""
    for p in paths:
        if p is None:
            continue
        for q in (
            p,
            p.with_name(p.name + ".sha256"),
            p.with_name(p.name + ".part"),
            p.with_name(p.name + ".converting"),
        ):
            if q.is_dir():
                shutil.rmtree(q, ignore_errors=True)
            else:
                q.unlink(missing_ok=True)


def _download_and_convert(
    url: str,
    member: str | None,
    member_sha256: str | None,
    work: Path,
    dst: Path,
    *,
    config: ModelConfig | None,
    text_weights: str | None,
    progress: bool | None,
    hint: str,
    keep_source: bool,
    advice: str = "",
) -> None:
    """Download a release zip (or a bare checkpoint) into ``work``, check it, convert it into ``dst``.

    A payload that is not a valid archive or checkpoint is deleted with everything derived from it. A pinned
    hash that does not match is deleted and downloaded again once (a transfer or cache hiccup), then an error.
    Hashes are recorded (``keep_source``) only once the conversion succeeded.
    """
    name = PurePosixPath(unquote(urlparse(url).path)).name or "download"
    is_zip = name.endswith(".zip")
    for attempt in (1, 2):
        archive, ckpt = work / name, None
        try:
            try:
                if is_zip:
                    dl.download_url(url, archive, progress=progress, hint=hint, record_hash=False)
                    try:
                        inner = member or _pick_member(archive)
                        ckpt = work / inner
                        dl.extract_member(archive, inner, ckpt)
                    except (zipfile.BadZipFile, DownloadError) as e:
                        raise _BadPayload(f"it is not a usable release archive ({e})") from e
                    if member_sha256 and (got := dl.sha256_file(ckpt)) != member_sha256:
                        raise dl.ChecksumMismatch(
                            f"SHA-256 mismatch for {inner} extracted from {url}: expected {member_sha256}, got {got}"
                        )
                else:
                    ckpt = dl.download_url(
                        url, archive, sha256=member_sha256, progress=progress, hint=hint, record_hash=False
                    )
                _convert_into(ckpt, dst, config, text_weights)
            except dl.ChecksumMismatch:
                raise
            except DownloadError as e:  # the network or the server failed: nothing usable arrived
                raise DownloadError(f"{e}. {advice}" if advice else str(e)) from e
            except CheckpointError as e:
                raise _BadPayload(str(e)) from e
        except dl.ChecksumMismatch as e:
            _discard(archive, ckpt, dst.with_name(dst.name + ".converting"))
            if attempt == 1:
                log.warning("%s; deleted it, downloading again once", e)
                continue
            raise dl.ChecksumMismatch(
                f"{e}, twice in a row. The downloads were deleted; the file on the server "
                "differs from the one this version of m2d2-embed knows: report it, or "
                "load a checkpoint you trust by path"
            ) from e
        except _BadPayload as e:
            what = describe_file(archive if archive.is_file() else ckpt) if (archive.is_file() or ckpt) else "?"
            _discard(archive, ckpt, dst.with_name(dst.name + ".converting"))
            kind = "zip archive" if is_zip else "checkpoint"
            raise dl.DownloadError(
                f"{url} did not give a valid {kind}: received {what}; {e}. It was deleted, "
                "with everything derived from it; the next call downloads it again"
            ) from None
        break
    if keep_source:
        dl.record_sha256(archive)  # recorded only now that the download proved usable
        return
    _discard(archive, ckpt)  # only this download's files: another process may be downloading beside them
    if ckpt is not None and ckpt.parent != work:
        try:
            ckpt.parent.rmdir()
        except OSError:  # not empty: shared with another download
            pass


def fetch_registry_model(
    info: ModelInfo,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool | None = None,
    keep_source: bool = False,
) -> Path:
    """Converted weights of a registry model: from the cache, else downloaded, verified and converted.

    Raises:
        DownloadError: offline and not cached, the download failed (the message says how to use a local
            checkpoint or a cache copied from another machine instead), or the server sent something that is
            not the release (deleted again; the next call downloads afresh).
    """
    dst = converted_path(info, cache_dir)
    if _is_converted(dst):
        return dst
    hint = f"fetch it while online with `m2d2-embed download {info.name}`, or pass a local checkpoint path"
    if dl.is_offline(offline):
        raise DownloadError(
            f"model {info.name!r} is not in the cache ({dst}) and offline mode is on "
            f"(offline=True, M2D2_EMBED_OFFLINE=1 or HF_HUB_OFFLINE=1). {_offline_advice(info.name)}"
        )
    root = dl.cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    import filelock

    with filelock.FileLock(str(dst) + ".lock"):
        if _is_converted(dst):  # another process finished it while we waited
            return dst
        log.warning(
            "downloading %s (about %d MB) from %s\nLicence: %s (%s)",
            info.name,
            info.size_mb,
            info.url,
            LICENSE_SUMMARY,
            LICENSE_URL,
        )
        _download_and_convert(
            info.url,
            info.member,
            info.sha256,
            root / "downloads",
            dst,
            config=info.config,
            text_weights=info.text_weights,
            progress=progress,
            hint=hint,
            keep_source=keep_source,
            advice=_offline_advice(info.name),
        )
    return dst


def fetch_remote(
    spec: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool | None = None,
    keep_source: bool = False,
) -> Path:
    """``hf://owner/repo[/path][@rev]`` or an ``http(s)://`` URL (zip, .pth or .safetensors) -> a local path."""
    if spec.startswith("hf://"):
        return dl.hf_download(spec, offline=offline, hint="download it once while online")
    name = PurePosixPath(unquote(urlparse(spec).path)).name
    if not name.endswith((".zip", *_CHECKPOINT_SUFFIXES)):
        raise ValueError(f"cannot tell what {spec!r} holds; a URL must end in .zip, .pth, .pt or .safetensors")
    root = dl.cache_dir(cache_dir) / f"url-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"
    hint = f"fetch it while online with `m2d2-embed download {spec}`"
    if name.endswith(".safetensors"):
        return _fetch_safetensors(spec, root / name, progress=progress, offline=offline, hint=hint)
    dst = root / "converted"
    if _is_converted(dst):
        return dst
    if dl.is_offline(offline):
        raise DownloadError(f"{spec} is not in the cache ({dst}) and offline mode is on; {hint}")
    root.mkdir(parents=True, exist_ok=True)
    import filelock

    with filelock.FileLock(str(dst) + ".lock"):
        if _is_converted(dst):
            return dst
        _download_and_convert(
            spec,
            None,
            None,
            root / "source",
            dst,
            config=None,
            text_weights=None,
            progress=progress,
            hint=hint,
            keep_source=keep_source,
        )
    return dst


def _fetch_safetensors(url: str, dest: Path, *, progress: bool | None, offline: bool | None, hint: str) -> Path:
    """One of our ``.safetensors`` files from a URL; checked (header, config) before its hash is recorded."""
    recorded = dest.with_name(dest.name + ".sha256").is_file()
    path = dl.download_url(url, dest, progress=progress, offline=offline, hint=hint, record_hash=False)
    if recorded:
        return path
    try:
        read_safetensors(path)
    except CheckpointError:
        what = describe_file(path)
        _discard(path)
        raise DownloadError(
            f"{url} did not give a valid m2d2_embed .safetensors file: received {what}. It was "
            "deleted; the next call downloads it again"
        ) from None
    dl.record_sha256(path)
    return path


def download_model(
    name_or_url: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    keep_source: bool = False,
) -> Path:
    """Download (if needed), verify and convert a registry model or URL into the cache; return the converted path."""
    if name_or_url in MODELS:
        return fetch_registry_model(
            MODELS[name_or_url], cache_dir=cache_dir, offline=False, progress=progress, keep_source=keep_source
        )
    if name_or_url.startswith(("http://", "https://", "hf://")):
        return fetch_remote(name_or_url, cache_dir=cache_dir, offline=False, progress=progress, keep_source=keep_source)
    raise ValueError(f"unknown model {name_or_url!r}; available: {', '.join(MODELS)}, or an http(s):// or hf:// URL")


def fetch_text_weights(
    config: ModelConfig, *, offline: bool | None = None
) -> tuple[dict[str, torch.Tensor], TextConfig]:
    """(state dict ``text_encoder.*``, TextConfig) of a text encoder kept outside the checkpoint, e.g. GTE-base
    from the Hub (``config.text_weights``), fetched through ``huggingface_hub`` and its cache. The config comes
    from the tensor shapes; the pooling from ``config.text``."""
    from safetensors.torch import load_file

    spec = config.text_weights
    if not spec or not spec.startswith("hf://"):
        raise ValueError(f"unsupported text_weights location {spec!r}; expected hf://owner/repo/file.safetensors")
    path = dl.hf_download(spec, offline=offline, hint="load the model once while online to cache its text encoder")
    sd = load_file(str(path))
    out = {}
    for k, v in sd.items():
        for prefix in ("bert.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            out["text_encoder." + k] = v
    if "text_encoder.embeddings.word_embeddings.weight" not in out:
        raise ValueError(f"{spec} does not hold BERT-style text encoder weights (found e.g. {sorted(sd)[:5]})")
    text = text_config_from_state_dict(out, "text_encoder.", pooling=config.text.pooling)
    if "text_encoder.pooler.dense.weight" not in out:  # the pooler is unused; some exports drop it
        d = text.hidden_size
        out["text_encoder.pooler.dense.weight"] = torch.zeros(d, d)
        out["text_encoder.pooler.dense.bias"] = torch.zeros(d)
    return out, text


# ---------------------------------------------------------------------------------------------------
# The cache: list, summarise, verify, clear
# ---------------------------------------------------------------------------------------------------


def _dir_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def list_models(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The registry as rows, default first: ``name``, ``best_for`` (upstream's recommendation), ``frame_ms``
    (time between frame embeddings: 20, 40 or 160), ``dims`` (``{"frame", "clip"[, "clap"][, "classes"]}``),
    ``sample_rate`` (Hz), ``size_mb`` (approximate download), ``cached`` (bool), ``path`` (Path in the cache),
    ``description``, ``kind``, ``url``, ``license``, ``default`` (bool)."""
    out = []
    for info in MODELS.values():
        dst = converted_path(info, cache_dir)
        out.append(
            {
                "name": info.name,
                "best_for": info.best_for,
                "frame_ms": info.frame_ms,
                "dims": info.dims,
                "sample_rate": info.config.frontend.sample_rate if info.config else None,
                "size_mb": info.size_mb,
                "cached": _is_converted(dst),
                "path": dst,
                "description": info.description,
                "kind": info.kind,
                "url": info.url,
                "license": LICENSE_SUMMARY,
                "default": info.name == registry.DEFAULT_MODEL,
            }
        )
    return out


def cache_summary(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """{'path': Path, 'total_bytes': int, 'entries': [{'name': str, 'bytes': int}], 'clear_hint': str}."""
    root = dl.cache_dir(cache_dir)
    entries = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.suffix != ".lock":
                entries.append({"name": p.name, "bytes": _dir_bytes(p)})
    return {
        "path": root,
        "total_bytes": sum(e["bytes"] for e in entries),
        "entries": entries,
        "clear_hint": "remove one entry with `m2d2-embed cache --clear NAME`, or all with `m2d2-embed cache "
        f"--clear` (or by hand: rm -r {root})",
    }


def _ours(p: Path) -> bool:
    """Whether a cache folder item was made by this package (so --clear may remove it)."""
    n = p.name
    return (
        n in MODELS
        or n in ("downloads", "onnx")  # onnx: the exports of load(backend=...) (see backends.py)
        or n.startswith("url-")
        or n.endswith((".lock", ".converting"))
        or _is_converted(p)
    )


def clear_cache(name: str | None = None, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove one cache entry (a registry name or an entry folder name such as ``url-...``) with its downloads,
    or with ``name=None`` everything this package put in the cache. Returns the removed paths.

    Raises:
        ValueError: ``name`` is not in the cache (the message lists what is).
    """
    root = dl.cache_dir(cache_dir)
    if not root.is_dir():
        if name is None:
            return []
        raise ValueError(f"{name!r} is not in the cache {root} (the cache is empty)")
    if name is None:
        targets = [p for p in sorted(root.iterdir()) if _ours(p)]
        skipped = [p.name for p in root.iterdir() if not _ours(p)]
        if skipped:
            log.warning("left %d items in %s that m2d2-embed did not make: %s", len(skipped), root, skipped[:5])
    else:
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a cache entry name; see `m2d2-embed cache`")
        entry = root / name
        if not entry.exists():
            present = [p.name for p in sorted(root.iterdir()) if p.is_dir() and p.name != "downloads"]
            raise ValueError(f"{name!r} is not in the cache {root}; entries: {', '.join(present) or 'none'}")
        targets = [entry, root / f"{name}.lock", root / f"{name}.converting"]
        info = MODELS.get(name)
        if info is not None:  # its downloaded archive and extracted checkpoint, if kept
            archive = PurePosixPath(unquote(urlparse(info.url).path)).name
            downloads = root / "downloads"
            targets += [
                downloads / archive,
                downloads / (archive + ".sha256"),
                downloads / (archive + ".part"),
                downloads / archive.removesuffix(".zip"),
            ]
    removed = []
    for p in targets:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(p)
    log.info("removed %d items from the cache %s", len(removed), root)
    return removed


def verify_cache(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Hash every converted model in the cache against the SHA-256 recorded at conversion and check that its
    weights are finite. One row per entry: ``name``, ``path``, ``ok`` (bool) and ``status`` (what was found and,
    if damaged, the fix). Entries converted before hashes were recorded get one now (``status`` says so)."""
    root = dl.cache_dir(cache_dir)
    rows = []
    if not root.is_dir():
        return rows
    for p in sorted(root.iterdir()):
        weights = p / WEIGHTS_NAME
        if p.name.startswith("url-"):
            weights = p / "converted" / WEIGHTS_NAME
        if not weights.is_file():
            continue
        row = {"name": p.name, "path": weights.parent, "ok": True, "status": "ok"}
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            had = verify_checksum(weights, full=True)

            check_finite(load_file(str(weights)), weights.parent)
            if had is None:
                record_checksum(weights)
                row["status"] = f"ok (no {CHECKSUM_NAME} from an older version; recorded now)"
        except (CheckpointError, OSError) as e:
            row.update(ok=False, status=str(e))
        except SafetensorError as e:
            row.update(
                ok=False, status=f"{weights} is unreadable ({e}); remove it with `m2d2-embed cache --clear {p.name}`"
            )
        rows.append(row)
    return rows
