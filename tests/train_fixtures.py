"""Shared pieces of the training tests: tiny configurations, the synthetic dataset, and (run as a script
under torchrun) the 2-process worker of tests/test_train_distributed.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from m2d2_embed.config import AudioHeadConfig, EncoderConfig, FrontEndConfig, ModelConfig, TextConfig
from m2d2_embed.train.config import load_config
from m2d2_embed.train.data import make_synthetic_dataset

TINY_ENCODER = EncoderConfig(input_size=(80, 64), patch_size=(16, 16), embed_dim=64, depth=2, num_heads=4)
TINY_HEAD = AudioHeadConfig(dim=64, out_dim=64)
TINY_TEXT = TextConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=64)
TINY_MODEL = ModelConfig(frontend=FrontEndConfig(), encoder=TINY_ENCODER, audio_head=TINY_HEAD)
TINY_M2D = {"predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2}
TINY_TRAIN = {"batch_size": 4, "amp": "none", "num_workers": 0, "log_every": 1, "save_every": 1000}


def tiny_model_dict(text: bool = False) -> dict:
    d = ModelConfig(
        frontend=FrontEndConfig(), encoder=TINY_ENCODER, audio_head=TINY_HEAD, text=TINY_TEXT if text else None
    ).to_dict()
    return d


def stage1_config(ds, out_dir: Path, max_steps: int = 4, **train):
    return load_config(
        "stage1",
        base={
            "model": tiny_model_dict(),
            "m2d": TINY_M2D,
            "train": {**TINY_TRAIN, "out_dir": str(out_dir), "max_steps": max_steps, **train},
            "optim": {"lr": 1e-3, "warmup_epochs": 0.5},
            "data": {"csv": str(ds.train_csv), "captions": str(ds.train_captions)},
        },
    )


def stage2_config(ds, init_from: Path, out_dir: Path, max_steps: int = 4, **train):
    return load_config(
        "stage2",
        base={
            "init_from": str(init_from),
            "text_init": None,
            "model": tiny_model_dict(text=True),
            "train": {**TINY_TRAIN, "out_dir": str(out_dir), "max_steps": max_steps, **train},
            "optim": {"lr": 1e-3, "warmup_epochs": 0.5},
            "max_text_tokens": 32,
            "data": {"csv": str(ds.train_csv)},
        },
    )


def finetune_config(ds, init_from: Path, out_dir: Path, max_steps: int = 4, **train):
    return load_config(
        "finetune",
        base={
            "init_from": str(init_from),
            "val_csv": str(ds.val_csv),
            "train": {**TINY_TRAIN, "out_dir": str(out_dir), "max_steps": max_steps, **train},
            "optim": {"lr": 1e-3, "warmup_epochs": 0.5},
            "data": {"csv": str(ds.train_csv)},
        },
    )


def _worker(data_dir: Path, out_dir: Path) -> None:
    """Under torchrun: check the all-gather InfoNCE against one process, then train stage 1 for 3 steps
    and save this rank's parameters to out_dir/rank<r>.pt."""
    import torch.distributed as tdist

    from m2d2_embed.train import dist
    from m2d2_embed.train.data import SyntheticDataset
    from m2d2_embed.train.losses import info_nce
    from m2d2_embed.train.stages import run

    info = dist.setup("cpu")
    r, w = info.rank, info.world_size
    g = torch.Generator().manual_seed(0)
    a_all, t_all = torch.randn(4 * w, 16, generator=g), torch.randn(4 * w, 16, generator=g)
    full = info_nce(a_all.clone().requires_grad_(), t_all, 10.0, gather=False)  # one process, whole batch
    a_full = a_all.clone().requires_grad_()
    info_nce(a_full, t_all, 10.0, gather=False).backward()
    a = a_all[4 * r : 4 * (r + 1)].clone().requires_grad_()
    local = info_nce(a, t_all[4 * r : 4 * (r + 1)], 10.0, gather=True)
    local.backward()
    mean_loss = local.detach().clone()
    tdist.all_reduce(mean_loss)
    # DDP averages gradients over processes: the mean of the per-process gradients must equal one process's
    grad_err = (a.grad / w - a_full.grad[4 * r : 4 * (r + 1)]).abs().max().item()
    ds = SyntheticDataset(
        data_dir,
        data_dir / "train.csv",
        data_dir / "val.csv",
        data_dir / "captions_train.npy",
        data_dir / "captions_val.npy",
    )
    trainer = run("stage1", stage1_config(ds, out_dir / "run", max_steps=3))
    torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out_dir / f"rank{r}.pt")
    (out_dir / f"rank{r}.json").write_text(
        json.dumps(
            {
                "world": w,
                "loss_err": abs(mean_loss.item() / w - full.item()),
                "grad_err": grad_err,
                "step": trainer.step,
            }
        )
    )
    dist.teardown()


def _gradient_ratio_worker(out_dir: Path) -> None:
    """Under torchrun: for each ``clap.gather`` mode, the DDP-averaged gradient of an audio layer, a text
    layer and the temperature, divided by the gradient of one process on the whole global batch; writes
    out_dir/ratios<r>.json {mode: {"audio": r, "text": r, "scale": r, "residual": max deviation}}."""
    import copy

    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from m2d2_embed.train import dist
    from m2d2_embed.train.losses import GATHER_MODES, LogitScale, info_nce

    class Toy(nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode
            self.audio, self.text, self.scale = nn.Linear(8, 16), nn.Linear(6, 16), LogitScale()

        def forward(self, xa: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
            return info_nce(self.audio(xa), self.text(xt), self.scale(), self.mode)

    info = dist.setup("cpu")
    r, w, b = info.rank, info.world_size, 4
    g = torch.Generator().manual_seed(0)
    xa, xt = torch.randn(b * w, 8, generator=g), torch.randn(b * w, 6, generator=g)
    torch.manual_seed(0)
    base = Toy("local")
    ref = copy.deepcopy(base)  # one process, the whole global batch ("local" on all rows = single process)
    ref(xa, xt).backward()
    out = {}
    for mode in GATHER_MODES:
        model = copy.deepcopy(base)
        model.mode = mode
        ddp = DistributedDataParallel(model)
        ddp(xa[r * b : (r + 1) * b], xt[r * b : (r + 1) * b]).backward()  # DDP averages over processes
        res, worst = {}, 0.0
        for name in ("audio", "text", "scale"):
            got = torch.cat([p.grad.reshape(-1) for p in getattr(model, name).parameters()])
            want = torch.cat([p.grad.reshape(-1) for p in getattr(ref, name).parameters()])
            ratio = float(got @ want / (want @ want))
            res[name] = ratio
            worst = max(worst, float((got - ratio * want).abs().max() / want.abs().max()))
        res["residual"] = worst
        out[mode] = res
    (out_dir / f"ratios{r}.json").write_text(json.dumps(out))
    dist.teardown()


if __name__ == "__main__":
    if sys.argv[1] == "ratios":
        _gradient_ratio_worker(Path(sys.argv[2]))
    else:
        _worker(Path(sys.argv[1]), Path(sys.argv[2]))


_CACHE: dict[str, object] = {}


def get_synth(tmp_path_factory):
    """The synthetic dataset (24 train / 8 val one-second wav clips), written once per session."""
    if "synth" not in _CACHE:
        _CACHE["synth"] = make_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_train=24, n_val=8)
    return _CACHE["synth"]


def get_stage1_model(tmp_path_factory) -> Path:
    """A tiny stage 1 model exported after 2 steps (the starting point of stage 2 and fine-tuning tests)."""
    if "stage1" not in _CACHE:
        from m2d2_embed.train.stages import run

        out = tmp_path_factory.mktemp("stage1")
        run("stage1", stage1_config(get_synth(tmp_path_factory), out, max_steps=2))
        _CACHE["stage1"] = out / "model"
    return _CACHE["stage1"]
