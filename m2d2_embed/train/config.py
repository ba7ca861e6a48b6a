"""Training configuration: one dataclass per concern, one top-level config per stage, JSON in and out.

Defaults follow the published recipe where it states a value (see the README's Training section);
``from_dict`` rejects unknown keys so a typo in a config file fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..config import AudioHeadConfig, ModelConfig, TextConfig

T = TypeVar("T")


@dataclass
class OptimConfig:
    """The optimizer (AdamW by default); linear warm-up, then half-cycle cosine, updated every optimizer step."""

    base_lr: float = 3e-4  # lr = base_lr * global batch / 256, as upstream's --blr
    lr: float | None = None  # absolute lr; overrides base_lr when set
    min_lr: float = 0.0  # floor of the cosine
    warmup_epochs: float = 20.0  # linear warm-up from 0 (upstream: 20 of 300 epochs)
    weight_decay: float = 0.05  # on weights of rank >= 2; none on biases, norms, the logit scale
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 3.0  # max global gradient norm; None disables clipping
    optimizer: str = "adamw"  # "adamw"; "lars" (timm's Lars, momentum 0.9, as EVAR); "sgd" (momentum 0.9)
    # "after_warmup": the cosine spans the steps after the warm-up (upstream pre-training, MAE); "whole_run": the
    # cosine is a function of the step from 0, the warm-up overriding its start (timm's CosineLRScheduler, EVAR)
    cosine: str = "after_warmup"


@dataclass
class TrainConfig:
    """The training loop: length, batch, precision, checkpoints, logging."""

    out_dir: str = "runs/m2d2"  # checkpoint.pt, log.jsonl, config.json and the exported model/ go here
    batch_size: int = 64  # per process and micro-batch; the global batch is batch_size x accum_steps x processes
    # gradient accumulation: micro-batches per optimizer step. Exact for the M2D loss (a mean over equal-sized
    # micro-batches); contrastive negatives come from each micro-batch (x processes), not the whole step
    accum_steps: int = 1
    epochs: float = 300.0  # upstream stage 1: 300 epochs of AudioSet
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    seed: int = 0
    amp: str = "bf16"  # "bf16", "fp16" (with a GradScaler) or "none"
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    num_workers: int = 4  # DataLoader workers per process
    save_every: int = 1000  # write checkpoint.pt every N steps (and at the end)
    log_every: int = 50  # log loss, lr and metrics every N steps
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    export: bool = True  # write the runtime model (safetensors + config) to out_dir/model at the end
    # also write out_dir/upstream/<release name>/checkpoint-<epoch>.pth in upstream's layout (stage 1: the
    # full pre-training layout with predictor and target, which upstream's and EVAR's tools read)
    export_upstream: bool = False


@dataclass
class DataConfig:
    """A CSV of audio files or log-mel ``.npy`` files (column ``file``; optional ``label``, ``caption``)."""

    csv: str = ""
    root: str | None = None  # folder that relative paths start from; default: the CSV's folder
    crop_frames: int | None = None  # frames per random crop; default: the encoder's chunk width
    # None: "auto" when training from scratch, "model" when continuing from init_from (as upstream);
    # "model": the (pre-trained) front end's; "auto": estimated from the training data; or [mean, std]
    norm_stats: str | tuple[float, float] | None = None
    captions: str | None = None  # stage 1: caption embeddings .npy [N, E] or [N, K, E] aligned with the CSV


@dataclass
class M2DConfig:
    """The M2D self-supervised objective (predictor = upstream's 'decoder')."""

    mask_ratio: float = 0.7  # fraction of patches hidden from the online encoder (random, unstructured)
    predictor_dim: int = 512
    predictor_depth: int = 8
    predictor_heads: int = 16
    ema_decay_init: float = 0.99995  # target momentum at step 0, rising linearly ...
    ema_decay_final: float = 0.99999  # ... to this value at the last step
    target_eps: float = 1e-6  # variance floor when standardising targets per token


@dataclass
class ClapConfig:
    """The contrastive audio-text term."""

    weight: float = 0.01  # stage 1: total = M2D + weight x CLAP (upstream --loss_off)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    # negatives across processes: "exact" (the global-batch loss and gradient, whatever the number of
    # processes), "upstream" (as upstream's code: audio/text gradients 1/processes of that, the temperature's
    # whole; reproduces the paper's runs), "local" (this process's batch only). See losses.info_nce
    gather: str = "exact"


@dataclass
class Stage1Config:
    """M2D + CLAP pre-training against precomputed caption embeddings."""

    # audio head: upstream's stage 1 (M2D-CLAP 2024) MLP over the mean of the visible tokens; "semantic" is
    # the M2D2 2025 head
    model: ModelConfig = field(default_factory=lambda: ModelConfig(audio_head=AudioHeadConfig(kind="mlp")))
    # continue from a checkpoint (upstream .pth or ours): encoder [+ head]; an upstream pre-training .pth also
    # gives the predictor, the EMA target, text_proj and the logit scale
    init_from: str | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/stage1"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    m2d: M2DConfig = field(default_factory=M2DConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)


@dataclass
class Stage2Config:
    """CLAP text side: frozen audio encoder, BERT text encoder + fresh audio head, InfoNCE on raw captions."""

    init_from: str = ""  # the stage 1 model (its encoder and front end are used, frozen)
    text_init: str | None = "hf://bert-base-uncased"  # BERT weights: hf://<repo>, a checkpoint path, or None
    init_clap: bool = False  # refinement stage: audio head and text encoder also from init_from (a stage 2 model)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(audio_head=AudioHeadConfig(), text=TextConfig()))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/stage2", epochs=30.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_epochs=1.0))
    data: DataConfig = field(default_factory=DataConfig)
    clap: ClapConfig = field(default_factory=lambda: ClapConfig(weight=1.0, logit_scale_init=math.log(100.0)))
    mask_ratio: float = 0.3  # structured masking of the encoder input; 0.0 for the refinement stage
    mask_kind: str = "time"  # "time": whole time columns of patches; "random": unstructured patches
    max_text_tokens: int = 128  # captions are cut to this many BERT tokens (up to model.text.max_position, 512)
    text_dropout: float = 0.1  # BERT's hidden dropout while training, as Hugging Face's BertModel (0 disables)
    attention_dropout: float = 0.1  # BERT's attention-probability dropout while training


@dataclass
class FinetuneConfig:
    """Encoder + linear head on labelled clips (single-label: cross-entropy; multi-label: BCE).

    ``recipe="evar"`` starts from ``FINETUNE_PRESETS["evar"]`` (upstream EVAR's fine-tuning of M2D) instead of
    these defaults; settings given in the config file or ``--set`` still win."""

    recipe: str = "ours"  # "ours" (these defaults) or "evar" (EVAR's finetune.py with its config/m2d.yaml)
    init_from: str = ""  # pre-trained model (upstream .pth or ours)
    val_csv: str | None = None  # evaluated at the end (and every eval_every steps)
    eval_every: int | None = None
    multi_label: bool | None = None  # None: multi-label when any label holds ';'
    mixup: float = 0.5  # probability of mixing a batch with its reversed self, ratio ~ U(0, 1) (0 disables)
    freq_mask: int = 30  # max width in mel bins of one frequency mask (0 disables)
    time_mask: int = 100  # max width in frames of one time mask (0 disables)
    freeze_encoder: bool = False  # True: train the head only
    freeze_embed: bool = False  # True: keep the patch embedding fixed (EVAR's freeze_embed)
    head_norm: bool = False  # BatchNorm1d(affine=False) before the Linear head, which starts ~ trunc_normal(2e-5)
    training_mask: float = 0.0  # > 0: structured patch masking of the encoder input while training, and the head on
    # the mean of all visible patch tokens (D features) instead of the time-mean of stacked frequency patches (f x D)
    rrc: bool = False  # EVAR's random resized crop of the log-mel (virtual canvas 1.5x in time, scale 0.6-1.5, bicubic)
    mixup_kind: str = "ours"  # "ours": with probability `mixup`, the batch mixed with its reverse at U(0, 1);
    # "evar": every batch, per clip lambda ~ Beta(mixup, mixup) with a random partner (mixup = alpha)
    loss: str = "ours"  # "ours": cross-entropy / BCE; "evar": single-label -mean(onehot * log_softmax) (CE / classes)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/finetune", epochs=50.0, batch_size=32))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(base_lr=1e-3, warmup_epochs=5.0, betas=(0.9, 0.999), clip_grad=None)
    )
    data: DataConfig = field(default_factory=DataConfig)


STAGES: dict[str, type] = {"stage1": Stage1Config, "stage2": Stage2Config, "finetune": FinetuneConfig}

# Recipes for the finetune stage: values replacing FinetuneConfig's defaults (the user's settings still win).
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    # upstream EVAR finetune.py + config/m2d.yaml (ft_lr 2.0, ft_bs 128, ft_epochs 200, warmup_epochs 5, mixup 0.5,
    # ft_freq_mask 30, ft_time_mask 192, ft_rrc True; TaskHead BatchNorm1d(affine=False) + Linear; timm Lars with
    # momentum 0.9 and no weight decay; CosineLRScheduler lr_min 1e-7) and upstream M2D's util/ft-as2m.sh
    # (--training_mask 0.5 --optim lars); freeze_embed as util/ft-esc50.sh
    "evar": {
        "recipe": "evar",
        "head_norm": True,
        "training_mask": 0.5,
        "rrc": True,
        "freeze_embed": True,
        "mixup": 0.5,
        "mixup_kind": "evar",
        "loss": "evar",
        "freq_mask": 30,
        "time_mask": 192,
        "train": {"epochs": 200.0, "batch_size": 128},
        "optim": {
            "lr": 2.0,
            "optimizer": "lars",
            "weight_decay": 0.0,
            "warmup_epochs": 5.0,
            "min_lr": 1e-7,
            "clip_grad": None,
            "cosine": "whole_run",
        },
    },
}


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a stage config (tuples become lists in JSON)."""
    return dataclasses.asdict(cfg)


def _build(cls: type[T], d: dict[str, Any], where: str) -> T:
    if cls is ModelConfig:
        return ModelConfig.from_dict(d)  # type: ignore[return-value]
    if not isinstance(d, dict):
        raise ValueError(f"{where or 'config'} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or 'config'}; known: {names}")
    kw = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = _build(t, v, f"{where}.{k}" if where else k)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.batch_size=8"`` -> (["train", "batch_size"], 8). Values are JSON, else plain strings."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. train.batch_size=8)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(
    stage: str,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Any:
    """Defaults of ``stage``, updated by the JSON file at ``path``, ``base`` and ``KEY=VALUE`` overrides.

    Relative paths inside a config file are kept as written (they are resolved from the working directory).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    d = _merge(stage, to_dict(STAGES[stage]()), path, overrides, base)
    recipe = d.get("recipe", "ours") if stage == "finetune" else "ours"
    if recipe != "ours":
        if recipe not in FINETUNE_PRESETS:
            raise ValueError(f"unknown finetune recipe {recipe!r}; expected 'ours' or {sorted(FINETUNE_PRESETS)}")
        d = _merge(stage, _deep_update(to_dict(STAGES[stage]()), FINETUNE_PRESETS[recipe]), path, overrides, base)
    return _build(STAGES[stage], d, "")


def _merge(
    stage: str,
    d: dict[str, Any],
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...],
    base: dict[str, Any] | None,
) -> dict[str, Any]:
    """``d`` updated by the config file, ``base`` and the overrides, in that order."""
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            d = _deep_update(d, json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from e
    if base:
        d = _deep_update(d, base)
    for o in overrides:
        keys, value = parse_override(o)
        node = d
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ValueError(f"override {o!r}: {k!r} is not a section of the {stage} config")
            node = node[k]
        node[keys[-1]] = value
    return d
