"""The M2D ViT audio encoder. Module names follow the checkpoint keys (timm style), so an upstream
state dict loads after only its prefix is stripped."""

from __future__ import annotations

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
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(),
                                        use_gelu=True)  # tanh-approximate GELU fused into the matmul
            return self.fc2(h.reshape(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


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
        x = x[:, 0, :f * ph, :t * pw]  # frames past the last whole patch are ignored, as by the strided conv
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
            Block(D, config.num_heads, config.mlp_ratio, config.norm_eps) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D, eps=config.norm_eps)

    def patch_pos_embed(self, t: int) -> torch.Tensor:
        """Position embedding of the patch tokens of a chunk with ``t`` time patches: [1, f*t, D]."""
        f, T = self.config.grid
        pe = self.pos_embed[:, 1:]
        if t == T:
            return pe
        if t > T:
            raise ValueError(f"chunk of {t} time patches exceeds the model's {T}")
        return pe.reshape(1, f, T, -1)[:, :, :t].reshape(1, f * t, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, f*t, D)
        t = x.shape[1] // self.config.grid[0]
        x = x + self.patch_pos_embed(t)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]
