"""Command line: ``python -m m2d2_embed.train stage1|stage2|finetune|probe|captions|synth ...``.

Training stages take a JSON config (``--config``; defaults: ``--print-config``) and ``--set KEY=VALUE``
overrides, and run single-process or under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

STAGES = ("stage1", "stage2", "finetune")


def fatal(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def tiny_configs(out: Path) -> dict[str, dict]:
    """Configs that train in seconds on a CPU with the synthetic dataset (a 2-block, 64-wide ViT)."""
    model = {
        "encoder": {"input_size": [80, 96], "embed_dim": 64, "depth": 2, "num_heads": 4},
        "audio_head": {"dim": 64, "out_dim": 64},
    }
    train = {"batch_size": 8, "epochs": 3, "amp": "none", "num_workers": 0, "save_every": 6, "log_every": 6}
    text = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "max_position": 128}
    runs = out / "runs"
    return {
        "stage1": {
            "model": model,
            "train": {**train, "out_dir": str(runs / "stage1")},
            "optim": {"lr": 1e-3, "warmup_epochs": 1},
            "data": {"csv": str(out / "train.csv"), "captions": str(out / "captions_train.npy")},
            "m2d": {"predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2},
        },
        "stage2": {
            "init_from": str(runs / "stage1" / "model"),
            "text_init": None,
            "model": {**model, "text": text},
            "train": {**train, "out_dir": str(runs / "stage2")},
            "optim": {"lr": 5e-4, "warmup_epochs": 1},
            "data": {"csv": str(out / "train.csv")},
        },
        "finetune": {
            "init_from": str(runs / "stage1" / "model"),
            "val_csv": str(out / "val.csv"),
            "train": {**train, "out_dir": str(runs / "finetune")},
            "optim": {"lr": 1e-3, "warmup_epochs": 1},
            "data": {"csv": str(out / "train.csv")},
        },
    }


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None, *, prog: str = "python -m m2d2_embed.train") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, what in (
        ("stage1", "M2D + CLAP pre-training against caption embeddings"),
        ("stage2", "CLAP text side: BERT + audio head on a frozen encoder"),
        ("finetune", "fine-tune the encoder with a linear head on labelled clips"),
    ):
        s = sub.add_parser(name, help=what, description=what)
        s.add_argument("--config", type=Path, help="JSON config (missing keys take the defaults)")
        s.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one setting, e.g. --set train.batch_size=16 (value parsed as JSON)",
        )
        s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s = sub.add_parser(
        "probe",
        help="linear probe on the clip embeddings of a trained model (EVAR's linear evaluation protocol)",
        description="Standardised clip embeddings, one linear layer, Adam, early stopping on the validation "
        "score: upstream EVAR's lineareval.py with its M2D settings as defaults.",
    )
    s.add_argument("--model", required=True, help="a model directory or .safetensors (what the stages export)")
    s.add_argument("--train", required=True, type=Path, help="CSV with file,label")
    s.add_argument("--val", type=Path, help="validation CSV (default: 10%% of --train held out)")
    s.add_argument("--test", type=Path, help="test CSV")
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=42, help="EVAR's default seed (default: %(default)s)")
    s.add_argument(
        "--lr", type=float, default=3e-5, help="Adam learning rate; EVAR's lr_lineareval for M2D (default: %(default)s)"
    )
    s.add_argument("--epochs", type=int, default=200, help="at most this many epochs (default: %(default)s)")
    s.add_argument(
        "--patience", type=int, default=20, help="early stopping: epochs without a new best (default: %(default)s)"
    )
    s.add_argument("--batch-size", type=int, default=200, help="mini-batch size (default: %(default)s)")
    s.add_argument("--weight-decay", type=float, default=1e-8, help="Adam L2 penalty (default: %(default)s)")
    s.add_argument("--no-standardise", action="store_true", help="feed raw embeddings (EVAR: --standard_scaler False)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="held out of --train when --val is not given")
    s = sub.add_parser(
        "captions",
        help="caption embeddings for stage 1 (an LLM sentence embedder over the CSV's captions)",
        description="Embed the 'caption' column of CSV (several captions per row separated by '|') into an "
        "[N, K, E] .npy for data.captions. Defaults follow upstream M2D-CLAP (GTE-base through transformers, "
        "mean pooling, 512 tokens). Resumable: rerun the same command after an interruption.",
    )
    s.add_argument("csv", type=Path, help="CSV with file and caption columns")
    s.add_argument("--embedder", default="hf://thenlper/gte-base", help="hf://<repo> or a local model folder")
    s.add_argument("-o", "--out", required=True, type=Path, help="output .npy")
    s.add_argument("--backend", default="transformers", choices=["transformers", "sentence-transformers"])
    s.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="transformers backend only")
    s.add_argument("--max-length", type=int, default=512, help="tokens per caption (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="cpu")
    s = sub.add_parser("synth", help="write a tiny synthetic dataset and CPU-sized configs for every stage")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--n-train", type=int, default=48)
    s.add_argument("--n-val", type=int, default=16)
    s.add_argument("--npy", action="store_true", help="list precomputed log-mel .npy files instead of .wav")
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _setup_logging()

    if args.cmd == "synth":
        from .data import make_synthetic_dataset

        ds = make_synthetic_dataset(
            args.out, args.n_train, args.n_val, seed=args.seed, fmt="npy" if args.npy else "wav"
        )
        for name, cfg in tiny_configs(args.out).items():
            (args.out / f"{name}.json").write_text(json.dumps(cfg, indent=2))
        print(f"wrote {ds.train_csv.name}, {ds.val_csv.name}, captions and stage configs in {args.out}")
        return 0

    if args.cmd == "captions":
        if not args.csv.exists():
            fatal(f"file list not found: {args.csv}")
        from .captions import captions_csv

        try:
            out = captions_csv(
                args.csv,
                args.embedder,
                args.out,
                backend=args.backend,
                device=args.device,
                batch_size=args.batch_size,
                max_length=args.max_length,
                pooling=args.pooling,
            )
        except (ValueError, ImportError) as e:
            fatal(str(e))
        print(f"wrote {out}")
        return 0

    if args.cmd == "probe":
        for f in (args.train, args.val, args.test):
            if f is not None and not f.exists():
                fatal(f"file list not found: {f}")
        from .downstream import probe_csv

        res = probe_csv(
            args.model,
            args.train,
            args.val,
            args.test,
            device=args.device,
            seed=args.seed,
            lr=args.lr,
            max_epochs=args.epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            standardise=not args.no_standardise,
            val_fraction=args.val_fraction,
        )
        print(
            json.dumps(
                {
                    "metric": res.metric,
                    "val": res.val_score,
                    "test": res.test_score,
                    "classes": len(res.classes),
                    "best_epoch": res.best_epoch,
                }
            )
        )
        return 0

    from .config import load_config, to_dict

    try:
        cfg = load_config(args.cmd, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        fatal(str(e))
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from . import dist
    from .stages import run

    try:
        trainer = run(args.cmd, cfg)
        if trainer.info.is_main:
            print(f"done: {trainer.step} steps; checkpoint and model in {trainer.out_dir}")
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
