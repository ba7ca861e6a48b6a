"""CPU backends: the audio encoder run by ONNX Runtime or OpenVINO instead of PyTorch.

``load(..., backend="onnxruntime")`` (or ``"openvino"``) exports the encoder to ONNX once per weights
(:func:`m2d2_embed.export.export_onnx`), caches the export and runs every encoder call through the other runtime.
The front end, the chunking, the pooling, the CLAP head, the text encoder and the classifier stay in PyTorch, so
every output keeps its shape and meaning; only the encoder's arithmetic differs (tokens within about 1e-5 of
PyTorch float32).

When to use which (benchmarks/README.md, "CPU backends"): on an idle CPU the default PyTorch path is level with
both at one clip and ahead at four; on a CPU that other jobs keep busy, the other runtimes' thread pools lose
less time than PyTorch's OpenMP threads, most at one clip per call. Float32 on the CPU only.

Cache layout (``<cache>`` from :func:`m2d2_embed.download.cache_dir`)::

    <cache>/onnx/<digest>/encoder.onnx, encoder.onnx.data,   the export, keyed by the SHA-256 of the encoder's
                          m2d2_export.json, files.json       tensors; files.json: size, mtime, SHA-256 of each
    <cache>/onnx/<digest>-int8-s8/ (or -u8)                  ONNX Runtime's dynamic int8 quantization of it

An export is written to a temporary folder and renamed into place whole, so a crash or a second process never
leaves half of one; an export whose files changed since they were written is deleted and made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import download as dl

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino")
_EXTRA = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino", "openvino")}  # extra, module
FILES_RECORD = "files.json"


def check_backend(backend: str | None, device: torch.device, dtype: Any, compile: bool) -> str:
    """Validate ``load(backend=...)`` against the other options; returns the backend's name.

    Raises:
        ValueError: unknown backend, or a device/dtype/compile setting the backend cannot run.
        ImportError: the runtime is not installed (the message names the extra to install).
    """
    name = "torch" if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)} (default torch)")
    if name == "torch":
        return name
    if device.type != "cpu":
        raise ValueError(
            f"backend={name!r} runs the encoder on the CPU; it cannot run on {device}. Use device='cpu', or "
            f"the default backend='torch' on a GPU"
        )
    if dtype == "int8" and name == "openvino":
        raise ValueError(
            "backend='openvino' runs float32 only (its int8 needs a calibration set); for int8 use "
            "backend='onnxruntime' or the default backend='torch'"
        )
    if dtype not in (torch.float32, "int8"):
        raise ValueError(
            f"backend={name!r} runs float32 (and onnxruntime int8), got dtype={dtype}; use dtype='fp32' (or "
            f"backend='torch' for bf16)"
        )
    if compile:
        raise ValueError(f"compile=True compiles the PyTorch encoder; it does not apply to backend={name!r}")
    extra, module = _EXTRA[name]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"backend={name!r} needs {module}: pip install 'm2d2-embed[{extra}]' (not installed: {e.name})"
        ) from e
    return name


def runtime_installed(backend: str) -> bool:
    """Whether the runtime of ``backend`` can be imported (``"torch"``: always)."""
    return backend == "torch" or importlib.util.find_spec(_EXTRA[backend][1]) is not None


def encoder_digest(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the audio encoder's tensors: names, shapes and float32 values.

    Keys the export cache, so two checkpoints share an export only when their encoders are identical. About
    0.2 s for ViT-B (344 MB).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.encoder.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def attach_backend(
    model: torch.nn.Module, backend: str, cache_dir: str | os.PathLike | None = None, int8: bool = False
) -> None:
    """Run ``model``'s encoder in ``backend`` from now on (in place): find or make the cached ONNX export,
    open it in the runtime and hand the model a runner (:meth:`m2d2_embed.M2D2.set_encoder_runner`).

    ``int8`` (onnxruntime): ONNX Runtime's dynamic int8 quantization of the export (per-channel weights, uint8
    activations quantized per call), cached beside it: signed int8 weights on CPUs with VNNI (their products sum
    in int32), unsigned elsewhere, where signed weights lose accuracy to int16 saturation."""
    make = cached_int8 if int8 else cached_export
    path = make(model, cache_dir)
    try:
        runner = open_runner(backend, path)
    except Exception as e:  # a damaged file that kept its size and mtime: make it once more
        log.warning("the cached export %s did not open in %s (%s); exporting again", path.parent, backend, e)
        shutil.rmtree(path.parent, ignore_errors=True)
        runner = open_runner(backend, make(model, cache_dir))
    model.set_encoder_runner(runner, backend)
    if int8:
        model.quantization = "int8"


def cached_export(model: torch.nn.Module, cache_dir: str | os.PathLike | None = None) -> Path:
    """``encoder.onnx`` of ``model``'s cached float32 ONNX export, made now if missing or changed since written."""
    from .export import ENCODER_FILE, export_onnx

    folder = dl.cache_dir(cache_dir) / "onnx" / encoder_digest(model)

    def make(tmp: Path) -> None:
        log.info("exporting the audio encoder to ONNX once for these weights (about 20 s for ViT-B) into %s", folder)
        export_onnx(model, tmp, heads=False, overwrite=True)

    return _cached(folder, make) / ENCODER_FILE


def cached_int8(model: torch.nn.Module, cache_dir: str | os.PathLike | None = None, signed: bool | None = None) -> Path:
    """``encoder.onnx`` of ONNX Runtime's dynamic int8 quantization of ``model``'s export (per-channel weights),
    cached beside it: ``<digest>-int8-s8`` with signed weights, ``-u8`` with unsigned; made now if missing or
    changed. ``signed`` defaults to :func:`int8_signed_weights`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .export import ENCODER_FILE

    signed = int8_signed_weights() if signed is None else signed
    source = cached_export(model, cache_dir)
    folder = source.parent.with_name(f"{source.parent.name}-int8-{'s8' if signed else 'u8'}")

    def make(tmp: Path) -> None:
        log.info("quantizing the ONNX encoder to int8 once (about 10 s for ViT-B) into %s", folder)
        quantize_dynamic(
            str(source),
            str(tmp / ENCODER_FILE),
            weight_type=QuantType.QInt8 if signed else QuantType.QUInt8,
            per_channel=True,
            use_external_data_format=True,
        )

    return _cached(folder, make) / ENCODER_FILE


def int8_signed_weights() -> bool:
    """Whether ONNX Runtime's int8 should use signed weights here: on CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX)
    u8 x s8 products sum in int32; without, they sum pairs in int16 and can saturate (unsigned weights then)."""
    from .encoder import cpu_flags

    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _cached(folder: Path, make: Callable[[Path], None]) -> Path:
    """``folder`` if intact, else made by ``make(tmp)`` in a temporary folder beside it and renamed into place,
    so it is there whole or not at all (a second process making it meanwhile is fine: either copy is good)."""
    if _intact(folder):
        log.debug("using the cached export %s", folder)
        return folder
    if folder.exists():
        log.warning("the cached export %s is incomplete or changed since it was written; exporting again", folder)
        shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise OSError(
            f"cannot write the ONNX export of the encoder into {folder.parent} ({e}); pass cache_dir= (CLI: "
            f"--cache-dir) a writable folder, set {dl.ENV_CACHE}, or use backend='torch'"
        ) from e
    try:
        with _quiet_exporter():
            make(tmp)
        _record_files(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _intact(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _record_files(folder: Path) -> None:
    rec = {}
    for p in sorted(folder.iterdir()):
        st = p.stat()
        rec[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": dl.sha256_file(p)}
    (folder / FILES_RECORD).write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")


def _intact(folder: Path) -> bool:
    """True when every file of the export is there with the size and mtime recorded when it was written (a file
    whose mtime changed is hashed instead)."""
    try:
        rec = json.loads((folder / FILES_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    from .export import ENCODER_FILE

    if ENCODER_FILE not in rec:
        return False
    for name, want in rec.items():
        p = folder / name
        try:
            st = p.stat()
        except OSError:
            return False
        if st.st_size != want["size"]:
            return False
        if st.st_mtime_ns != want["mtime_ns"] and dl.sha256_file(p) != want["sha256"]:
            return False
    return True


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence PyTorch's ONNX exporter while it runs: its notes (torchvision not installed, deprecations) are not
    for our users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    root = logging.getLogger()  # onnxruntime.quantization advises pre-processing through the root logger
    quiet = logging.Filter("m2d2_embed")  # passes only our own records
    root.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(quiet)
        logger.setLevel(level)


def open_runner(backend: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder call in ``backend``: normalised log-mel chunks [n, 1, n_mels, w] float32 (CPU) -> tokens
    [n, f*t, D] float32, as :class:`m2d2_embed.encoder.AudioEncoder` returns them. Uses torch's thread count."""
    threads = torch.get_num_threads()
    if backend == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {"lms": x})[0]

    elif backend == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(
            str(path),
            "CPU",
            {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads},
        )
        request = compiled.create_infer_request()
        out = compiled.output(0)

        def run(x: np.ndarray) -> np.ndarray:
            return np.array(request.infer({0: x})[out])  # a copy: the request reuses its output buffer

    else:
        raise ValueError(f"no runner for backend {backend!r}")

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run(x.detach().to("cpu", torch.float32).contiguous().numpy())))

    return encode
