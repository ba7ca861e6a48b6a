"""Downstream: a linear probe on fixed embeddings, and fine-tuning the encoder with a linear head.

Metrics: accuracy for single-label tasks, mAP (mean over classes of average precision) for multi-label ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ClassifierConfig, ModelConfig
from ..encoder import AudioEncoder
from . import dist
from .config import FinetuneConfig, to_dict
from .data import ClipDataset, LabelMap, LogMelReader, Row, read_csv
from .loop import Trainer
from .m2d import gather_tokens, init_weights, patch_tokens, run_blocks, structured_mask
from .stages import _with_pretrained_audio, read_pretrained, resolve_norm_stats, sub_state

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """scores [N, C], labels [N] class indices -> fraction of argmax hits."""
    return float((np.asarray(scores).argmax(1) == np.asarray(labels)).mean())


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """scores, targets [N, C] (targets 0/1) -> mean over classes with a positive of the average precision
    (precision at the rank of each positive, averaged; no interpolation)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    aps = []
    for c in range(scores.shape[1]):
        pos = targets[:, c]
        if not pos.any():
            continue
        hits = pos[np.argsort(-scores[:, c], kind="stable")]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(precision[hits].mean())
    if not aps:
        raise ValueError("no class has a positive example; mAP is undefined")
    return float(np.mean(aps))


def score(scores: np.ndarray, y: np.ndarray, multi_label: bool) -> float:
    return mean_average_precision(scores, y) if multi_label else accuracy(scores, y)


# ---------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """A trained linear probe. ``predict`` applies the standardisation and the linear layer."""

    metric: str  # "accuracy" or "mAP"
    val_score: float
    test_score: float | None
    classes: list[Any]  # label of each output column (single-label), or column indices (multi-label)
    mean: np.ndarray  # (D,) standardisation statistics of the training embeddings
    std: np.ndarray
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    best_epoch: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Embeddings [N, D] -> logits [N, C]."""
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std) @ self.weight.T + self.bias


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray | Sequence[Any],
    val_x: np.ndarray | None = None,
    val_y: np.ndarray | Sequence[Any] | None = None,
    test_x: np.ndarray | None = None,
    test_y: np.ndarray | Sequence[Any] | None = None,
    *,
    val_fraction: float = 0.1,
    lr: float = 3e-5,
    weight_decay: float = 1e-8,
    batch_size: int = 200,
    max_epochs: int = 200,
    patience: int = 20,
    standardise: bool = True,
    seed: int = 42,
) -> ProbeResult:
    """Linear evaluation of fixed embeddings with upstream EVAR's protocol (``lineareval.py``, whose
    classifier is ``TorchMLPClassifier2`` with no hidden layer; defaults from EVAR's M2D configs):

    - features standardised with the training set's mean and (population) standard deviation;
    - one ``nn.Linear`` (PyTorch's default initialisation);
    - Adam, ``lr`` (EVAR's ``lr_lineareval``: 3e-5 for M2D/M2D-CLAP, 3e-4 for BYOL-A or AST), betas
      (0.9, 0.999), eps 1e-8, L2 ``weight_decay`` 1e-8;
    - mini-batches of ``min(batch_size, N)`` (EVAR: 200), shuffled, the last one kept;
    - loss: mean over batch and classes of ``-onehot * log_softmax`` (single-label), or binary
      cross-entropy of the sigmoid (multi-label);
    - after each epoch, the validation accuracy (or mAP); the best epoch's weights are kept (ties go to
      the later epoch), and training stops when ``patience`` epochs (EVAR's ``early_stop_epochs``: 20)
      pass without a new best, or after ``max_epochs`` (EVAR: 200).

    Args:
        train_x: embeddings [N, D].
        train_y: labels [N] (any hashable values), or multi-hot [N, C] for a multi-label task.
        val_x, val_y: validation set; without it, ``val_fraction`` of the training set is held out.
        test_x, test_y: scored once with the selected epoch.
        standardise: False feeds the raw features (EVAR's ``--standard_scaler False``).
    Returns:
        ``ProbeResult`` with the validation and test scores (accuracy or mAP).
    """
    rng = np.random.default_rng(seed)
    train_x = np.asarray(train_x, dtype=np.float32)
    y_arr = np.asarray(train_y)
    multi = y_arr.ndim == 2
    if multi:
        classes: list[Any] = list(range(y_arr.shape[1]))

        def enc(y: Any) -> np.ndarray:
            return np.asarray(y, dtype=np.float32)
    else:
        classes = sorted(set(y_arr.tolist()))
        index = {c: i for i, c in enumerate(classes)}

        def enc(y: Any) -> np.ndarray:
            try:
                return np.array([index[v] for v in np.asarray(y).tolist()], dtype=np.int64)
            except KeyError as e:
                raise ValueError(f"label {e.args[0]!r} does not occur in the training labels") from e

    y_tr = enc(train_y)
    if val_x is None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1) when no validation set is given, got {val_fraction}")
        perm = rng.permutation(len(train_x))
        n_val = max(1, int(round(len(train_x) * val_fraction)))
        v, t = perm[:n_val], perm[n_val:]
        val_x, y_val, train_x, y_tr = train_x[v], y_tr[v], train_x[t], y_tr[t]
    else:
        val_x, y_val = np.asarray(val_x, dtype=np.float32), enc(val_y)
    if standardise:  # scikit-learn's StandardScaler: population std, constant features left unscaled
        mean, std = train_x.mean(0), train_x.std(0)
        std = np.where(std > 1e-12, std, 1.0).astype(np.float32)
    else:
        mean, std = np.zeros(train_x.shape[1], np.float32), np.ones(train_x.shape[1], np.float32)

    def prep(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((np.asarray(x, dtype=np.float32) - mean) / std)

    xt, xv = prep(train_x), prep(val_x)
    n_cls = len(classes)
    yt = torch.from_numpy(y_tr) if multi else F.one_hot(torch.from_numpy(y_tr), n_cls).float()
    torch.manual_seed(seed)
    head = nn.Linear(xt.shape[1], n_cls)
    opt = torch.optim.Adam(head.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if multi:
            return F.binary_cross_entropy(torch.sigmoid(logits), target)
        return -(target * F.log_softmax(logits, dim=-1)).mean()

    bs = min(batch_size, len(xt))
    best, best_state, best_epoch, waited = -np.inf, None, 0, 0
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(bs):
            opt.zero_grad()
            loss_fn(head(xt[idx]), yt[idx]).backward()
            opt.step()
        with torch.no_grad():
            s = score(head(xv).numpy(), y_val, multi)
        if s >= best:
            best, best_epoch, waited = s, epoch, 1
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            if waited >= patience:
                break
            waited += 1
    head.load_state_dict(best_state)
    log.info("linear probe: best validation %s %.4f at epoch %d", "mAP" if multi else "accuracy", best, best_epoch + 1)
    if best_epoch == max_epochs - 1:
        log.warning(
            "the linear probe was still improving at its last epoch (%d); it may under-fit: EVAR's protocol keeps "
            "lr %.3g and %d epochs for comparable numbers, a small data set may need a larger lr (e.g. 3e-4) or "
            "more epochs",
            max_epochs,
            lr,
            max_epochs,
        )
    res = ProbeResult(
        "mAP" if multi else "accuracy",
        float(best),
        None,
        classes,
        mean,
        std,
        head.weight.detach().numpy().copy(),
        head.bias.detach().numpy().copy(),
        best_epoch,
    )
    if test_x is not None:
        res.test_score = score(res.predict(test_x), enc(test_y), multi)
    return res


def embed_rows(model: Any, rows: Sequence[Row], batch_size: int = 16) -> np.ndarray:
    """Clip embeddings [N, D] of the audio files in ``rows`` with a runtime model (from ``m2d2_embed.load``)."""
    bad = [r.path for r in rows if r.path.suffix == ".npy"]
    if bad:
        raise ValueError(f"{bad[0]}: the probe embeds waveforms with the runtime model; list audio files, not .npy")
    paths = [str(r.path) for r in rows]
    parts = [
        np.asarray(model.clip_embeddings(paths[i : i + batch_size]), dtype=np.float32)
        for i in range(0, len(paths), batch_size)
    ]
    return np.concatenate(parts)


def probe_csv(
    model_path: str | Path,
    train_csv: str | Path,
    val_csv: str | Path | None = None,
    test_csv: str | Path | None = None,
    device: str = "cpu",
    **kw: Any,
) -> ProbeResult:
    """``linear_probe`` on the runtime model's clip embeddings of the files listed in CSVs with labels
    (multi-label when a training row holds several labels separated by ';')."""
    import m2d2_embed

    lm = LabelMap.from_rows(read_csv(train_csv))
    model = m2d2_embed.load(str(model_path), device=device)

    def load(csv_path: str | Path | None) -> tuple[np.ndarray | None, Any]:
        if csv_path is None:
            return None, None
        rows = read_csv(csv_path)
        if lm.multi_label:
            y: Any = np.stack([lm.encode(r.labels).numpy() for r in rows])
        else:
            y = [r.labels[0] if r.labels else None for r in rows]
        return embed_rows(model, rows), y

    (xtr, ytr), (xv, yv), (xte, yte) = load(train_csv), load(val_csv), load(test_csv)
    return linear_probe(xtr, ytr, xv, yv, xte, yte, **kw)


# ---------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------


def spec_mask(x: torch.Tensor, max_width: int, axis: int, generator: torch.Generator) -> torch.Tensor:
    """Zero (the normalised mean) one random band of up to ``max_width`` bins along ``axis`` of each clip.
    x (B, 1, n_mels, frames); axis -2 masks frequency, -1 time."""
    if max_width <= 0:
        return x
    B, n = x.shape[0], x.shape[axis]
    width = torch.randint(0, min(max_width, n) + 1, (B,), generator=generator)
    start = (torch.rand(B, generator=generator) * (n - width + 1)).long()
    pos = torch.arange(n)
    band = (pos[None] >= start[:, None]) & (pos[None] < (start + width)[:, None])  # (B, n)
    shape = [B, 1, 1, 1]
    shape[axis] = n
    return x.masked_fill(band.view(shape).to(x.device), 0.0)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """EVAR's fine-tuning ``RandomResizeCrop`` of each clip: the log-mel placed at the centre of a zero canvas
    1.0x its height and 1.5x its width, a crop of U(0.6, 1.5) x its height and width (clipped to the canvas)
    at a random place, resized back bicubically (align_corners). x (B, 1, n_mels, frames) -> same shape."""
    B, _, H, W = x.shape
    ch, cw = H, int(W * 1.5)
    out = []
    for b in range(B):
        canvas = x.new_zeros(1, ch, cw)
        y0, x0 = (ch - H) // 2, (cw - W) // 2
        canvas[:, y0 : y0 + H, x0 : x0 + W] = x[b]
        u = torch.rand(4, generator=generator).tolist()
        h = min(max(int((0.6 + 0.9 * u[0]) * H), 1), ch)
        w = min(max(int((0.6 + 0.9 * u[1]) * W), 1), cw)
        i = int(u[2] * (ch - h + 1)) if ch > h else 0
        j = int(u[3] * (cw - w + 1)) if cw > w else 0
        crop = canvas[None, :, i : i + h, j : j + w]
        out.append(F.interpolate(crop, size=(H, W), mode="bicubic", align_corners=True)[0])
    return torch.stack(out).to(x.dtype)


class TaskHead(nn.Module):
    """The classifier over clip features: optional ``BatchNorm1d(affine=False)`` (``norm``), then ``linear``.
    Keys ``norm.running_mean`` / ``norm.running_var`` / ``linear.weight`` / ``linear.bias``, as
    ``m2d2_embed.config.ClassifierConfig`` names them under ``classifier.``. features (B, in) -> logits (B, C)."""

    def __init__(self, in_features: int, num_classes: int, norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, eps=eps, affine=False) if norm else None
        self.linear = nn.Linear(in_features, num_classes)
        if norm:  # EVAR's M2D head (upstream m2d/runtime_audio.py): tiny weights, zero bias
            nn.init.trunc_normal_(self.linear.weight, std=2e-5)
            nn.init.zeros_(self.linear.bias)
        else:
            init_weights(self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x) if self.norm is not None else x)


def _evar_mixup(
    x: torch.Tensor, target: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """EVAR's fine-tuning mixup: per clip lambda ~ Beta(alpha, alpha), mixed with a random partner of the batch."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=x.shape[0]).astype(np.float32)).to(x.device)
    partner = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    mix_x = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[partner]
    return mix_x, lam[:, None] * target + (1 - lam[:, None]) * target[partner]


class FinetuneModel(nn.Module):
    """Encoder + ``TaskHead`` on the clip feature: patch tokens (B, f*t, D) -> (B, t, f*D) -> mean over time
    (the layout of the runtime's clip embedding), or with ``training_mask`` > 0 (EVAR with upstream's
    fine-tuning scripts) the mean of all (visible) patch tokens (B, D). Batch: ``x`` [B, 1, n_mels, frames],
    ``label``."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        model: ModelConfig,
        encoder_state: dict[str, torch.Tensor],
        labels: LabelMap,
        crop_frames: int,
    ) -> None:
        super().__init__()
        self.cfg, self.model_config, self.labels, self.crop_frames = cfg, model, labels, crop_frames
        self.encoder = AudioEncoder(model.encoder)
        self.encoder.load_state_dict(encoder_state)
        self.encoder.pos_embed.requires_grad_(False)
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
        if cfg.freeze_embed:
            self.encoder.patch_embed.requires_grad_(False)
        for name, allowed in (("mixup_kind", ("ours", "evar")), ("loss", ("ours", "evar"))):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"finetune {name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}")
        f, D = model.encoder.grid[0], model.encoder.embed_dim
        self.flat = cfg.training_mask > 0  # EVAR: flat features (mean of all tokens) whenever masking is on
        self.head = TaskHead(D if self.flat else f * D, len(labels.names), norm=cfg.head_norm)

    def features(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 1, n_mels, frames) -> (B, f * D), or (B, D) with ``training_mask`` (patches masked while training)."""
        f = self.encoder.config.grid[0]
        if self.flat:
            tokens, t = patch_tokens(self.encoder, x)  # (B, f*t, D)
            if self.training:
                mask = structured_mask(x.shape[0], f, t, self.cfg.training_mask, generator).to(x.device)
                tokens = gather_tokens(tokens, mask.visible)
            return run_blocks(self.encoder, tokens)[:, 1:].mean(1)
        tokens = self.encoder(x)  # (B, f*t, D)
        B, N, D = tokens.shape
        return tokens.reshape(B, f, N // f, D).permute(0, 2, 1, 3).reshape(B, N // f, f * D).mean(1)

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch["x"], batch["label"]
        multi = self.labels.multi_label
        target = y.float() if multi else F.one_hot(y, len(self.labels.names)).float()
        gen = generator or torch.Generator().manual_seed(0)
        if self.training:
            if self.cfg.mixup_kind == "evar":  # EVAR: mixup on the batch first, then the augmentations
                if self.cfg.mixup > 0:
                    x, target = _evar_mixup(x, target, self.cfg.mixup, gen)
                x = spec_mask(spec_mask(x, self.cfg.freq_mask, -2, gen), self.cfg.time_mask, -1, gen)
            else:
                x = spec_mask(spec_mask(x, self.cfg.freq_mask, -2, gen), self.cfg.time_mask, -1, gen)
                if self.cfg.mixup > 0 and float(torch.rand(1, generator=gen)) < self.cfg.mixup:
                    lam = float(torch.rand(1, generator=gen))
                    x = lam * x + (1 - lam) * x.flip(0)
                    target = lam * target + (1 - lam) * target.flip(0)
            if self.cfg.rrc:
                x = random_resized_crop(x, gen)
        logits = self.head(self.features(x, gen)).float()
        if multi:
            loss = F.binary_cross_entropy_with_logits(logits, target)
        elif self.cfg.loss == "evar":
            loss = -(target * F.log_softmax(logits, dim=-1)).mean()  # EVAR's loss_nll: CE / classes
        else:
            loss = F.cross_entropy(logits, target)  # soft targets after mixup
        return loss, {}

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """A whole clip (1, n_mels, frames) -> logits [C]: the clip feature averaged over ``crop_frames``
        windows (the last one padded with silence by the caller's normalised log-mel)."""
        n, T = self.crop_frames, x.shape[-1]
        starts = list(range(0, max(T - n, 0) + 1, n))
        if starts[-1] + n < T:
            starts.append(T - n)
        chunks = torch.stack([x[..., s : s + n] for s in starts]) if T >= n else x[None]
        return self.head(self.features(chunks).mean(0, keepdim=True))[0].float()

    def export(self) -> tuple[dict[str, torch.Tensor], ModelConfig]:
        """The fine-tuned encoder (the CLAP head and text side no longer match it and are left out)."""
        sd = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        return sd, dataclasses.replace(self.model_config, audio_head=None, text=None, text_weights=None)

    def classifier_config(self) -> ClassifierConfig:
        """The head as ``m2d2_embed.config.ClassifierConfig`` (what a runtime model's tagging reads)."""
        lin = self.head.linear
        norm = self.head.norm
        return ClassifierConfig(
            in_features=lin.in_features,
            num_classes=lin.out_features,
            norm=norm is not None,
            norm_eps=norm.eps if norm is not None else 1e-5,
            labels=tuple(self.labels.names),
            multi_label=self.labels.multi_label,
        )

    def export_extra(self, model_dir: Path) -> Path:
        """``classifier.safetensors`` beside the model, written atomically with the model file's mode: tensors
        ``linear.weight`` [C, in], ``linear.bias`` [C] and, with ``head_norm``, ``norm.running_mean`` /
        ``norm.running_var`` [in] (``ClassifierConfig``'s keys without the ``classifier.`` prefix); metadata
        ``labels`` (JSON list), ``multi_label`` (JSON bool) and ``classifier_config`` (JSON). Returns its path."""
        from safetensors.torch import save_file

        from ..outputs import atomic_write

        cc = self.classifier_config()
        meta = {
            "labels": json.dumps(self.labels.names),
            "multi_label": json.dumps(self.labels.multi_label),
            "classifier_config": json.dumps(dataclasses.asdict(cc)),
        }
        tensors = {
            k: v.detach().float().cpu().contiguous()
            for k, v in self.head.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        dst = (model_dir.parent if model_dir.suffix == ".safetensors" else model_dir) / "classifier.safetensors"
        return atomic_write(dst, lambda p: save_file(tensors, p, metadata=meta))


def evaluate_clips(model: FinetuneModel, dataset: ClipDataset) -> dict[str, float]:
    """Score ``model`` on every clip of ``dataset`` (whole clips, windows averaged)."""
    reader: LogMelReader = dataset.reader
    scores, ys = [], []
    device = next(model.parameters()).device
    for r in dataset.rows:
        x = dataset.normalise(reader(r.path))
        if x.shape[-1] < model.crop_frames:
            x = dataset.crop(x, np.random.default_rng(0))  # silence-padded to one window
        scores.append(model.predict(x.to(device)).cpu().numpy())
        ys.append(model.labels.encode(r.labels).numpy())
    s, y = np.stack(scores), np.stack(ys)
    return {"mAP" if model.labels.multi_label else "accuracy": score(s, y, model.labels.multi_label)}


def setup_finetune(cfg: FinetuneConfig, info: dist.DistInfo) -> Trainer:
    """Data, model and trainer for fine-tuning (nothing is trained yet)."""
    if not cfg.init_from:
        raise ValueError("finetune needs init_from: a pre-trained model (ours or an upstream .pth)")
    if not cfg.data.csv:
        raise ValueError("finetune needs data.csv with a 'label' column")
    rows = read_csv(cfg.data.csv, cfg.data.root)
    labels = LabelMap.from_rows(rows, cfg.multi_label)
    pretrained, pcfg = read_pretrained(cfg.init_from)
    model_cfg = resolve_norm_stats(cfg.data, rows, _with_pretrained_audio(cfg.model, pcfg), cfg.train.seed)
    crop = cfg.data.crop_frames or model_cfg.encoder.chunk_frames
    ds = ClipDataset(rows, model_cfg.frontend, crop, seed=cfg.train.seed, labels=labels)
    torch.manual_seed(cfg.train.seed)
    model = FinetuneModel(cfg, model_cfg, sub_state(pretrained, "encoder."), labels, crop)
    evaluate = None
    if cfg.val_csv:
        val = ClipDataset(
            read_csv(cfg.val_csv),
            model_cfg.frontend,
            crop,
            random_crop=False,
            norm_stats=(model_cfg.frontend.norm_mean, model_cfg.frontend.norm_std),
        )

        def evaluate(m: nn.Module) -> dict[str, float]:
            return evaluate_clips(m, val)  # type: ignore[arg-type]

    log.info(
        "fine-tuning on %d clips, %d classes (%s)",
        len(rows),
        len(labels.names),
        "multi-label" if labels.multi_label else "single-label",
    )
    return Trainer(
        model,
        ds,
        cfg.train,
        cfg.optim,
        info,
        run_config={"stage": "finetune", **to_dict(cfg)},
        evaluate=evaluate,
        eval_every=cfg.eval_every,
    )
