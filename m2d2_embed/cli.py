"""The ``m2d2-embed`` command line: embed files (on one device, several, or as one shard of a job array), merge
shards, tag sounds and events, zero-shot labels, text embeddings, convert/download models, and a hand-off to the
training command line. Storage lives in :mod:`m2d2_embed.outputs`, embedding in :mod:`m2d2_embed.files`.

Exit codes: 0 success; 1 some files failed, or an error while working; 2 bad usage or input (nothing was done);
130 interrupted (a directory output keeps what was finished: run the same command again to complete it);
141 the reader of the output went away (``| head``), quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from . import __version__, files, loader, outputs
from .convert import convert
from .model import detect_events
from .outputs import OutputDir, OutputInUseError
from .registry import DEFAULT_MODEL

PROG = "m2d2-embed"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 130, 141
DEFAULT_TEMPLATE = "{label} can be heard"  # the same default as M2D2.zero_shot
DEFAULT_EVENT_THRESHOLD = 0.5  # tag --frames: a frame holds a class when its sigmoid score reaches this
WORKER_GRACE_SECONDS = 10.0  # --devices: time the workers get to save their work after Ctrl-C
# options of the --devices parent that its workers do not get (each gets its own --device and --shard)
PARENT_ONLY = {
    "--devices": True,
    "--device": True,
    "--shard": True,
    "--overwrite": False,
    "--no-progress": False,
    "--no-merge": False,
}  # option -> takes a value

log = logging.getLogger(PROG)


class _Fatal(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def fatal(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Stop the command: ``main`` prints ``m2d2-embed: error: <message>`` to stderr and returns ``code``."""
    raise _Fatal(message, code)


def _progress(args: argparse.Namespace) -> bool:
    if args.no_progress:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str):
    """argparse type: an integer >= ``minimum``, with an error naming what was expected."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


def _devices(s: str) -> list[str]:
    items = [d.strip() for d in s.split(",")]
    if not items or any(not _DEVICE.match(d) for d in items):
        raise argparse.ArgumentTypeError(f"expected devices such as cuda:0,cuda:1 (or cpu,cpu), got {s!r}")
    return items


def _shard(s: str) -> tuple[int, int]:
    i, sep, n = s.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {s!r}")
    return int(i), int(n)


def _parser(sub: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, allow_abbrev=False, **kw)  # no abbreviations: worker command lines stay exact


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")

    model = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = model.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME_OR_PATH",
        help=f"registry name (default {DEFAULT_MODEL}; see `{PROG} list`), upstream .pth, converted "
        ".safetensors file or directory, http(s):// or hf:// URL",
    )
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16", "int8", "fp8", "fp8-all"],
        help="compute dtype (default: bf16 on CUDA, fp32 on CPU; int8: dynamic quantization, CPU; fp8: float8 "
        "Linear layers in the later half of the encoder's blocks, fp8-all: in every block (faster, less "
        "accurate); CUDA GPUs of compute capability 8.9+)",
    )
    g.add_argument(
        "--backend",
        default=None,
        choices=["torch", "onnxruntime", "openvino"],
        help="who runs the audio encoder (default torch); onnxruntime/openvino: CPU, fp32, exported to ONNX "
        "once per model and cached (extras onnx/openvino); can pay on a CPU busy with other work",
    )
    g.add_argument("--cache-dir", default=None, help="model cache (default $M2D2_EMBED_CACHE or ~/.cache/m2d2_embed)")
    g.add_argument("--offline", action="store_true", help="use the cache only; never download")

    inputs = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = inputs.add_argument_group("inputs")
    g.add_argument(
        "paths", nargs="+", metavar="PATH", help="audio files, folders, or quoted wildcards such as 'data/*.wav'"
    )
    g.add_argument("--recursive", "-r", action="store_true", help="search sub-folders of folders")
    g.add_argument(
        "--glob",
        default=None,
        metavar="PATTERN",
        help="which files to take from folders, e.g. '*.wav' (default: the audio suffixes .wav .flac "
        ".ogg .opus .mp3 .aiff ...; others are counted as skipped, and listed with -v)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive,
        default=None,
        metavar="N",
        help="10-s chunks per batch (default 32 on CPU, 256 on CUDA)",
    )
    g.add_argument(
        "--num-workers",
        type=_non_negative,
        default=None,
        metavar="N",
        help="decoding processes (default: up to 8, two cores left free; 0 decodes in the main process)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the audio encoder: faster on a GPU for long jobs, after a one-off warm-up "
        "of tens of seconds (compiled once per micro-batch size, not per batch); not with "
        "--dtype int8",
    )

    p = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Audio embeddings from NTT's M2D2 "
        "(M2D-CLAP 2025): frame, clip and text-aligned (CLAP) embeddings of audio files.",
        epilog=f"Run `{PROG} COMMAND --help` for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = _parser(
        sub,
        "embed",
        parents=[common, inputs, model],
        help="embed audio files into an npz/npy/parquet file or a resumable directory",
        description="Embed audio files. A file output (-o out.npz|.npy|.parquet) is written at the end, "
        "atomically; a directory output (-o DIR or DIR/) is written as work completes, and an interrupted "
        "or extended run resumes it (files already embedded with the same model and settings are "
        "skipped, however their path is spelled). One run at a time writes into a directory: a second "
        "is refused. Failed files are listed in a failures.jsonl sidecar and make the exit code 1.",
        epilog=f"example: {PROG} embed recordings/ -r -o emb.npz --level clip",
    )
    e.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output file (.npz, .npy + .json sidecar, .parquet) or directory (no suffix, or ending in /)",
    )
    e.add_argument(
        "--level",
        default="clip",
        choices=["clip", "frame", "clap"],
        help="clip: one vector per file (3840-d); frame: one per 160 ms step with timestamps (3840-d); "
        "clap: the audio side of the audio-text space (768-d). Default clip",
    )
    e.add_argument(
        "--reduce",
        default="none",
        choices=["none", "mean"],
        help="clip/frame: none stacks the 5 frequency patches (3840-d), mean averages them (768-d)",
    )
    e.add_argument("--normalize", action="store_true", help="L2-normalise each embedding vector")
    _output_options(e)
    e.add_argument("--strict", action="store_true", help="stop at the first file that fails")
    g = e.add_argument_group("several devices or machines")
    g.add_argument(
        "--devices",
        type=_devices,
        default=None,
        metavar="DEV,DEV,...",
        help="one worker process per device (cuda:0,cuda:1,...; cpu,cpu works too), each embedding its "
        "share of the sorted file list; their output is merged into OUT at the end. Resumable: "
        "run the same command again after an interruption",
    )
    g.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="embed only shard I of N (0-based: files I, I+N, I+2N, ... of the sorted list), for job "
        "arrays (SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT). Each shard writes "
        f"under OUT/{outputs.STAGING}/ and is merged into OUT when complete (a file output once all "
        "N are)",
    )
    g.add_argument(
        "--no-merge",
        action="store_true",
        help=f"with --shard: leave the finished shard unmerged; run `{PROG} merge OUT` afterwards",
    )
    e.set_defaults(func=cmd_embed)

    m = _parser(
        sub,
        "merge",
        parents=[common],
        help="merge the shards of --shard/--devices workers into OUT",
        description="Merge complete shards written by `embed --shard I/N` (or --devices) into the output. "
        "A directory output takes each complete shard (files already in it are not duplicated); a file "
        "output is written once all N shards are complete. Incomplete shards are listed (exit code 1): "
        "finish them by running their `embed --shard I/N` again.",
        epilog=f"example: {PROG} merge emb/",
    )
    m.add_argument("output", metavar="OUT", help="the -o of the embed command (directory or .npz/.npy/.parquet)")
    m.set_defaults(func=cmd_merge)

    tr = _parser(
        sub,
        "train",
        add_help=False,
        help=f"train or fine-tune a model (stage1, stage2, finetune, probe, ...): `{PROG} train --help`",
        description="Hands off to the training command line (needs the training dependencies).",
    )
    tr.add_argument("train_args", nargs=argparse.REMAINDER, metavar="...")
    tr.set_defaults(func=cmd_train)

    t = _parser(
        sub,
        "tag",
        parents=[common, inputs, model],
        help="tag sounds (AudioSet classes) and find events",
        description="Audio tagging with a model that has a classifier head (e.g. an AudioSet fine-tuned "
        "one): the top classes of each file as a table, or with --frames the sound events (onset, offset, "
        "label, score) found by thresholding per-frame scores and merging adjacent frames. -o also writes "
        "the scores (level tags, or frame_tags with --frames) in the formats of `embed`.",
        epilog=f"example: {PROG} tag clips/ --model path/to/as2m_finetuned.pth --frames --threshold 0.3",
    )
    t.add_argument("--top-k", type=_positive, default=5, metavar="K", help="classes shown per file (default 5)")
    t.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="show only classes scoring at least T; with --frames, the event threshold (default "
        f"{DEFAULT_EVENT_THRESHOLD})",
    )
    t.add_argument("--frames", action="store_true", help="sound event detection: segments from per-frame scores")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.add_argument("-o", "--output", default=None, metavar="OUT", help="also write the scores, as `embed -o` does")
    _output_options(t)
    t.set_defaults(func=cmd_tag)

    z = _parser(
        sub,
        "zero-shot",
        parents=[common, inputs, model],
        help="score audio files against text labels",
        description="Zero-shot classification: print the top labels of each file as a table.",
        epilog=f"example: {PROG} zero-shot clips/ --labels dog,rain,speech --top-k 2",
    )
    z.add_argument(
        "--labels",
        required=True,
        action="append",
        metavar="A,B,C",
        help="comma-separated labels (repeat the option for labels that contain commas)",
    )
    z.add_argument(
        "--template",
        default=DEFAULT_TEMPLATE,
        help=f"prompt with {{label}} (default {DEFAULT_TEMPLATE!r}, as upstream)",
    )
    z.add_argument("--top-k", type=_positive, default=3, metavar="K", help="labels shown per file (default 3)")
    z.add_argument(
        "--scores",
        default="softmax",
        choices=["softmax", "cosine"],
        help="softmax: probabilities over the labels (default); cosine: raw similarities",
    )
    z.add_argument("--temperature", type=float, default=0.01, help="softmax temperature (default 0.01)")
    z.add_argument("--json", action="store_true", help="print JSON (every label's score) instead of a table")
    z.set_defaults(func=cmd_zero_shot)

    t = _parser(
        sub,
        "text",
        parents=[common, model],
        help="embed texts into the audio-text space",
        description="Text embeddings (CLAP text side) saved as .npy (+ .json sidecar with the texts) or .npz.",
        epilog=f'example: {PROG} text "a dog barks" "rain on a roof" -o text.npy',
    )
    t.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    t.add_argument(
        "--from-file", dest="text_file", default=None, metavar="FILE", help="also read texts from FILE, one per line"
    )
    t.add_argument("-o", "--output", required=True, metavar="OUT", help="output .npy or .npz")
    t.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    t.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="texts per batch (default 64)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t.set_defaults(func=cmd_text)

    c = _parser(
        sub,
        "convert",
        parents=[common],
        help="convert an upstream .pth into the package's format",
        description="Convert an upstream M2D/M2D-CLAP .pth (or re-save a converted model) into "
        "model.safetensors + config.json (DST a directory) or one .safetensors file.",
    )
    c.add_argument("src", metavar="SRC", help="upstream .pth, .safetensors or converted directory")
    c.add_argument("dst", metavar="DST", help="output directory, or a path ending in .safetensors")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    c.set_defaults(func=cmd_convert)

    d = _parser(
        sub,
        "download",
        parents=[common],
        help="download, verify and convert a model into the cache",
        description="Download a registry model (or an http(s):// / hf:// URL), check its SHA-256 and "
        "convert it into the cache; prints the converted path.",
    )
    d.add_argument("name", metavar="NAME_OR_URL", help=f"registry name (e.g. {DEFAULT_MODEL}) or URL")
    d.add_argument("--cache-dir", default=None, help="model cache (default $M2D2_EMBED_CACHE or ~/.cache/m2d2_embed)")
    d.add_argument("--keep-source", action="store_true", help="keep the downloaded archive/checkpoint after converting")
    d.add_argument("--no-progress", action="store_true", help="no download progress bar")
    d.set_defaults(func=cmd_download)

    li = _parser(
        sub,
        "list",
        parents=[common],
        help="list the registry models and which are cached",
        description="List the models `--model` accepts by name, their size and whether they are in the cache.",
    )
    li.add_argument("--cache-dir", default=None, help="model cache to look in")
    li.add_argument("--json", action="store_true", help="print JSON")
    li.set_defaults(func=cmd_list)

    x = _parser(
        sub,
        "export",
        parents=[common],
        help="export the encoder and CLAP head as ONNX for other runtimes",
        description="Write MODEL's audio encoder (and CLAP audio head) as ONNX, with dynamic batch and "
        "chunk width, plus m2d2_export.json (front-end settings, norm stats, tensor layouts). The "
        "weights stay NTT's: not for redistribution. Needs `pip install 'm2d2-embed[onnx]'`.",
    )
    x.add_argument("name", metavar="MODEL", help="registry name, checkpoint path, converted directory or URL")
    x.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    x.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    x.add_argument("--no-heads", action="store_true", help="export the encoder only")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export in DIR")
    x.add_argument("--cache-dir", default=None, help="model cache (default $M2D2_EMBED_CACHE or ~/.cache/m2d2_embed)")
    x.add_argument("--offline", action="store_true", help="use the cache only; never download")
    x.set_defaults(func=cmd_export)

    ca = _parser(
        sub,
        "cache",
        parents=[common],
        help="show where the model cache is and what it holds",
        description="Show the model cache folder, its entries and sizes, and how to clear it.",
    )
    ca.add_argument("--cache-dir", default=None, help="model cache to inspect")
    ca.add_argument("--json", action="store_true", help="print JSON")
    ca.add_argument(
        "--clear",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="remove entry NAME (a model name from `list`, or a folder shown here), or everything",
    )
    ca.add_argument(
        "--verify",
        action="store_true",
        help="hash every converted model against the SHA-256 recorded at conversion; exit 1 if damaged",
    )
    ca.set_defaults(func=cmd_cache)
    return p


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default=None,
        choices=list(outputs.FORMATS),
        help="output format (default: from the suffix of OUT; npz for a directory)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file, or start a directory output over"
    )
    p.add_argument(
        "--shard-size",
        type=_positive,
        default=1000,
        metavar="N",
        help="files per part of a directory output (default 1000): at most this much work is redone after a crash",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "train":  # everything after `train` belongs to the training command line
            args.train_args = argv[argv.index("train") + 1 :]
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.argv = argv
    verbose = getattr(args, "verbose", 0)
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    if verbose == 0:  # skipped files are listed once, at the end
        logging.getLogger("m2d2_embed.files").setLevel(logging.ERROR)
    code, message = EXIT_OK, None
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: stop quietly; nothing more can be printed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except _Fatal as e:
        code, message = e.code, str(e)
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, OutputInUseError) as e:
        code, message = EXIT_USAGE, str(e)  # the library's messages say what was wrong and what to do
    except (OSError, RuntimeError, MemoryError) as e:
        if verbose:
            log.exception("failed")
        code, message = EXIT_FAILED, str(e) or type(e).__name__
    if message is not None:
        print(f"{PROG}: error: {message}" if code != EXIT_INTERRUPTED else f"{PROG}: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------------


def _collect(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(files to embed, files of folders skipped for their suffix); the skipped are listed with -v."""
    skipped: list[str] = []
    found = files.collect_files(args.paths, recursive=args.recursive, glob=args.glob, skipped=skipped)
    files.startup_mark("files listed")
    for p in sorted(skipped):
        log.info("skipped (not an audio format; see --glob): %s", p)
    return found, skipped


def _load_model(args: argparse.Namespace):
    compile_ = bool(getattr(args, "compile", False))  # embed, tag and zero-shot have --compile, text does not
    if compile_ and args.dtype == "int8":
        fatal("--compile does not work with --dtype int8 (dynamically quantized layers); drop one of them")
    files.startup_mark("model loading")
    try:
        model = loader.load(
            args.model,
            device=args.device,
            dtype=args.dtype,
            cache_dir=args.cache_dir,
            offline=True if args.offline else None,
            compile=compile_,
            backend=getattr(args, "backend", None),
        )
    except (ValueError, ImportError, OSError, RuntimeError, NotImplementedError) as e:
        fatal(f"cannot load model {args.model!r}: {e}", EXIT_FAILED)
    files.startup_mark("model loaded")
    return model


def _todo(paths: list[str], d: OutputDir | None, also_done: set[str] | None = None) -> list[str]:
    """``paths`` less those done in ``d`` (its unfinished parts cleared first) or in ``also_done``."""
    done = set(also_done or ())
    if d is not None:
        d.clean_partial()
        done |= d.done_keys()
    return [p for p in paths if outputs.resume_key(p) not in done] if done else list(paths)


def _start_decoding(args: argparse.Namespace, todo: list[str]) -> files.Prefetch | None:
    """Probe the files and start decoding them before the model loads, so that both overlap (the workers decode
    while the weights are read and the device starts): needs the model's config without its weights, so None
    when it is not at hand yet (a download or a conversion comes first) or there is nothing to embed."""
    if not todo:
        return None
    config = loader.peek_config(args.model, cache_dir=args.cache_dir)
    if config is None:
        return None
    try:
        device = loader.resolve_device(args.device)
    except (ValueError, RuntimeError):  # loading the model reports it
        return None
    return files.start_decoding(todo, config, device, batch_size=args.batch_size, num_workers=args.num_workers)


def _check_file_output(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        fatal(
            f"the directory of the output {out} does not exist ({out.parent}); create it first (mkdir -p {out.parent})"
        )
    if out.exists() and not overwrite:
        fatal(f"output {out} exists; pass --overwrite to replace it")


def _format_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _sigterm_as_interrupt():
    """Treat SIGTERM (e.g. a batch scheduler's stop) like Ctrl-C so finished work is saved."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------------------------------------
# embed (and tag -o): one run into a file or an output directory
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What one embedding run did."""

    code: int
    completed: bool  # every file was tried (not interrupted)
    embedded: int = 0
    skipped: int = 0
    failed: int = 0
    results: list[files.FileResult] = field(default_factory=list)  # kept when asked, in input order
    failures: list[outputs.FileFailure] = field(default_factory=list)


def _run(
    args: argparse.Namespace,
    model: Any,
    level: str,
    paths: list[str],
    out: Path | None,
    fmt: str,
    d: OutputDir | None,
    *,
    unsupported: int = 0,
    also_done: set[str] | None = None,
    label: str = PROG,
    keep: bool = False,
    reduce: str = "none",
    normalize: bool = False,
    summary: Any = None,
    todo: list[str] | None = None,
    prefetch: files.Prefetch | None = None,
) -> _Run:
    """Embed ``paths`` at ``level`` (less those done in ``d`` or ``also_done``) into a file ``out`` (``d`` None)
    or the directory ``d``; print the summary line to ``summary`` (default stdout; ``False``: not at all).
    ``todo``: those files left to do, when already known (``_todo``); ``prefetch``: them being decoded."""
    todo = _todo(paths, d, also_done) if todo is None else todo
    meta = {**files.embedding_metadata(model, level, reduce, normalize), "format": fmt, "model_source": str(args.model)}
    if d is not None:
        d.check(meta)  # the manifest is written with the first part: a run that fails at once leaves nothing
    writer = outputs.ResultWriter(
        d if d is not None else out,
        fmt,
        meta,
        level,
        keep=keep,
        part_size=getattr(args, "shard_size", 1000),
        expected=len(todo),
    )
    t0 = time.perf_counter()
    restore = _sigterm_as_interrupt()
    try:
        for i, r in files.iter_file_embeddings(
            model,
            todo,
            level,
            reduce=reduce,
            normalize=normalize,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=_progress(args),
            strict=getattr(args, "strict", False),
            prefetch=prefetch,
        ):
            writer.add(i, r)
    except files.AudioFileError as e:
        writer.add(-1, outputs.FileFailure(e.path, e.reason))
        writer.save(complete=False)
        fatal(f"{e} (--strict)", EXIT_FAILED)
    except KeyboardInterrupt:
        writer.save(complete=False)
        if d is None:
            print(
                f"{label}: interrupted after {writer.embedded} of {len(todo)} files; nothing was written"
                f"{f' to {out}' if out else ''} (a directory output keeps finished work: -o DIR)",
                file=sys.stderr,
            )
        else:
            print(
                f"{label}: interrupted: {writer.embedded + len(paths) - len(todo)} of {len(paths)} files are saved "
                f"in {d.root}; run the same command again to finish",
                file=sys.stderr,
            )
        return _Run(EXIT_INTERRUPTED, False)
    finally:
        restore()
    side = writer.save()
    elapsed = time.perf_counter() - t0
    files.startup_mark("output written")
    run = _Run(
        EXIT_OK, True, writer.embedded, len(paths) - len(todo), len(writer.failures), writer.results(), writer.failures
    )
    rate = writer.audio_seconds / elapsed if elapsed > 0 else math.inf
    other = (
        f"; {_count(unsupported, 'other file')} skipped: unsupported format, see --glob (-v lists them)"
        if unsupported
        else ""
    )
    if summary is not False:
        print(
            f"{label}: {_count(run.embedded, 'file')} embedded, {run.skipped} skipped (already done), "
            f"{run.failed} failed{other}; {_format_seconds(writer.audio_seconds)} of audio in {elapsed:.1f} s "
            f"({rate:.1f} audio-s/s){f' -> {out}' if out else ''}",
            file=summary or sys.stdout,
            flush=True,
        )
    for w in writer.warnings:
        print(f"{label}: warning: {w.path}: {w.reason}{f' (listed in {side})' if side else ''}", file=sys.stderr)
    if run.failures:
        print(f"{label}: {_count(run.failed, 'file')} failed{f'; listed in {side}' if side else ''}", file=sys.stderr)
        for f in run.failures[:10]:
            print(f"  {f.path}: {f.reason}", file=sys.stderr)
        if run.failed > 10:
            print(f"  ... and {run.failed - 10} more", file=sys.stderr)
        run.code = EXIT_FAILED
    return run


def _wanted(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """The resume keys known before the model loads."""
    return {
        "level": args.level,
        "reduce": args.reduce if args.level != "clap" else "none",
        "normalize": bool(args.normalize),
        "format": fmt,
    }


def cmd_embed(args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = outputs.output_format(args.output, args.format)
    is_file = fmt is not None
    fmt = fmt or args.format or "npz"
    outputs.get_format(fmt).check()
    if args.level == "clap" and args.reduce != "none":
        fatal("--reduce applies to the clip and frame levels only")
    if args.devices is not None and args.shard is not None:
        fatal(
            "--devices and --shard do not go together: --devices runs all shards here; --shard i/n runs one "
            "(for a scheduler that starts the others)"
        )
    if args.devices is not None and args.device is not None:
        fatal("give --device (one device) or --devices (several), not both")
    if args.no_merge and args.shard is None:
        fatal("--no-merge applies to --shard i/n only")
    if args.devices is not None and len(args.devices) > 1:
        return _embed_on_devices(args, out, fmt, is_file, args.devices)
    if args.devices is not None:
        args.device = args.devices[0]
    if args.shard is not None:
        return _embed_shard(args, out, fmt, is_file, *args.shard)
    if is_file:
        _check_file_output(out, args.overwrite)
    with (
        contextlib.nullcontext()
        if is_file
        else OutputDir(out, fmt).open(_wanted(args, fmt), overwrite=args.overwrite) as d
    ):
        paths, unsupported = _collect(args)
        todo = _todo(paths, d)
        prefetch = _start_decoding(args, todo)  # decoding starts now, while the model loads
        model = _load_model(args)
        opts = {"unsupported": len(unsupported), "reduce": args.reduce, "normalize": args.normalize}
        return _run(args, model, args.level, paths, out, fmt, d, todo=todo, prefetch=prefetch, **opts).code


# ---------------------------------------------------------------------------------------------------
# embed on several devices (--devices) or as one shard of a split (--shard i/n); merge
# (the layout of shards and how they merge: see m2d2_embed.outputs)
# ---------------------------------------------------------------------------------------------------


def _embed_shard(args: argparse.Namespace, out: Path, fmt: str, is_file: bool, i: int, n: int) -> int:
    """One worker of a split: embed files i, i + n, ... of the sorted list into its shard directory, mark it
    complete, then merge (unless --no-merge)."""
    if args.overwrite:
        fatal(
            "--overwrite does not go with --shard: workers of one job cannot clear each other's output; "
            f"delete {out} (and {outputs.staging_dir(out, is_file)}) to start over"
        )
    final: OutputDir | None = None
    if is_file:
        _check_file_output(out, True)
        if out.exists():
            fatal(f"output {out} exists (all shards were merged into it); delete it to embed again")
    else:  # checked, not locked: the workers of a job share it (the merge locks it while it writes)
        final = OutputDir(out, fmt).open(_wanted(args, fmt), lock=False)
    paths, unsupported = _collect(args)
    mine = sorted(paths)[i::n]
    shard = outputs.shard_dir(out, is_file, i, n)
    shard.parent.mkdir(exist_ok=True)
    label = f"{PROG} [shard {i}/{n}]"
    with OutputDir(shard, fmt).open(_wanted(args, fmt)) as d:
        (shard / outputs.COMPLETE).unlink(missing_ok=True)
        todo = _todo(mine, d, final.done_keys() if final is not None else None)
        prefetch = _start_decoding(args, todo)  # decoding starts now, while the model loads
        model = _load_model(args)
        if final is not None:  # the final manifest now, so read_embeddings(OUT) works while shards run
            final.start(
                {
                    **files.embedding_metadata(model, args.level, args.reduce, args.normalize),
                    "format": fmt,
                    "model_source": str(args.model),
                }
            )
        run = _run(
            args,
            model,
            args.level,
            mine,
            shard,
            fmt,
            d,
            unsupported=len(unsupported),
            label=label,
            todo=todo,
            prefetch=prefetch,
            reduce=args.reduce,
            normalize=args.normalize,
        )
        if not run.completed:
            return run.code
        outputs.mark_complete(
            shard,
            {
                "shard": i,
                "of": n,
                "files": len(mine),
                "embedded": run.embedded,
                "skipped": run.skipped,
                "failed": run.failed,
            },
        )
    if not args.no_merge:
        print(f"{label}: {outputs.merge_shards(out, n).describe(out)}", flush=True)
    return run.code


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.output)
    root = outputs.staging_dir(out, outputs.output_format(args.output) is not None)
    if not outputs.shard_dirs(root):
        print(f"{PROG}: no shards to merge in {root}")
        return EXIT_OK
    report = outputs.merge_shards(out)
    print(f"{PROG}: {report.describe(out)}")
    if report.waiting:
        print(
            f"{PROG}: shard(s) {', '.join(report.waiting)} are not complete: run the same `{PROG} embed` command "
            "with --shard i/n for each to finish it (a shard resumes where it stopped), then merge again",
            file=sys.stderr,
        )
    return EXIT_FAILED if report.waiting or report.busy else EXIT_OK


def worker_argv(
    argv: Sequence[str], i: int, n: int, device: str, progress: bool, num_workers: int | None = None
) -> list[str]:
    """The `embed` command line of worker ``i`` of ``n``: the parent's own command line (``argv``, from
    ``embed`` on) less the parent-only options (:data:`PARENT_ONLY`), plus one device and one shard."""
    rest, kept, k = list(argv[argv.index("embed") + 1 :]), [], 0
    while k < len(rest):
        token = rest[k]
        if token == "--":
            kept += rest[k:]
            break
        name = token.split("=", 1)[0]
        if name in PARENT_ONLY:
            k += 2 if PARENT_ONLY[name] and "=" not in token else 1
            continue
        kept.append(token)
        k += 1
    mine = ["--shard", f"{i}/{n}", "--device", device, "--no-merge"] + ([] if progress else ["--no-progress"])
    mine += [] if num_workers is None else [f"--num-workers={num_workers}"]
    return ["embed", *mine, *kept]


def _embed_on_devices(args: argparse.Namespace, out: Path, fmt: str, is_file: bool, devices: list[str]) -> int:
    """Run one `embed --shard i/n` worker process per device, wait for all, then merge."""
    n = len(devices)
    if any(d.startswith("cuda") for d in devices):
        count = torch.cuda.device_count()
        bad = [d for d in devices if d.startswith("cuda") and (count == 0 or int(d.partition(":")[2] or 0) >= count)]
        if bad:
            fatal(f"--devices names {', '.join(bad)} but this machine has {count} CUDA device(s)")
    root = outputs.staging_dir(out, is_file)
    held: OutputDir | None = None
    if is_file:
        _check_file_output(out, args.overwrite)
        if args.overwrite:  # the workers refuse an existing file output
            out.unlink(missing_ok=True)
            outputs.failures_path(out).unlink(missing_ok=True)
            shutil.rmtree(root, ignore_errors=True)
    else:  # held for the whole job: no other run writes into OUT meanwhile (the workers write their shards)
        held = OutputDir(out, fmt).open(_wanted(args, fmt), overwrite=args.overwrite)
    try:
        stale = [f"{i}/{k}" for i, k, _ in outputs.shard_dirs(root) if k != n]
        if stale:
            fatal(
                f"{root} holds unfinished shards of a split into another number of workers ({', '.join(stale)});"
                f" finish them (same command with --devices of that many) or delete them, or run `{PROG} merge "
                f"{out}`"
            )
        _collect(args)  # fail on bad inputs here, not in every worker
        return _launch_workers(args, out, devices)
    finally:
        if held is not None:
            held.close()


def _launch_workers(args: argparse.Namespace, out: Path, devices: list[str]) -> int:
    n, cpus = len(devices), os.cpu_count() or 1
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and all(d == "cpu" for d in devices):
        env["OMP_NUM_THREADS"] = str(max(1, cpus // n))  # n CPU workers share the cores
    decoders = None if args.num_workers is not None else max(0, min(8, (cpus - n) // n))  # per worker
    progress = _progress(args)
    procs: list[subprocess.Popen] = []

    def forward_sigterm(signum, frame):  # a scheduler stopping the job: each worker saves what it finished
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        raise KeyboardInterrupt

    try:
        old_handler = signal.signal(signal.SIGTERM, forward_sigterm)
    except ValueError:  # not the main thread
        old_handler = None
    interrupted = False
    try:
        for i, dev in enumerate(devices):
            argv = worker_argv(args.argv, i, n, dev, progress and i == 0, decoders)
            log.info("worker %d/%d on %s: %s", i, n, dev, " ".join(argv))
            procs.append(subprocess.Popen([sys.executable, "-m", "m2d2_embed", *argv], env=env))
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C reaches the workers too (one process group) and they are saving: give them time, then pass
        # the interrupt on to any that did not get it
        interrupted = True
        deadline = time.monotonic() + WORKER_GRACE_SECONDS
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    report = outputs.merge_shards(out, n)
    if report.merged or not interrupted:
        print(f"{PROG}: {report.describe(out)}")
    if interrupted or EXIT_INTERRUPTED in codes:
        print(f"{PROG}: interrupted; finished work is kept: run the same command again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report.waiting:
        print(
            f"{PROG}: worker(s) for shard(s) {', '.join(report.waiting)} did not finish (exit codes "
            f"{codes}); run the same command again to finish",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return max(codes)


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .train.__main__ import main as train_main  # the training stack (its own dependencies) loads only here

    try:
        return int(train_main(list(args.train_args), prog=f"{PROG} train") or 0)
    except SystemExit as e:  # --help, usage errors
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)


# ---------------------------------------------------------------------------------------------------
# tag, zero-shot
# ---------------------------------------------------------------------------------------------------


def cmd_tag(args: argparse.Namespace) -> int:
    level = "frame_tags" if args.frames else "tags"
    d: OutputDir | None = None
    out = Path(args.output) if args.output else None
    fmt = "npz"
    if out is not None:
        found = outputs.output_format(args.output, args.format)
        fmt = found or args.format or "npz"
        outputs.get_format(fmt).check()
        if found is not None:
            _check_file_output(out, args.overwrite)
        else:
            d = OutputDir(out, fmt).open({"level": level, "format": fmt}, overwrite=args.overwrite)
    try:
        paths, unsupported = _collect(args)
        model = _load_model(args)
        labels = list(model.labels)
        run = _run(args, model, level, paths, out, fmt, d, unsupported=len(unsupported), keep=True, summary=sys.stderr)
    finally:
        if d is not None:
            d.close()
    if not run.completed:
        return run.code
    if args.frames:
        threshold = DEFAULT_EVENT_THRESHOLD if args.threshold is None else args.threshold
        hop = model.frame_hop_seconds
        events = {r.path: detect_events(r.embedding, r.timestamps, labels, threshold, hop) for r in run.results}
        if args.json:
            print(
                json.dumps(
                    {
                        "threshold": threshold,
                        "results": [{"path": p, "events": ev} for p, ev in events.items()],
                        "failures": _failures(run),
                    },
                    indent=2,
                )
            )
        else:
            print(_events_table(events))
    else:
        rows = [(r.path, _top(r.embedding, labels, args.top_k, args.threshold)) for r in run.results]
        if args.json:
            print(
                json.dumps(
                    {
                        "threshold": args.threshold,
                        "results": [
                            {"path": p, "top": [{"label": lab, "score": s} for lab, s in top]} for p, top in rows
                        ],
                        "failures": _failures(run),
                    },
                    indent=2,
                )
            )
        else:
            print(
                _table([(p, [f"{lab} ({s:.3f})" for lab, s in top]) for p, top in rows], min(args.top_k, len(labels)))
            )
    return run.code


def _top(scores: np.ndarray, labels: list[str], k: int, threshold: float | None) -> list[tuple[str, float]]:
    best = np.argsort(-scores)[:k]
    return [(labels[j], float(scores[j])) for j in best if threshold is None or scores[j] >= threshold]


def _failures(run: _Run) -> list[dict[str, str]]:
    return [{"path": f.path, "error": f.reason} for f in run.failures]


def _events_table(events: dict[str, list[dict]]) -> str:
    lines = []
    for path, evs in events.items():
        lines.append(path)
        lines += [f"  {e['onset']:8.2f} {e['offset']:8.2f}  {e['score']:.3f}  {e['label']}" for e in evs] or [
            "  (no event above the threshold)"
        ]
    return "\n".join(["     onset   offset  score  label (seconds)", *lines])


def cmd_zero_shot(args: argparse.Namespace) -> int:
    labels = [s.strip() for group in args.labels for s in group.split(",") if s.strip()]
    if not labels:
        fatal("--labels is empty; give comma-separated labels, e.g. --labels dog,rain,speech")
    paths, unsupported = _collect(args)
    model = _load_model(args)
    options = {"template": args.template, "scores": args.scores, "temperature": args.temperature}
    none = np.zeros((0, model.output_dim("clap")), np.float32)
    model.zero_shot_scores(none, labels, **options)  # the labels and options checked before the audio work
    run = _run(
        args,
        model,
        "clap",
        paths,
        None,
        "npz",
        None,
        unsupported=len(unsupported),
        keep=True,
        normalize=True,
        summary=sys.stderr if args.verbose else False,
    )
    if not run.completed:
        return run.code
    audio = np.stack([r.embedding for r in run.results]) if run.results else none
    scores = model.zero_shot_scores(audio, labels, **options).float().cpu().numpy()
    paths = [r.path for r in run.results]
    if args.json:
        rows = [
            {
                "path": p,
                "scores": {lab: float(s) for lab, s in zip(labels, row)},
                "top": [labels[j] for j in np.argsort(-row)[: args.top_k]],
            }
            for p, row in zip(paths, scores)
        ]
        print(
            json.dumps(
                {
                    "labels": labels,
                    "template": args.template,
                    "scores": args.scores,
                    "results": rows,
                    "failures": _failures(run),
                },
                indent=2,
            )
        )
    else:
        print(
            _table(
                [
                    (p, [f"{lab} ({s:.3f})" for lab, s in _top(row, labels, args.top_k, None)])
                    for p, row in zip(paths, scores)
                ],
                min(args.top_k, len(labels)),
            )
        )
    return run.code


def _table(rows: list[tuple[str, list[str]]], k: int) -> str:
    """A table: one file per row, its top-k cells; long paths are shortened from the left to fit."""
    table = [["file"] + [f"top-{j + 1}" for j in range(k)]] + [
        [p, *cells] + [""] * (k - len(cells)) for p, cells in rows
    ]
    widths = [max(len(r[c]) for r in table) for c in range(k + 1)]
    width = shutil.get_terminal_size((120, 20)).columns
    if widths[0] > width // 2:  # long paths: keep the table readable
        widths[0] = max(20, width // 2)
        table = [[r[0] if len(r[0]) <= widths[0] else "..." + r[0][-(widths[0] - 3) :]] + r[1:] for r in table]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# text, convert, download, list, cache
# ---------------------------------------------------------------------------------------------------


def cmd_text(args: argparse.Namespace) -> int:
    texts = list(args.texts)
    if args.text_file:
        texts += [
            line.strip() for line in Path(args.text_file).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not texts:
        fatal("no texts given; pass TEXT arguments or --from-file FILE")
    out = Path(args.output)
    if out.suffix.lower() not in (".npy", ".npz"):
        fatal(f"text output must end in .npy or .npz, got {out}")
    _check_file_output(out, args.overwrite)
    model = _load_model(args)
    emb = model.clap_text_embeddings(texts, normalize=args.normalize, batch_size=args.batch_size)
    emb = emb.float().cpu().numpy()
    meta = {
        "model": model.name,
        "weights_fingerprint": files.weights_fingerprint(model),
        "level": "text",
        "normalize": bool(args.normalize),
        "dim": int(emb.shape[-1]),
        "model_source": str(args.model),
        "m2d2_embed_version": __version__,
    }
    outputs.EmbeddingSet(texts, emb, "text", durations=np.zeros(0), metadata=meta).save(out)
    print(f"{PROG}: {len(texts)} text embeddings [{emb.shape[0]}, {emb.shape[1]}] -> {out}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.overwrite:
        fatal(f"{dst} exists; pass --overwrite to replace it")
    print(f"{PROG}: converted {src} -> {convert(src, dst)}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    path = loader.download_model(
        args.name, cache_dir=args.cache_dir, progress=False if args.no_progress else None, keep_source=args.keep_source
    )
    print(path)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    manifest = export_onnx(
        args.name,
        args.output,
        heads=not args.no_heads,
        overwrite=args.overwrite,
        cache_dir=args.cache_dir,
        offline=args.offline or None,
    )
    print(f"{PROG}: exported {args.name} -> {manifest.parent} (see {manifest.name})")
    return EXIT_OK


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cmd_list(args: argparse.Namespace) -> int:
    models = loader.list_models(args.cache_dir)
    if args.json:
        print(json.dumps([{**m, "path": str(m["path"])} for m in models], indent=2))
        return EXIT_OK
    rows = [["name", "best for", "frame", "dims", "download", "cached"]]
    for m in models:
        dims = "/".join(str(m["dims"][k]) for k in ("clip", "clap") if k in m["dims"])
        rows.append(
            [
                m["name"] + (" (default)" if m["default"] else ""),
                m["best_for"],
                f"{m['frame_ms']:g} ms",
                dims + (f" +{m['dims']['classes']} tags" if "classes" in m["dims"] else ""),
                f"~{m['size_mb']} MB",
                "yes" if m["cached"] else "no",
            ]
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if models:
        print(f"\ndims: clip (and frame) / CLAP embedding widths. licence: {models[0]['license']}")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    if args.clear is not None:
        removed = loader.clear_cache(args.clear or None, args.cache_dir)
        print(f"removed {len(removed)} items" + "".join(f"\n  {p}" for p in removed))
        return EXIT_OK
    if args.verify:
        rows = loader.verify_cache(args.cache_dir)
        for r in rows:
            print(f"{'ok' if r['ok'] else 'DAMAGED':<8} {r['name']}: {r['status']}")
        if not rows:
            print("no converted models in the cache")
        return EXIT_OK if all(r["ok"] for r in rows) else EXIT_FAILED
    s = loader.cache_summary(args.cache_dir)
    if args.json:
        print(json.dumps({**s, "path": str(s["path"])}, indent=2))
        return EXIT_OK
    print(f"cache: {s['path']}")
    if not s["entries"]:
        print("  (empty)")
    for e in s["entries"]:
        print(f"  {e['name']:<40} {_human(e['bytes']):>10}")
    print(f"total: {_human(s['total_bytes'])}")
    print(s["clear_hint"])
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
