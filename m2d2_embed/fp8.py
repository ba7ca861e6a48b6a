"""``dtype="fp8"``: the audio encoder's Linear layers in float8 (e4m3) on CUDA GPUs with FP8 tensor cores.

The four Linear layers of a transformer block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, about 93%
of the block's FLOPs) become :class:`FP8Linear`; ``dtype="fp8"`` does so in the later half of the blocks (6 of
ViT-B's 12) and keeps the earlier ones in bfloat16, ``dtype="fp8-all"`` in every block (see :data:`POLICIES`):

- weights quantized once at load, per output channel: ``w_scale[n] = max_k |W[n, k]| / 448`` (448 is the largest
  float8_e4m3fn value), ``W8 = W / w_scale`` rounded to float8_e4m3fn;
- activations quantized on every call, per token (row): ``x_scale[m] = max_k |x[m, k]| / 448``;
- one ``torch._scaled_mm`` per layer: float8 x float8 products accumulated in float32, both scales and the
  bfloat16 bias applied in the epilogue, bfloat16 out.

Everything else (patch embedding, LayerNorm, attention and softmax, GELU, the front end, the CLAP heads, the text
encoder) runs as the bfloat16 model does, so ``model.dtype`` is ``torch.bfloat16`` (the activations' dtype) and
``model.quantization`` is ``"fp8"`` or ``"fp8-all"``. Per-token scales keep every clip's numbers independent of the
batch it is in.

``torch._scaled_mm`` is PyTorch's own FP8 matmul (cuBLASLt / CUTLASS); it has no public name yet, so this module
is the one place that calls it. Its row-wise scaling needs, on CUDA: the first operand row-major and the second
column-major (``W8.t()`` of a row-major [N, K] weight), K and N multiples of 16, float32 scales shaped [M, 1] and
[1, N], a bfloat16 output and bias. ``load()`` runs one small probe call at load time, so a GPU or PyTorch build
that lacks this path fails there with a clear message instead of in the middle of a batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
OUT_DTYPE = torch.bfloat16  # row-wise scaled FP8 matmuls write bfloat16 (the only output all builds support)
_TINY = 1e-12  # floor of a scale's amax: an all-zero row or channel quantizes to zeros, not NaN

# dtype -> the first block quantized, from the encoder's depth. Rounding errors made in early blocks grow through
# the later ones: in the float32 emulation on the synthetic ViT-B weights (minimum cosine with float32 on the
# parity inputs), FP8 in blocks 0-5 only gave frames 0.99598, in blocks 6-11 only 0.99878. Over those inputs and
# 10-s synthetic speech, music and noise, "fp8" keeps every level within issue 16's targets (0.998 frames, 0.999
# clip and CLAP): frames 0.99879, clip 0.99903, CLAP 0.99919; "fp8-all" gives 0.99481, 0.99636, 0.99621 for twice
# the FP8 share of the matmuls (benchmarks/README.md, "FP8").
POLICIES = {"fp8": lambda depth: depth // 2, "fp8-all": lambda depth: 0}

# use_fast_accum of torch._scaled_mm: Hopper's faster FP8 accumulation (partial sums kept at lower precision between
# promotions to float32). Off: the accurate path; benchmarks/gpu_check.py measures both.
FAST_ACCUM = False

# Tests only: True makes every FP8Linear built by ``quantize_encoder`` (and so ``load(dtype="fp8")``, on any
# device, the CPU included) compute by emulation: the same float8 rounding of weights and activations, then a
# float32 matmul with the scales applied. No hardware checks, no speed-up: it checks the plumbing and the accuracy
# of the quantization without a GPU. Leave it False in real use.
EMULATE = False


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise float8 quantization: x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] float32), x ~= x8 * scale.

    ``scale = max(|row|) / 448``, so every row spans the full e4m3 range; computed in float32.

    Three passes over x (one reduction, one division, one cast), with the same bits as
    ``(x.float() / scale).clamp(-448, 448)``, which took six: ``x / scale`` is at most 448 times (1 + 2^-23) by
    the rounding of ``scale``, which every float8 conversion rounds to 448, so it needs no clamp. Eager FP8 layers
    on the GPU pay these passes in memory bandwidth on every call; ``compile=True`` fuses them."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = amax.clamp_min(_TINY) / E4M3_MAX
    return torch.div(x, scale).to(torch.float8_e4m3fn), scale  # x's dtype promoted to float32: exact


class FP8Linear(nn.Module):
    """A Linear layer with float8_e4m3fn weights (per-output-channel scales) and per-token activation scales.

    Input [..., K] (bfloat16, or any float dtype) -> output [..., N] in the input's dtype (computed in bfloat16).
    Build it with :meth:`from_linear`. Buffers: ``weight`` [N, K] float8_e4m3fn (row-major), ``weight_scale``
    [1, N] float32, ``bias`` [N] bfloat16 or None. ``.to(device)`` moves them; dtype casts (``.to(torch.float32)``,
    ``.half()``) leave them as they are, since recasting would destroy the quantized weights.

    ``emulate=True`` (tests): the same quantization, multiplied in float32 instead of ``torch._scaled_mm``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        emulate: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.emulate = emulate
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, emulate: bool = False) -> FP8Linear:
        """Quantize an ``nn.Linear`` (its weights in any float dtype, best float32) on its device.

        Raises:
            ValueError: ``in_features`` or ``out_features`` is not a multiple of 16 (FP8 tensor-core matmuls need it).
        """
        n, k = linear.weight.shape
        if not emulate and (n % 16 or k % 16):
            raise ValueError(f"FP8 matmuls need in/out features divisible by 16; this Linear is {k} -> {n}")
        w8, scale = quantize_rows(linear.weight)  # per output channel: rows of the [N, K] weight
        bias = None if linear.bias is None else linear.bias.detach().to(OUT_DTYPE)
        return cls(w8.contiguous(), scale.reshape(1, n).contiguous(), bias, emulate=emulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x8, x_scale = quantize_rows(x.reshape(-1, self.in_features))  # [M, K], [M, 1]
        if self.emulate:
            y = emulated_scaled_mm(x8, x_scale, self.weight, self.weight_scale, self.bias)
        else:
            y = torch._scaled_mm(  # noqa: SLF001 (PyTorch's FP8 matmul; no public name yet)
                x8,
                self.weight.t(),  # column-major [K, N] view of the row-major weight, as the kernel needs
                scale_a=x_scale,
                scale_b=self.weight_scale,
                bias=self.bias,
                out_dtype=OUT_DTYPE,
                use_fast_accum=FAST_ACCUM,
            )
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"float8_e4m3fn weights per channel, activations per token{', emulated' if self.emulate else ''}"
        )

    def _apply(self, fn, recurse: bool = True):
        # device moves only: a dtype cast (the model-wide .to(bfloat16) at load, .float(), .half()) would destroy
        # the float8 weights and their float32 scales, so each buffer follows fn's device (read off an empty
        # slice) and keeps its dtype
        for k, v in self._buffers.items():
            if v is not None:
                self._buffers[k] = v.to(fn(v[:0]).device)
        return self


def emulated_scaled_mm(
    x8: torch.Tensor,
    x_scale: torch.Tensor,
    w8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What the row-wise scaled FP8 matmul computes, in float32: x8 [M, K] float8, x_scale [M, 1], w8 [N, K]
    float8 (row-major weight), w_scale [1, N] -> (x8 @ w8.T) * x_scale * w_scale + bias, [M, N] bfloat16."""
    y = F.linear(x8.float(), w8.float()) * x_scale * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(OUT_DTYPE)


def quantize_encoder(encoder: nn.Module, emulate: bool | None = None, first_block: int = 0) -> int:
    """Replace the qkv, proj, fc1 and fc2 Linear layers of the transformer blocks of ``encoder`` from block
    ``first_block`` on (0-based, in order) by :class:`FP8Linear`, in place, quantized from their current weights on
    their current device. Returns how many layers were replaced. ``emulate`` defaults to the module switch
    :data:`EMULATE`.

    The other modules keep their dtype: cast them (``encoder.to(torch.bfloat16)``) before or after; the FP8
    layers keep theirs through such casts."""
    from .encoder import Block

    emulate = EMULATE if emulate is None else emulate
    n = 0
    for blk in [m for m in encoder.modules() if isinstance(m, Block)][first_block:]:
        blk.unpack()  # the fused float32 CPU path works on nn.Linear weights only
        for owner, name in ((blk.attn, "qkv"), (blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
            layer = getattr(owner, name)
            if isinstance(layer, nn.Linear):
                setattr(owner, name, FP8Linear.from_linear(layer, emulate=emulate))
                n += 1
    return n


def check_support(device: torch.device) -> None:
    """Raise unless ``device`` can run FP8 matmuls: an NVIDIA GPU of compute capability 8.9+ and a PyTorch with
    ``torch.float8_e4m3fn`` and ``torch._scaled_mm``. Does nothing when :data:`EMULATE` is on (tests).

    Raises:
        ValueError: the device is not a CUDA GPU, or its GPU is older than Ada / Hopper (named, with capability).
        RuntimeError: this PyTorch build lacks the float8 dtype or the FP8 matmul.
    """
    if EMULATE:
        return
    if device.type != "cuda":
        raise ValueError(
            f"dtype='fp8' needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
            f"Blackwell), not device {str(device)!r}; on the CPU use fp32 or int8"
        )
    if not (hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm")):
        raise RuntimeError(
            f"dtype='fp8' needs torch.float8_e4m3fn and torch._scaled_mm, which PyTorch {torch.__version__} lacks; "
            f"upgrade PyTorch (2.5 or later) or use dtype='bf16'"
        )
    if torch.version.hip is not None:
        raise ValueError("dtype='fp8' is implemented for NVIDIA GPUs only (this is a ROCm build); use dtype='bf16'")
    if tuple(torch.cuda.get_device_capability(device)) < MIN_CAPABILITY:
        raise ValueError(
            f"dtype='fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); {device} is "
            f"{gpu_name(device)}; use dtype='bf16'"
        )


def gpu_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3 (compute capability 9.0)"`` for a CUDA device; the device string otherwise."""
    if device.type != "cuda":
        return str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def probe(device: torch.device) -> None:
    """One small row-wise scaled FP8 matmul on ``device``, checked against its float32 emulation, so that a build
    or GPU without this path fails at load time with a clear message (not mid-batch).

    Raises:
        RuntimeError: the call failed or computed something else (the message names the GPU, its capability and
            the PyTorch version, and says to use bf16).
    """
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g))
        lin.bias.copy_(torch.randn(32, generator=g))
    x = torch.randn(16, 64, generator=g).to(device, OUT_DTYPE)
    real, emulated = FP8Linear.from_linear(lin), FP8Linear.from_linear(lin, emulate=True)
    where = gpu_name(device)
    try:
        got = real(x).float()
    except (RuntimeError, NotImplementedError) as e:
        raise RuntimeError(
            f"dtype='fp8': torch._scaled_mm with row-wise scales failed on {where} with PyTorch {torch.__version__} "
            f"({e}); use dtype='bf16'"
        ) from e
    want = emulated(x).float()
    err = float((got - want).abs().max() / want.abs().max())
    if not err < 0.02:  # both round to bfloat16 (2^-8 relative); only the accumulation order differs
        raise RuntimeError(
            f"dtype='fp8': torch._scaled_mm on {where} with PyTorch {torch.__version__} disagrees with its "
            f"emulation (max error {err:.3g} of the largest output); use dtype='bf16'"
        )
