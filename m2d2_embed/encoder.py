"""The M2D ViT audio encoder. Module names follow the checkpoint keys (timm style), so an upstream
state dict loads after only its prefix is stripped."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig


class Attention(nn.Module):
    """Multi-head self-attention on a fused qkv projection, through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        # key_mask (B, N) True where a token is real; broadcast over heads and queries
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


# bf16/fp16 on CUDA: fc1's bias and GELU run in the matmul's epilogue (cuBLASLt), so the [tokens, 3072] hidden
# layer is written once instead of written, read and written again: about 10% of the encoder's time on an H100.
# The epilogue's GELU is the tanh approximation (|error| < 5e-4, below bf16's resolution of 2^-8 relative);
# float32 and CPU keep the exact erf GELU, so reference-exact numbers are unchanged. False: erf everywhere.
FUSED_GELU = True
_HALF = (torch.bfloat16, torch.float16)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED_GELU and x.is_cuda and x.dtype in _HALF and type(self.fc1) is nn.Linear:
            fused = torch._addmm_activation  # noqa: SLF001 (tanh-approximate GELU fused into the matmul)
            h = fused(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.reshape(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


# CPU float32 inference: the block's four Linear layers run as oneDNN matmuls on weights reordered once into
# oneDNN's blocked layout (the reorder MKL's sgemm redoes on every call), with the exact (erf) GELU of fc1 and the
# residual adds after proj and fc2 fused into the matmuls' epilogues. On a 2-core Zen 4 this is 1.3x the plain
# ViT-B encoder at batch 1 and 4 (benchmarks/README.md); outputs differ from nn.Linear's by float32 rounding
# (max abs ~5e-6 on the encoder's tokens). The reordered copies cost a second copy of the Linear weights (about
# 340 MB for ViT-B). Used only without autograd, in eval mode, for float32 CPU inputs; ``pack_for_cpu`` sets it up.
_BLOCKED_ROWS = 311  # rows per matmul the blocked layout is tuned for: one 10-s chunk's tokens (5 x 62 + CLS)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags as ``lscpu``/``/proc/cpuinfo`` list them (``avx2``, ``avx512f``, ``avx512_vnni``,
    ``avx512_bf16``, ``amx_bf16``, ...); empty where /proc/cpuinfo is unavailable (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_native_bf16() -> bool | None:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm), and oneDNN is
    not capped below those kernels (``ONEDNN_MAX_CPU_ISA``); None when the flags are unknown."""
    flags = cpu_flags()
    if not flags:
        return None
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if not any(k in isa for k in ("ALL", "BF16", "AMX", "AVX10")):  # oneDNN capped below its bf16 kernels
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_int8_full_range() -> bool:
    """Whether dynamically quantized activations may use all 8 bits: on x86 CPUs with AVX512-VNNI or AMX-INT8,
    whose int8 dot products accumulate in int32. Without them fbgemm's AVX2 kernels sum pairs of u8 x s8 products
    in int16, which can saturate, so activations keep PyTorch's default 7-bit range (``reduce_range``)."""
    capped = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "AVX512").upper()  # fbgemm's own cap on its kernels
    return capped.startswith("AVX512") and bool(cpu_flags() & {"avx512_vnni", "amx_int8"})


@functools.cache
def _onednn_ops() -> tuple | None:
    """(reorder, linear) oneDNN ops of PyTorch's CPU build (those Inductor's CPU freezing pass uses), checked once
    on a small input; None where the build lacks them or they compute something else."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        reorder = torch.ops.mkldnn._reorder_linear_weight  # noqa: SLF001 (PyTorch op, no public name)
        linear = torch.ops.mkldnn._linear_pointwise  # noqa: SLF001 (PyTorch op, no public name)
        w = reorder(torch.ones(8, 8), 4)
        y = linear.binary(torch.ones(4, 8), torch.ones(4, 8), w, torch.zeros(8), "add")
        y = linear(y, w, torch.zeros(8), "gelu", [], "none")
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return (reorder, linear) if torch.allclose(y, torch.full((4, 8), 72.0)) else None


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear ops the packed CPU path uses (x86-64 builds do)."""
    return _onednn_ops() is not None


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._packed: tuple[torch.Tensor, ...] | None = None  # oneDNN-blocked qkv, proj, fc1, fc2 weights
        self.register_load_state_dict_post_hook(_repack_after_load)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if (
            self._packed is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")  # autocast casts inside the block; the packed ops cannot
        ):
            return self._forward_packed(x, key_mask)
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))

    def _forward_packed(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """The same block on the oneDNN-blocked weights, with GELU and both residual adds fused."""
        linear = _onednn_ops()[1]
        w_qkv, w_proj, w_fc1, w_fc2 = self._packed
        attn, mlp = self.attn, self.mlp
        B, N, C = x.shape
        h = self.norm1(x)
        qkv = linear(h, w_qkv, attn.qkv.bias, "none", [], "").reshape(B, N, 3, attn.num_heads, C // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, N, C)
        x = linear.binary(h, x, w_proj, attn.proj.bias, "add")  # x + proj(h)
        h = linear(self.norm2(x), w_fc1, mlp.fc1.bias, "gelu", [], "none")  # exact (erf) GELU
        return linear.binary(h, x, w_fc2, mlp.fc2.bias, "add")  # x + fc2(h)

    def pack_for_cpu(self) -> bool:
        """Reorder the Linear weights for the fused oneDNN CPU path (see the note above); True when in use.

        Only float32 ``nn.Linear`` weights on the CPU are packed (not int8-quantized layers, not CUDA). Moving the
        block (``.to``) or loading a state dict packs again or drops the packing; after changing weights in place
        any other way, call this again."""
        lins = (self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2)
        if (
            not all(
                type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 for m in lins
            )
            or not onednn_linear_available()
        ):
            self._packed = None
            return False
        with torch.no_grad():
            reorder = _onednn_ops()[0]
            self._packed = tuple(reorder(m.weight.detach(), _BLOCKED_ROWS) for m in lins)
        return True

    @property
    def packed(self) -> bool:
        """Whether the fused oneDNN CPU path is set up."""
        return self._packed is not None

    def unpack(self) -> None:
        """Back to the plain ``nn.Linear`` path (frees the reordered copies)."""
        self._packed = None

    def repack(self) -> None:
        """Pack again if packed (after the weights changed), else do nothing."""
        if self._packed is not None:
            self.pack_for_cpu()

    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), .cuda(), ...: the packed copies follow
        out = super()._apply(fn, recurse)
        self.repack()
        return out

    def __getstate__(self) -> dict:  # pickling, deepcopy: oneDNN tensors do not serialise; packed again on arrival
        state = super().__getstate__().copy()
        state["_packed"] = state["_packed"] is not None
        return state

    def __setstate__(self, state: dict) -> None:
        packed = state.get("_packed", False)
        super().__setstate__({**state, "_packed": None})
        if packed:
            self.pack_for_cpu()


def _repack_after_load(module: Block, _incompatible_keys) -> None:
    module.repack()


def pack_for_cpu(module: nn.Module) -> int:
    """Pack every transformer ``Block`` inside ``module`` for the fused oneDNN float32 CPU path; returns how many
    blocks use it (0 where the build lacks oneDNN, or the weights are not float32 on the CPU)."""
    return sum(b.pack_for_cpu() for b in module.modules() if isinstance(b, Block))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. The weights are those of the checkpoint's strided Conv2d, applied as
    one matmul over unfolded patches: the same numbers, and on CUDA it stays off cuDNN's TF32 convolutions, so
    float32 really is float32 (PyTorch enables TF32 for cuDNN convolutions by default)."""

    def __init__(self, patch_size: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        ph, pw = self.patch_size
        f, t = H // ph, W // pw
        x = x[:, 0, : f * ph, : t * pw]  # frames past the last whole patch are ignored, as by the strided conv
        x = x.reshape(B, f, ph, t, pw).permute(0, 1, 3, 2, 4).reshape(B, f * t, ph * pw)  # (B, f*t, ph*pw)
        w = self.proj.weight.reshape(self.proj.out_channels, ph * pw)
        return F.linear(x, w, self.proj.bias)  # (B, f*t, D), tokens in (frequency, time) order


class AudioEncoder(nn.Module):
    """ViT over a normalised log-mel chunk [B, 1, n_mels, frames] -> patch tokens [B, f*t, D] (CLS dropped).

    ``frames`` may be shorter than the training width; the position embedding is then cut to the first
    ``t`` time columns of each frequency row, as in the reference. Frames past the last whole patch are
    ignored by the strided patch projection.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        f, t = config.grid
        D = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + f * t, D))
        self.patch_embed = PatchEmbed(config.patch_size, D)
        self.blocks = nn.ModuleList(
            Block(D, config.num_heads, config.mlp_ratio, config.norm_eps) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)

    def patch_pos_embed(self, t: int) -> torch.Tensor:
        """Position embedding of the patch tokens of a chunk with ``t`` time patches: [1, f*t, D]."""
        f, T = self.config.grid
        if t > T:
            raise ValueError(f"chunk of {t} time patches exceeds the model's {T}")
        # one expression for every t (a view when t == T), so an exported graph keeps the chunk width dynamic
        return self.pos_embed[:, 1:].reshape(1, f, T, -1)[:, :, :t].reshape(1, f * t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, f*t, D)
        t = x.shape[1] // self.config.grid[0]
        x = x + self.patch_pos_embed(t)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]
