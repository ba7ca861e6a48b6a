"""The training loop shared by every stage: DDP, autocast, AdamW with warm-up + cosine, gradient clipping,
resumable atomic checkpoints, logging, and the export to the runtime format at the end.

A stage is an ``nn.Module`` with:
  ``forward(batch: dict, generator: torch.Generator) -> (loss, metrics: dict[str, Tensor])``
  ``after_step(step: int, total_steps: int) -> None``   (EMA update, logit-scale clamp; may do nothing)
  ``export() -> (state_dict, ModelConfig)``            (what ``m2d2_embed.load`` reads)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..outputs import atomic_write
from . import dist
from .config import OptimConfig, TrainConfig
from .data import EpochBatches

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay on tensors of rank >= 2, none on biases, norms and
    scalars (timm's ``param_groups_weight_decay``, as upstream)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0, cosine: str = "after_warmup") -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then half-cycle cosine from ``peak`` to ``min_lr``: over the
    steps after the warm-up (``cosine="after_warmup"``, upstream's pre-training), or over all steps with the
    warm-up replacing its start (``"whole_run"``, timm's ``CosineLRScheduler`` as EVAR's fine-tuning uses)."""
    if step < warmup:
        return peak * step / warmup
    if cosine == "whole_run":
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    if cosine != "after_warmup":
        raise ValueError(f"optim.cosine must be 'after_warmup' or 'whole_run', got {cosine!r}")
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Lars(torch.optim.Optimizer):
    """LARS (You et al., 2017) with timm's ``Lars`` semantics, as EVAR's fine-tuning uses it: SGD with momentum
    whose per-tensor step is scaled by the trust ratio ``trust_coeff * |w| / (|g| + weight_decay * |w| + eps)``
    only when ``weight_decay`` is non-zero or ``always_adapt`` is set (so EVAR's ``Lars(lr, momentum=0.9,
    weight_decay=0)`` is SGD with momentum 0.9). The first step's momentum buffer is the gradient itself."""

    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        always_adapt: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Lars needs lr, momentum and weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff, eps=eps)
        super().__init__(params, {**defaults, "always_adapt": always_adapt})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd != 0 or group["always_adapt"]:
                    w_norm, g_norm = p.norm(2.0), g.norm(2.0)
                    ratio = group["trust_coeff"] * w_norm / (g_norm + w_norm * wd + group["eps"])
                    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                    g = g.add(p, alpha=wd).mul_(ratio)
                if mom != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = g.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(mom).add_(g)
                    g = state["momentum_buffer"]
                p.add_(g, alpha=-group["lr"])
        return loss


def make_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``optim.optimizer`` over the trainable parameters: "adamw" (weight decay on weights of rank >= 2 only),
    "lars" (``Lars``, momentum 0.9) or "sgd" (momentum 0.9); weight decay ``optim.weight_decay``."""
    groups = param_groups(model, optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas))
    if optim.optimizer == "lars":
        return Lars(groups, lr=lr, momentum=0.9)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise ValueError(f"optim.optimizer must be 'adamw', 'lars' or 'sgd', got {optim.optimizer!r}")


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for the random choices of one step (masks, mixup) of one process."""
    s = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(s)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device`` in ``dtype``; None: full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


class Trainer:
    """Runs one stage. ``fit()`` trains until ``total_steps`` (or ``until``), checkpointing and logging."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Any,
        train: TrainConfig,
        optim: OptimConfig,
        info: dist.DistInfo,
        *,
        collate_fn: Callable | None = None,
        run_config: dict[str, Any] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        eval_every: int | None = None,
    ) -> None:
        if train.amp not in AMP_DTYPES:
            raise ValueError(f"train.amp must be one of {sorted(AMP_DTYPES)}, got {train.amp!r}")
        self.cfg, self.optim_cfg, self.info = train, optim, info
        self.dataset, self.collate_fn = dataset, collate_fn
        self.evaluate, self.eval_every = evaluate, eval_every
        self.out_dir = Path(train.out_dir)
        self.model = model.to(info.device)
        self.wrapped: nn.Module = self.model
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)

        if train.accum_steps < 1:
            raise ValueError(f"train.accum_steps must be >= 1, got {train.accum_steps}")
        self.accum_steps = int(train.accum_steps)
        self.step_batch = train.batch_size * self.accum_steps  # clips per process per optimizer step
        self.steps_per_epoch = EpochBatches.steps_per_epoch(len(dataset), self.step_batch, info.world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} clips are fewer than one global batch ({train.batch_size} x {self.accum_steps} "
                f"accumulation steps x {info.world_size} processes); lower train.batch_size or add data"
            )
        self.total_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        self.warmup_steps = min(round(optim.warmup_epochs * self.steps_per_epoch), self.total_steps)
        global_batch = self.step_batch * info.world_size
        self.peak_lr = optim.lr if optim.lr is not None else optim.base_lr * global_batch / 256
        self.optimizer = make_optimizer(self.model, optim, self.peak_lr)
        self.amp_dtype = AMP_DTYPES[train.amp]
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=train.amp == "fp16")
        self.step = 0
        self.run_config = run_config or {}
        self._t0 = time.perf_counter()
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.run_config, indent=2, default=str))
        if train.resume and (self.out_dir / CHECKPOINT).exists():
            self.load_checkpoint(self.out_dir / CHECKPOINT)
        log.info(
            "%d steps (%d per epoch), global batch %d, peak lr %.3g, warm-up %d steps, amp %s, %d procs",
            self.total_steps,
            self.steps_per_epoch,
            global_batch,
            self.peak_lr,
            self.warmup_steps,
            train.amp,
            info.world_size,
        )

    # -- checkpoints -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model (EMA target included), optimizer, scaler, step, RNG state (of rank 0) and the run config."""
        return {
            "format": "m2d2_embed.train/1",
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "world_size": self.info.world_size,
            "config": json.dumps(self.run_config, default=str),
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/checkpoint.pt`` atomically (temporary file + rename) from rank 0."""
        path = self.out_dir / CHECKPOINT
        if self.info.is_main:
            state = self.state_dict()
            atomic_write(path, lambda p: torch.save(state, p))
            log.info("step %d: saved %s", self.step, path)
        dist.barrier()
        return path if self.info.is_main else None

    def load_checkpoint(self, path: str | Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = self.model.load_state_dict(ck["model"], strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{path} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}; "
                "was it written with another configuration? Use a fresh train.out_dir"
            )
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.step = int(ck["step"])
        _set_rng_state(ck["rng"])
        if ck.get("world_size") != self.info.world_size:
            log.warning(
                "%s was written by %s process(es), resuming with %d: the data order changes from here",
                path,
                ck.get("world_size"),
                self.info.world_size,
            )
        log.info("resumed from %s at step %d", path, self.step)

    # -- training ----------------------------------------------------------------------------------------

    def fit(self, until: int | None = None) -> dict[str, float]:
        """Train to ``total_steps``; ``until`` stops earlier (after checkpointing), as a preemption would.
        Exports the runtime model at the end of training. Returns the last logged metrics."""
        stop = min(until, self.total_steps) if until is not None else self.total_steps
        last: dict[str, Any] = {}
        self.model.train()
        while self.step < stop:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            batches = EpochBatches(
                len(self.dataset),
                self.step_batch,
                self.info.rank,
                self.info.world_size,
                self.cfg.seed,
                epoch,
                start,
            )
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches,
                num_workers=self.cfg.num_workers,
                collate_fn=self.collate_fn,
                pin_memory=self.info.device.type == "cuda",
            )
            for batch in loader:
                last = self.train_step(batch)
                if self.step % self.cfg.save_every == 0 and self.step < stop:
                    self.save_checkpoint()
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self.run_eval()
                if self.step >= stop:
                    break
        self.save_checkpoint()
        if self.step >= self.total_steps:
            if self.evaluate is not None:
                last.update(self.run_eval())
            if self.cfg.export:
                self.export()
        return {k: float(v) for k, v in last.items()}

    def forward_backward(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and gradients of one step's batch (``accum_steps`` x ``batch_size`` clips of this process), in
        ``accum_steps`` micro-batches whose losses are averaged; DDP synchronises only the last backward.
        Returns the mean loss and the stage's metrics, averaged over the micro-batches."""
        n = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
        size = -(-n // self.accum_steps)
        parts = [
            {k: (v[i : i + size] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
            for i in range(0, n, size)
        ]
        total: torch.Tensor = torch.zeros((), device=self.info.device)
        sums: dict[str, Any] = {}
        for j, part in enumerate(parts):
            sync = j == len(parts) - 1 or not isinstance(self.wrapped, DistributedDataParallel)
            ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with ctx:
                with autocast(self.info.device, self.amp_dtype):
                    loss, metrics = self.wrapped(part, generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {self.step}; lower the learning rate, use "
                        "amp='bf16' or 'none', or check the data"
                    )
                self.scaler.scale(loss * (len(next(iter(part.values()))) / n)).backward()
            total = total + loss.detach() / len(parts)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v / len(parts)
        return total, sums

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step; returns the loss, lr and the stage's metrics (tensors or floats)."""
        o = self.optim_cfg
        lr = lr_at(self.step, self.peak_lr, self.warmup_steps, self.total_steps, o.min_lr, o.cosine)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = _move(batch, self.info.device)
        gen = step_generator(self.cfg.seed, self.step, self.info.rank)
        loss, metrics = self.forward_backward(batch, gen)
        if self.optim_cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_step(self.step, self.total_steps)
        self.step += 1
        out = {"loss": loss, "lr": lr, **metrics}  # tensors: no device sync unless logged
        if self.info.is_main and (self.step % self.cfg.log_every == 0 or self.step in (1, self.total_steps)):
            self._log({k: float(v) for k, v in out.items()})
        return out

    def _log(self, values: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self._t0
        log.info(
            "step %d/%d %s (%.1f s)",
            self.step,
            self.total_steps,
            " ".join(f"{k}={v:.4g}" for k, v in values.items()),
            elapsed,
        )
        with (self.out_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps({"step": self.step, **values, "time": round(elapsed, 3)}) + "\n")

    def run_eval(self) -> dict[str, float]:
        """Call ``evaluate(model)`` on rank 0 (the others wait); logs and returns its metrics."""
        res: dict[str, float] = {}
        if self.info.is_main and self.evaluate is not None:
            self.model.eval()
            with torch.no_grad():
                res = self.evaluate(self.model)
            self.model.train()
            self._log({f"eval_{k}": v for k, v in res.items()})
        dist.barrier()
        return res

    def export(self) -> Path | None:
        """Write the runtime model (``m2d2_embed.convert.save_model``) to ``out_dir/model`` from rank 0."""
        from ..convert import save_model

        path = None
        if self.info.is_main:
            sd, cfg = self.model.export()
            path = save_model({k: v.detach().float().cpu() for k, v in sd.items()}, cfg, self.out_dir / "model")
            if hasattr(self.model, "export_extra"):
                self.model.export_extra(path)
            if self.cfg.export_upstream:
                from .upstream import write_upstream_checkpoint

                epoch = math.ceil(self.step / self.steps_per_epoch)
                write_upstream_checkpoint(self.model, self.out_dir / "upstream", epoch=epoch)
            log.info("exported %s (load it with m2d2_embed.load)", path)
        dist.barrier()
        return path
