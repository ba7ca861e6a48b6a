"""Pre-training stages as modules the training loop runs, and the functions that set each one up.

Stage 1 (M2D + CLAP): the M2D objective plus ``weight`` x InfoNCE between the audio head on the online
encoder's (visible-patch) output and precomputed caption embeddings through a trainable ``text_proj``.
Stage 2 (CLAP text side): the stage 1 encoder frozen; a fresh audio head and a BERT text encoder trained
with InfoNCE on raw captions, the encoder input optionally masked.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..encoder import AudioEncoder
from ..heads import build_audio_head
from ..text import BertSelfAttention, BertTextEncoder, Tokenizer
from . import dist
from .config import DataConfig, Stage1Config, Stage2Config, to_dict
from .data import ClipDataset, Row, estimate_norm_stats, load_caption_embeddings, read_csv
from .loop import Trainer
from .losses import LogitScale, info_nce, normalise_gather
from .m2d import (
    M2D,
    ema_decay,
    gather_tokens,
    init_encoder,
    init_weights,
    patch_tokens,
    random_mask,
    run_blocks,
    time_mask,
)
from .upstream import TrainingState, load_training_state, read_training_state, stage1_key_group

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Weights in and out
# ---------------------------------------------------------------------------------------------------


def sub_state(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def read_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our safetensors format or an upstream ``.pth`` -> (state dict with ``encoder.*`` ..., config)."""
    from ..convert import read_any

    return read_any(path)


def _bert_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BERT checkpoint keys (``bert.`` prefix, legacy gamma/beta) -> ``BertTextEncoder`` keys."""
    out = {}
    for k, v in sd.items():
        k = k[len("bert.") :] if k.startswith("bert.") else k
        out[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = v
    return out


def load_text_weights(encoder: BertTextEncoder, spec: str | None) -> None:
    """Initialise ``encoder`` from ``spec``: ``hf://<repo>`` (the repo's ``model.safetensors`` through
    huggingface_hub), one of our models or an upstream M2D2 ``.pth`` (its ``text_encoder.*``), or a Hugging
    Face BERT ``.safetensors`` file or folder. None leaves the random initialisation. A fresh ``text_proj``
    may be missing from the weights; anything else missing is an error."""
    from safetensors.torch import load_file

    from ..convert import CheckpointError

    if spec is None:
        log.warning("text_init is None: the BERT text encoder starts from random weights")
        return
    if spec.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        sd = _bert_keys(load_file(hf_hub_download(spec[len("hf://") :], "model.safetensors")))
    else:
        p = Path(spec)
        try:
            sd = sub_state(read_pretrained(p)[0], "text_encoder.")
        except CheckpointError:  # a safetensors file without our config: a Hugging Face BERT checkpoint
            sd = _bert_keys(load_file(p / "model.safetensors" if p.is_dir() else p))
    own = encoder.state_dict()
    ignored = sorted(set(sd) - set(own))
    sd = {k: v for k, v in sd.items() if k in own}
    missing = sorted(k for k in set(own) - set(sd) if not k.startswith("text_proj."))
    if missing:
        raise ValueError(
            f"{spec} lacks text encoder tensors {missing[:6]}{'...' if len(missing) > 6 else ''}; "
            "is it a BERT checkpoint with the configured model.text sizes?"
        )
    encoder.load_state_dict(sd, strict=False)
    if ignored:
        log.info("text_init %s: ignored %d tensors (%s...)", spec, len(ignored), ", ".join(ignored[:4]))


class _DropoutSelfAttention(BertSelfAttention):
    """``BertSelfAttention`` with dropout on the attention probabilities while training (as Hugging Face's)."""

    attn_dropout: float = 0.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        q, k, v = (
            m(x).view(N, L, self.n_head, D // self.n_head).transpose(1, 2) for m in (self.query, self.key, self.value)
        )
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return y.transpose(1, 2).reshape(N, L, D)


def enable_text_dropout(encoder: BertTextEncoder, hidden: float = 0.1, attention: float = 0.1) -> None:
    """Give the (inference-only, dropout-free) BERT text encoder Hugging Face ``BertModel``'s training-time
    dropout: ``hidden`` after the embedding LayerNorm and on both sub-layer outputs before their residual
    (``hidden_dropout_prob``), ``attention`` on the attention probabilities (``attention_probs_dropout_prob``).
    Active only in training mode; parameters and state-dict keys are unchanged."""

    def drop(module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return F.dropout(out, hidden, module.training)

    if hidden > 0:
        encoder.embeddings.register_forward_hook(drop)
        for layer in encoder.encoder.layer:
            layer.attention.output.dense.register_forward_hook(drop)
            layer.output.dense.register_forward_hook(drop)
    if attention > 0:
        for layer in encoder.encoder.layer:
            att = layer.attention.self
            att.__class__ = _DropoutSelfAttention
            att.attn_dropout = attention


def resolve_norm_stats(
    data: DataConfig, rows: list[Row], model: ModelConfig, seed: int, continuing: bool = True
) -> ModelConfig:
    """The model config with the front end's normalisation set as ``data.norm_stats`` says; None (the
    default) means "auto" for a model trained from scratch (``continuing=False``, as upstream, which computes
    them from the training data) and "model" when continuing from pre-trained weights."""
    ns = data.norm_stats
    if ns is None:
        ns = "model" if continuing else "auto"
        if ns == "auto":
            log.info("training from scratch: estimating the log-mel statistics from the training data")
    if ns == "model":
        if continuing:
            log.info(
                "keeping the pre-trained model's log-mel statistics: mean %.4f, std %.4f",
                model.frontend.norm_mean,
                model.frontend.norm_std,
            )
        return model
    if ns == "auto":
        mean, std = estimate_norm_stats(rows, model.frontend, seed=seed)
        log.info("log-mel statistics of the training data: mean %.4f, std %.4f", mean, std)
    elif isinstance(ns, (tuple, list)) and len(ns) == 2:
        mean, std = float(ns[0]), float(ns[1])
    else:
        raise ValueError(f"data.norm_stats must be null, 'model', 'auto' or [mean, std], got {ns!r}")
    return dataclasses.replace(model, frontend=dataclasses.replace(model.frontend, norm_mean=mean, norm_std=std))


def _with_pretrained_audio(cfg_model: ModelConfig, pretrained: ModelConfig) -> ModelConfig:
    """Encoder and front end from the pre-trained weights (their shapes decide), the rest from the config."""
    if cfg_model.encoder != pretrained.encoder:
        log.info("using the encoder configuration of the pre-trained weights: %s", pretrained.encoder)
    return dataclasses.replace(cfg_model, encoder=pretrained.encoder, frontend=pretrained.frontend)


# ---------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------


class Stage1Model(nn.Module):
    """M2D + CLAP. Batch: ``x`` [B, 1, n_mels, frames], ``caption_emb`` [B, E].

    Without an audio head (``model.audio_head`` None, ``caption_dim`` None): M2D alone, as upstream's M2D
    pre-training (``train_audio.py``); batches then need only ``x``."""

    def __init__(
        self,
        cfg: Stage1Config,
        model: ModelConfig,
        caption_dim: int | None,
        pretrained: dict[str, torch.Tensor] | None = None,
        training_state: TrainingState | None = None,
    ) -> None:
        super().__init__()
        if (model.audio_head is None) != (caption_dim is None):
            raise ValueError(
                "stage 1 with CLAP needs both model.audio_head and caption embeddings; M2D alone needs neither"
            )
        normalise_gather(cfg.clap.gather)
        self.model_config = model
        self.cfg = cfg
        self.encoder = AudioEncoder(model.encoder)
        init_encoder(self.encoder)
        self.audio_proj: nn.Module | None = None
        if model.audio_head is not None:
            self.audio_proj = build_audio_head(model.audio_head)
            self.audio_proj.apply(init_weights)
        if pretrained:
            self.encoder.load_state_dict(sub_state(pretrained, "encoder."))
            head = sub_state(pretrained, "audio_proj.")
            if head and self.audio_proj is not None:
                self.audio_proj.load_state_dict(head)
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, as upstream
        m = cfg.m2d
        self.m2d = M2D(self.encoder, m.mask_ratio, m.predictor_dim, m.predictor_depth, m.predictor_heads, m.target_eps)
        self.text_proj: nn.Module | None = None
        self.logit_scale: LogitScale | None = None
        if model.audio_head is not None:
            # as upstream: Identity when the caption embeddings are as wide as the audio embeddings
            out_dim = model.audio_head.out_dim
            self.text_proj = nn.Identity() if caption_dim == out_dim else nn.Linear(caption_dim, out_dim)
            self.text_proj.apply(init_weights)
            self.logit_scale = LogitScale(cfg.clap.logit_scale_init, cfg.clap.logit_scale_max)
        wanted = ["predictor", "target"] + (["logit_scale"] if self.logit_scale is not None else [])
        loaded = {"loaded": [], "fresh": wanted}
        if training_state is not None and self.logit_scale is None:  # M2D alone: the CLAP parts are not used
            unused = {k for k in training_state.tensors if stage1_key_group(k) in ("text_proj", "logit_scale")}
            if unused:
                log.info("M2D alone: not using the checkpoint's %s", ", ".join(sorted(unused)))
            training_state = dataclasses.replace(
                training_state, tensors={k: v for k, v in training_state.tensors.items() if k not in unused}
            )
        if training_state is not None and training_state.tensors:
            loaded = load_training_state(self, training_state)
        elif pretrained:
            loaded["fresh"] = ["target (a copy of the loaded encoder)" if g == "target" else g for g in wanted]
        if isinstance(self.text_proj, nn.Linear) and "text_proj" not in loaded["loaded"]:
            loaded["fresh"].append("text_proj")
        self.init_report: dict[str, list[str]] = loaded

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_m2d, z = self.m2d(self.encoder, batch["x"], generator)  # z (B, 1 + n_visible, D)
        if self.audio_proj is None or self.text_proj is None or self.logit_scale is None:
            return loss_m2d, {"m2d": loss_m2d.detach()}
        audio = self.audio_proj(z[:, 1:])  # (B, out_dim)
        text = self.text_proj(batch["caption_emb"].to(audio.dtype))  # (B, out_dim)
        loss_clap = info_nce(audio, text, self.logit_scale(), self.cfg.clap.gather)
        loss = loss_m2d + self.cfg.clap.weight * loss_clap
        return loss, {
            "m2d": loss_m2d.detach(),
            "clap": loss_clap.detach(),
            "scale": self.logit_scale().detach(),
        }

    def after_step(self, step: int, total_steps: int) -> None:
        m = self.cfg.m2d
        self.m2d.target.update(self.encoder, ema_decay(step, total_steps, m.ema_decay_init, m.ema_decay_final))
        if self.logit_scale is not None:
            self.logit_scale.clamp_()

    def export(self) -> tuple[dict[str, torch.Tensor], ModelConfig]:
        sd = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        if self.audio_proj is not None:
            sd.update({f"audio_proj.{k}": v for k, v in self.audio_proj.state_dict().items()})
        return sd, dataclasses.replace(self.model_config, text=None, text_weights=None)


def setup_stage1(cfg: Stage1Config, info: dist.DistInfo) -> Trainer:
    """Data, model and trainer for stage 1 (nothing is trained yet).

    With ``init_from`` an upstream pre-training checkpoint ("Fur-PT Ready" releases), the predictor, the EMA
    target, ``text_proj`` and the logit scale are loaded too when present (predictor size from the file);
    a log line says what was loaded and what starts fresh."""
    if not cfg.data.csv:
        raise ValueError("stage 1 needs data.csv (the clips)")
    if not cfg.data.captions and cfg.clap.weight != 0:
        raise ValueError(
            "stage 1 needs data.captions (caption embeddings .npy, see `python -m m2d2_embed.train captions`), "
            "or clap.weight=0 for M2D alone"
        )
    rows = read_csv(cfg.data.csv, cfg.data.root)
    embs = load_caption_embeddings(cfg.data.captions, rows) if cfg.data.captions else None
    # built from upstream {ytid: emb} files: drop the clips without a caption
    if embs is not None and not isinstance(embs, np.memmap):
        keep = ~np.isnan(embs.reshape(len(embs), -1, embs.shape[-1])).any(-1).all(-1)
        if not keep.all():
            log.warning("%d of %d clips have no caption embedding and are left out", int((~keep).sum()), len(rows))
            rows, embs = [r for r, k in zip(rows, keep, strict=True) if k], embs[keep]
    model_cfg, pretrained, state = cfg.model, None, None
    if embs is None:
        log.info("no caption embeddings and clap.weight 0: M2D alone (no audio head)")
        model_cfg = dataclasses.replace(model_cfg, audio_head=None)
    if cfg.init_from:
        pretrained, pcfg = read_pretrained(cfg.init_from)
        model_cfg = _with_pretrained_audio(model_cfg, pcfg)
        if pcfg.audio_head != model_cfg.audio_head and model_cfg.audio_head is not None:  # configured (fresh) head
            log.info(
                "init_from has audio head %s, the config asks for %s: the head starts fresh",
                pcfg.audio_head,
                model_cfg.audio_head,
            )
            pretrained = {k: v for k, v in pretrained.items() if not k.startswith("audio_proj.")}
        state = read_training_state(cfg.init_from)
        if state.predictor_dim is not None:
            m = cfg.m2d
            if (m.predictor_dim, m.predictor_depth) != (state.predictor_dim, state.predictor_depth):
                log.info(
                    "using the predictor size of %s: %d-d, %d blocks (the config said %d-d, %d blocks)",
                    cfg.init_from,
                    state.predictor_dim,
                    state.predictor_depth,
                    m.predictor_dim,
                    m.predictor_depth,
                )
            cfg = dataclasses.replace(
                cfg,
                m2d=dataclasses.replace(m, predictor_dim=state.predictor_dim, predictor_depth=state.predictor_depth),
            )
    model_cfg = resolve_norm_stats(cfg.data, rows, model_cfg, cfg.train.seed, continuing=bool(cfg.init_from))
    crop = cfg.data.crop_frames or model_cfg.encoder.chunk_frames
    ds = ClipDataset(rows, model_cfg.frontend, crop, seed=cfg.train.seed, caption_embs=embs)
    torch.manual_seed(cfg.train.seed)
    model = Stage1Model(cfg, model_cfg, int(embs.shape[-1]) if embs is not None else None, pretrained, state)
    if cfg.init_from:
        log.info(
            "init_from %s: loaded encoder%s, %s; fresh: %s",
            cfg.init_from,
            "" if "audio_proj" not in {k.split(".")[0] for k in pretrained or {}} else ", audio head",
            ", ".join(model.init_report["loaded"]) or "nothing else",
            ", ".join(model.init_report["fresh"]) or "nothing",
        )
    return Trainer(model, ds, cfg.train, cfg.optim, info, run_config={"stage": "stage1", **to_dict(cfg)})


# ---------------------------------------------------------------------------------------------------
# Stage 2
# ---------------------------------------------------------------------------------------------------


class Stage2Model(nn.Module):
    """CLAP text side. Batch: ``x`` [B, 1, n_mels, frames], ``input_ids`` and ``attention_mask`` [B, L]."""

    def __init__(self, cfg: Stage2Config, model: ModelConfig, pretrained: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if model.audio_head is None or model.text is None:
            raise ValueError("stage 2 needs model.audio_head and model.text")
        if cfg.max_text_tokens > model.text.max_position:
            raise ValueError(
                f"max_text_tokens {cfg.max_text_tokens} exceeds the text encoder's {model.text.max_position} positions"
            )
        self.model_config = model
        self.cfg = cfg
        self.encoder = AudioEncoder(model.encoder)
        self.encoder.load_state_dict(sub_state(pretrained, "encoder."))
        self.encoder.requires_grad_(False)
        self.audio_proj = build_audio_head(model.audio_head)
        self.text_encoder = BertTextEncoder(model.text)
        if cfg.init_clap:  # refinement: continue the CLAP side of a stage 2 model
            self.audio_proj.load_state_dict(sub_state(pretrained, "audio_proj."))
            self.text_encoder.load_state_dict(sub_state(pretrained, "text_encoder."))
        else:
            self.audio_proj.apply(init_weights)
            load_text_weights(self.text_encoder, cfg.text_init)
        self.text_encoder.pooler.requires_grad_(False)  # unused by CLAP; DDP needs every trainable tensor used
        enable_text_dropout(self.text_encoder, cfg.text_dropout, cfg.attention_dropout)
        if self.text_encoder.out_dim != model.audio_head.out_dim:
            raise ValueError(
                f"text embeddings have {self.text_encoder.out_dim} dims but the audio head outputs "
                f"{model.audio_head.out_dim}; set model.text.proj_dim or model.audio_head.out_dim"
            )
        self.logit_scale = LogitScale(cfg.clap.logit_scale_init, cfg.clap.logit_scale_max)

    def train(self, mode: bool = True) -> Stage2Model:
        super().train(mode)
        self.encoder.eval()  # frozen
        return self

    def audio_tokens(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Frozen encoder on the (masked) input: (B, 1, n_mels, frames) -> (B, n_visible, D), no gradient."""
        with torch.no_grad():
            tokens, t = patch_tokens(self.encoder, x)
            r, f = self.cfg.mask_ratio, self.encoder.config.grid[0]
            if r > 0 and self.training:
                if self.cfg.mask_kind == "time":
                    mask = time_mask(x.shape[0], f, t, r, generator)
                elif self.cfg.mask_kind == "random":
                    mask = random_mask(x.shape[0], tokens.shape[1], r, generator)
                else:
                    raise ValueError(f"mask_kind must be 'time' or 'random', got {self.cfg.mask_kind!r}")
                tokens = gather_tokens(tokens, mask.visible.to(x.device))
            return run_blocks(self.encoder, tokens)[:, 1:]

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        audio = self.audio_proj(self.audio_tokens(batch["x"], generator))  # (B, out_dim)
        text = self.text_encoder(batch["input_ids"], batch["attention_mask"])  # (B, out_dim)
        loss = info_nce(audio, text, self.logit_scale(), self.cfg.clap.gather)
        return loss, {"scale": self.logit_scale().detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.logit_scale.clamp_()

    def export(self) -> tuple[dict[str, torch.Tensor], ModelConfig]:
        sd = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        sd.update({f"audio_proj.{k}": v for k, v in self.audio_proj.state_dict().items()})
        sd.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        return sd, dataclasses.replace(self.model_config, text_weights=None)


class TokenizingCollate:
    """Stacks tensors and turns the ``caption`` strings into ``input_ids`` / ``attention_mask``."""

    def __init__(self, max_tokens: int = 128) -> None:
        self.max_tokens = max_tokens
        self._tok: Tokenizer | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if self._tok is None:
            self._tok = Tokenizer()
        out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "caption"}
        out["input_ids"], out["attention_mask"] = self._tok.encode([it["caption"] for it in items], self.max_tokens)
        return out

    def __getstate__(self) -> dict[str, Any]:  # workers build their own tokenizer
        return {"max_tokens": self.max_tokens, "_tok": None}


def setup_stage2(cfg: Stage2Config, info: dist.DistInfo) -> Trainer:
    """Data, model and trainer for stage 2 (nothing is trained yet)."""
    if not cfg.init_from:
        raise ValueError("stage 2 needs init_from: the stage 1 model (a directory or .safetensors from stage 1)")
    if not cfg.data.csv:
        raise ValueError("stage 2 needs data.csv with a 'caption' column")
    rows = read_csv(cfg.data.csv, cfg.data.root)
    pretrained, pcfg = read_pretrained(cfg.init_from)
    model_cfg = _with_pretrained_audio(cfg.model, pcfg)
    if cfg.init_clap:
        if pcfg.audio_head is None or pcfg.text is None:
            raise ValueError(
                f"init_clap needs a stage 2 model with an audio head and a text encoder; "
                f"{cfg.init_from} has {'no audio head' if pcfg.audio_head is None else 'no text encoder'}"
            )
        model_cfg = dataclasses.replace(model_cfg, audio_head=pcfg.audio_head, text=pcfg.text)
    model_cfg = resolve_norm_stats(cfg.data, rows, model_cfg, cfg.train.seed)
    crop = cfg.data.crop_frames or model_cfg.encoder.chunk_frames
    ds = ClipDataset(rows, model_cfg.frontend, crop, seed=cfg.train.seed, captions=True)
    torch.manual_seed(cfg.train.seed)
    model = Stage2Model(cfg, model_cfg, pretrained)
    return Trainer(
        model,
        ds,
        cfg.train,
        cfg.optim,
        info,
        collate_fn=TokenizingCollate(cfg.max_text_tokens),
        run_config={"stage": "stage2", **to_dict(cfg)},
    )


def run(stage: str, cfg: Any) -> Trainer:
    """Set up ``stage`` ('stage1', 'stage2' or 'finetune'), train it to the end, and return the trainer.
    Joins the process group first when launched by torchrun."""
    info = dist.setup(cfg.train.device)
    if stage == "stage1":
        trainer = setup_stage1(cfg, info)
    elif stage == "stage2":
        trainer = setup_stage2(cfg, info)
    elif stage == "finetune":
        from .downstream import setup_finetune

        trainer = setup_finetune(cfg, info)
    else:
        raise ValueError(f"unknown stage {stage!r}; expected stage1, stage2 or finetune")
    trainer.fit()
    return trainer
