"""Masked Modeling Duo: masking, the online encoder on visible patches, the EMA target encoder on masked
patches, the predictor, and the loss.

Shapes: B clips, N = f * t patches of a [1, n_mels, frames] log-mel chunk in (frequency, time) order,
D encoder width, P predictor width. Index tensors hold patch positions in 0..N-1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..encoder import AudioEncoder, Block

# ---------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------


@dataclass
class Mask:
    """Which patches each clip shows the online encoder. Both sorted, disjoint, together covering 0..N-1."""

    visible: torch.Tensor  # (B, n_visible) long
    masked: torch.Tensor  # (B, n_masked) long

    def to(self, device: torch.device) -> Mask:
        return Mask(self.visible.to(device), self.masked.to(device))


def _split(order: torch.Tensor, n_visible: int) -> Mask:
    return Mask(order[:, :n_visible].sort(1).values, order[:, n_visible:].sort(1).values)


def random_mask(batch: int, n: int, ratio: float, generator: torch.Generator | None = None) -> Mask:
    """Unstructured masking: per clip, a uniformly random ``int(n * (1 - ratio))`` patches stay visible
    (upstream's ``len_keep``); the rest are masked. Returns CPU tensors."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_visible = int(n * (1 - ratio))
    order = torch.rand(batch, n, generator=generator).argsort(1)  # a random permutation per clip
    return _split(order, n_visible)


def time_mask(batch: int, f: int, t: int, ratio: float, generator: torch.Generator | None = None) -> Mask:
    """Structured masking: per clip, ``int(t * ratio)`` whole time columns (all f patches of a time step)
    are masked. Returns CPU tensors."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    t_visible = t - int(t * ratio)
    cols = torch.rand(batch, t, generator=generator).argsort(1)  # (B, t) random column order
    rows = torch.arange(f) * t  # first patch index of each frequency row
    order = (rows[None, None, :] + cols[:, :, None]).reshape(batch, t * f)  # column-major patch order
    return _split(order, t_visible * f)


def structured_mask(batch: int, f: int, t: int, ratio: float, generator: torch.Generator | None = None) -> Mask:
    """Random structured masking for fine-tuning (upstream M2D's ``random_structured_mask``): ``NF`` whole
    frequency rows and ``NT`` whole time columns are masked in each clip, with ``NF = int(f * (ratio + 1/f) * u)``,
    u ~ U(0, 1), at most f - 1, and ``NT = int(t * max(ratio + 0.5/t - NF/f, 0))``; NF and NT are shared by the
    batch so every clip keeps ``(f - NF) * (t - NT)`` patches (the rows and columns differ per clip). Returns
    CPU tensors; visible = the patches outside the masked rows and columns."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    u = float(torch.rand(1, generator=generator))
    nf = min(f - 1, int(f * (ratio + 1.0 / f) * u))
    nt = min(t - 1, int(t * max(ratio + 0.5 / t - nf / f, 0.0)))
    rows = torch.rand(batch, f, generator=generator).argsort(1)[:, :nf]  # (B, NF) masked rows
    cols = torch.rand(batch, t, generator=generator).argsort(1)[:, :nt]  # (B, NT) masked columns
    masked = torch.zeros(batch, f, t, dtype=torch.bool)
    masked.scatter_(1, rows[:, :, None].expand(-1, -1, t), True)
    masked.scatter_(2, cols[:, None, :].expand(-1, f, -1), True)
    order = masked.reshape(batch, f * t).int().argsort(dim=1, stable=True)  # visible first, each group in order
    return _split(order, (f - nf) * (t - nt))


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, n) -> (B, n, C)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------


def patch_tokens(encoder: AudioEncoder, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Log-mel chunk (B, 1, n_mels, frames) -> position-embedded patch tokens (B, N, D) and t."""
    tokens = encoder.patch_embed(x)  # (B, f*t, D)
    t = tokens.shape[1] // encoder.config.grid[0]
    return tokens + encoder.patch_pos_embed(t), t


def run_blocks(
    encoder: AudioEncoder,
    tokens: torch.Tensor,
    blocks: nn.ModuleList | None = None,
    norm: nn.Module | None = None,
) -> torch.Tensor:
    """Prepend CLS, run ``blocks`` and ``norm`` (default: the encoder's): (B, n, D) -> (B, 1 + n, D)."""
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
    for blk in blocks if blocks is not None else encoder.blocks:
        x = blk(x)
    return (norm if norm is not None else encoder.norm)(x)


def encode_visible(encoder: AudioEncoder, x: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """The encoder on the visible patches only: (B, 1, n_mels, frames) -> (B, 1 + n_visible, D), CLS first."""
    tokens, _ = patch_tokens(encoder, x)
    return run_blocks(encoder, gather_tokens(tokens, mask.visible) if mask is not None else tokens)


class TargetEncoder(nn.Module):
    """EMA copies of the online encoder's ``blocks`` and ``norm``. As upstream, the patch embedding, position
    embedding and CLS token are the online encoder's own (applied without gradient)."""

    def __init__(self, online: AudioEncoder) -> None:
        super().__init__()
        self.blocks = copy.deepcopy(online.blocks)
        self.norm = copy.deepcopy(online.norm)
        self.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: AudioEncoder, decay: float) -> None:
        """target <- decay * target + (1 - decay) * online, for every parameter."""
        ema_update(self, nn.ModuleList([online.blocks, online.norm]), decay)

    @torch.no_grad()
    def forward(self, online: AudioEncoder, tokens: torch.Tensor) -> torch.Tensor:
        """Position-embedded patch tokens (B, n, D) -> target features (B, n, D), CLS dropped."""
        return run_blocks(online, tokens, self.blocks, self.norm)[:, 1:]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float) -> None:
    """``t = decay * t + (1 - decay) * o`` for each pair of parameters, in registration order."""
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op):
        raise ValueError(f"EMA target has {len(tp)} parameters but the online module has {len(op)}")
    for t, o in zip(tp, op, strict=True):
        t.mul_(decay).add_(o.detach(), alpha=1.0 - decay)


def init_weights(module: nn.Module) -> None:
    """Upstream (MAE) initialisation for new modules: xavier-uniform Linear weights, zero biases,
    LayerNorm at identity. Use with ``module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_encoder(encoder: AudioEncoder) -> None:
    """A fresh encoder as upstream M2D: fixed (non-trainable) sin-cos position embedding, xavier patch
    projection, CLS token ~ N(0, 0.02), ``init_weights`` elsewhere."""
    encoder.apply(init_weights)
    w = encoder.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
    nn.init.zeros_(encoder.patch_embed.proj.bias)
    nn.init.normal_(encoder.cls_token, std=0.02)
    c = encoder.config
    with torch.no_grad():
        encoder.pos_embed.copy_(sincos_pos_embed(c.embed_dim, *c.grid)[None])
    encoder.pos_embed.requires_grad_(False)


def ema_decay(step: int, total_steps: int, init: float, final: float) -> float:
    """Momentum rising linearly from ``init`` at step 0 to ``final`` at step ``total_steps - 1``."""
    return init + (final - init) * step / max(total_steps - 1, 1)


# ---------------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------------


def sincos_pos_embed(dim: int, f: int, t: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1 + f*t, dim); row 0 (CLS) is zero. The first half of the
    channels encodes the time index, the second half the frequency index."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def enc(pos: np.ndarray) -> np.ndarray:  # (M,) -> (M, dim / 2)
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    fi, ti = np.meshgrid(np.arange(f), np.arange(t), indexing="ij")  # (f, t) in token order
    pe = np.concatenate([enc(ti.ravel()), enc(fi.ravel())], axis=1)  # (f*t, dim)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), pe])).float()


class Predictor(nn.Module):
    """Predicts target features of the masked patches from the online encoder's output.

    Online output -> Linear to P -> mask tokens at the masked positions -> + sin-cos position embedding ->
    transformer blocks -> LayerNorm -> Linear back to D. (Upstream: decoder_embed, mask_token,
    decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred.)
    """

    def __init__(
        self,
        enc_dim: int,
        grid: tuple[int, int],
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, *grid)[None], persistent=False)  # (1, 1+N, P)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, enc_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def _pos(self, t: int) -> torch.Tensor:
        f, T = self.grid
        if t == T:
            return self.pos_embed
        pe = self.pos_embed[:, 1:].reshape(1, f, T, -1)[:, :, :t].reshape(1, f * t, -1)  # first t columns
        return torch.cat([self.pos_embed[:, :1], pe], dim=1)

    def forward(self, z: torch.Tensor, mask: Mask, t: int) -> torch.Tensor:
        """z (B, 1 + n_visible, D) with CLS first -> predictions (B, n_masked, D) in ``mask.masked`` order."""
        x = self.embed(z)  # (B, 1 + n_visible, P)
        B, _, P = x.shape
        n = mask.visible.shape[1] + mask.masked.shape[1]
        seq = self.mask_token.to(x.dtype).expand(B, n, P)  # (B, N, P) all mask tokens ...
        seq = seq.scatter(1, mask.visible.unsqueeze(-1).expand(-1, -1, P), x[:, 1:])  # ... visible ones placed
        x = torch.cat([x[:, :1], seq], dim=1) + self._pos(t).to(x.dtype)  # (B, 1 + N, P)
        for blk in self.blocks:
            x = blk(x)
        x = self.proj(self.norm(x))[:, 1:]  # (B, N, D)
        return gather_tokens(x, mask.masked)


# ---------------------------------------------------------------------------------------------------
# Loss and objective
# ---------------------------------------------------------------------------------------------------


def m2d_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over tokens of ``2 - 2 cos(pred, standardise(target))``; pred, target (B, n, D) -> scalar float32.

    The target is standardised per token over the feature dimension (unbiased variance, ``eps`` added),
    then both are L2-normalised, so the loss is the squared distance of unit vectors."""
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
    p, z = F.normalize(pred.float(), dim=-1), F.normalize(target, dim=-1)
    return (2 - 2 * (p * z).sum(-1)).mean()


class M2D(nn.Module):
    """The M2D objective around an online ``AudioEncoder`` (held by the caller, passed to ``forward``)."""

    def __init__(
        self,
        encoder: AudioEncoder,
        mask_ratio: float = 0.7,
        predictor_dim: int = 512,
        predictor_depth: int = 8,
        predictor_heads: int = 16,
        target_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        c = encoder.config
        self.mask_ratio = mask_ratio
        self.target_eps = target_eps
        self.predictor = Predictor(
            c.embed_dim, c.grid, predictor_dim, predictor_depth, predictor_heads, c.mlp_ratio, c.norm_eps
        )
        self.target = TargetEncoder(encoder)

    def forward(
        self, encoder: AudioEncoder, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, n_mels, frames) -> (loss, online output (B, 1 + n_visible, D) with CLS first)."""
        tokens, t = patch_tokens(encoder, x)  # (B, N, D)
        mask = random_mask(x.shape[0], tokens.shape[1], self.mask_ratio, generator).to(x.device)
        z = run_blocks(encoder, gather_tokens(tokens, mask.visible))  # online: visible patches
        pred = self.predictor(z, mask, t)  # (B, n_masked, D)
        target = self.target(encoder, gather_tokens(tokens.detach(), mask.masked))  # EMA: masked patches
        return m2d_loss(pred, target, self.target_eps), z
