"""The ``m2d2-embed`` command line: embed files (on one device, several, or as one shard of a job array), merge
shards, zero-shot labels, text embeddings, convert/download models, and a hand-off to the training command line.

Exit codes: 0 success; 1 some files failed, or an error while working; 2 bad usage or input (nothing was done);
130 interrupted (a directory output keeps what was finished: run the same command again to complete it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PROG = "m2d2-embed"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FILE_SUFFIXES = (".npz", ".npy", ".parquet")
RESUME_KEYS = ("model", "weights_fingerprint", "level", "reduce", "normalize", "dim", "sample_rate",
               "compute_dtype", "format")
DEFAULT_TEMPLATE = "{label} can be heard"  # the same default as M2D2.zero_shot
STAGING = "shards"  # unmerged output of --shard/--devices workers: OUT/shards/ (beside a file output: OUT.shards/)
COMPLETE = "complete.json"  # marks a worker's shard directory whose files have all been tried
WORKER_GRACE_SECONDS = 10.0  # --devices: time the workers get to save their work after Ctrl-C

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
    bad = [d for d in items if not _DEVICE.match(d)]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"expected devices such as cuda:0,cuda:1 (or cpu,cpu), got {s!r}")
    return items


def _shard(s: str) -> tuple[int, int]:
    i, sep, n = s.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {s!r}")
    return int(i), int(n)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .registry import DEFAULT_MODEL

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")

    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                   help=f"registry name (default {DEFAULT_MODEL}; see `{PROG} list`), upstream .pth, converted "
                        ".safetensors file or directory, http(s):// or hf:// URL")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "int8"],
                   help="compute dtype (default: bf16 on CUDA, fp32 on CPU; int8: dynamic quantization, CPU)")
    g.add_argument("--cache-dir", default=None, help="model cache (default $M2D2_EMBED_CACHE or ~/.cache/m2d2_embed)")
    g.add_argument("--offline", action="store_true", help="use the cache only; never download")

    inputs = argparse.ArgumentParser(add_help=False)
    g = inputs.add_argument_group("inputs")
    g.add_argument("paths", nargs="+", metavar="PATH",
                   help="audio files, folders, or quoted wildcards such as 'data/*.wav'")
    g.add_argument("--recursive", "-r", action="store_true", help="search sub-folders of folders")
    g.add_argument("--glob", default=None, metavar="PATTERN",
                   help="which files to take from folders, e.g. '*.wav' (default: the audio suffixes .wav .flac "
                        ".ogg .opus .mp3 .aiff ...)")
    g.add_argument("--batch-size", type=_positive, default=None, metavar="N",
                   help="10-s chunks per batch (default 32 on CPU, 256 on CUDA)")
    g.add_argument("--num-workers", type=_non_negative, default=None, metavar="N",
                   help="decoding processes (default: up to 8, two cores left free; 0 decodes in the main process)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the audio encoder: faster on a GPU for long jobs, after a one-off warm-up "
                        "of tens of seconds (compiled once per micro-batch size, not per batch); not with "
                        "--dtype int8")

    p = argparse.ArgumentParser(prog=PROG, description="Audio embeddings from NTT's M2D2 (M2D-CLAP 2025): frame, "
                                "clip and text-aligned (CLAP) embeddings of audio files.",
                                epilog=f"Run `{PROG} COMMAND --help` for the options of a command.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("embed", parents=[common, inputs, model], help="embed audio files into an npz/npy/parquet file "
                       "or a resumable directory",
                       description="Embed audio files. A file output (-o out.npz|.npy|.parquet) is written at the "
                       "end, atomically; any other -o is a directory of shards written as work completes, which "
                       "an interrupted or extended run resumes (files already embedded with the same model and "
                       "settings are skipped). Failed files are listed in a failures.jsonl sidecar and make the "
                       "exit code 1.",
                       epilog=f"example: {PROG} embed recordings/ -r -o emb.npz --level clip")
    e.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file (.npz, .npy + .json sidecar, .parquet) or directory")
    e.add_argument("--level", default="clip", choices=["clip", "frame", "clap"],
                   help="clip: one vector per file (3840-d); frame: one per 160 ms step with timestamps (3840-d); "
                        "clap: the audio side of the audio-text space (768-d). Default clip")
    e.add_argument("--reduce", default="none", choices=["none", "mean"],
                   help="clip/frame: none stacks the 5 frequency patches (3840-d), mean averages them (768-d)")
    e.add_argument("--normalize", action="store_true", help="L2-normalise each embedding vector")
    e.add_argument("--format", default=None, choices=["npz", "npy", "parquet"],
                   help="output format (default: from the suffix of OUT; npz for a directory)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file, or start a directory output over")
    e.add_argument("--shard-size", type=_positive, default=1000, metavar="N",
                   help="files per shard of a directory output (default 1000): at most this much work is "
                        "redone after a crash")
    e.add_argument("--strict", action="store_true", help="stop at the first file that fails")
    g = e.add_argument_group("several devices or machines")
    g.add_argument("--devices", type=_devices, default=None, metavar="DEV,DEV,...",
                   help="one worker process per device (cuda:0,cuda:1,...; cpu,cpu works too), each embedding its "
                        "share of the sorted file list; their output is merged into OUT at the end. Resumable: "
                        "run the same command again after an interruption")
    g.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="embed only shard I of N (0-based: files I, I+N, I+2N, ... of the sorted list), for job "
                        "arrays (SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT). Each shard writes "
                        f"under OUT/{STAGING}/ and is merged into OUT when complete (a file output once all N are)")
    g.add_argument("--no-merge", action="store_true",
                   help=f"with --shard: leave the finished shard unmerged; run `{PROG} merge OUT` afterwards")
    e.set_defaults(func=cmd_embed)

    m = sub.add_parser("merge", parents=[common], help="merge the shards of --shard/--devices workers into OUT",
                       description="Merge complete shards written by `embed --shard I/N` (or --devices) into the "
                       "output. A directory output takes each complete shard (files already in it are not "
                       "duplicated); a file output is written once all N shards are complete. Incomplete shards "
                       "are listed (exit code 1): finish them by running their `embed --shard I/N` again.",
                       epilog=f"example: {PROG} merge emb/")
    m.add_argument("output", metavar="OUT", help="the -o of the embed command (directory or .npz/.npy/.parquet)")
    m.set_defaults(func=cmd_merge)

    tr = sub.add_parser("train", add_help=False, help="train or fine-tune a model (stage1, stage2, finetune, "
                        "probe, ...): `m2d2-embed train --help`",
                        description="Hands off to `python -m m2d2_embed.train` (needs the training dependencies).")
    tr.add_argument("train_args", nargs=argparse.REMAINDER, metavar="...")
    tr.set_defaults(func=cmd_train)

    z = sub.add_parser("zero-shot", parents=[common, inputs, model], help="score audio files against text labels",
                       description="Zero-shot classification: print the top labels of each file as a table.",
                       epilog=f"example: {PROG} zero-shot clips/ --labels dog,rain,speech --top-k 2")
    z.add_argument("--labels", required=True, action="append", metavar="A,B,C",
                   help="comma-separated labels (repeat the option for labels that contain commas)")
    z.add_argument("--template", default=DEFAULT_TEMPLATE,
                   help=f"prompt with {{label}} (default {DEFAULT_TEMPLATE!r}, as upstream)")
    z.add_argument("--top-k", type=_positive, default=3, metavar="K", help="labels shown per file (default 3)")
    z.add_argument("--scores", default="softmax", choices=["softmax", "cosine"],
                   help="softmax: probabilities over the labels (default); cosine: raw similarities")
    z.add_argument("--temperature", type=float, default=0.01, help="softmax temperature (default 0.01)")
    z.add_argument("--json", action="store_true", help="print JSON (every label's score) instead of a table")
    z.set_defaults(func=cmd_zero_shot)

    t = sub.add_parser("text", parents=[common, model], help="embed texts into the audio-text space",
                       description="Text embeddings (CLAP text side) saved as .npy (+ .json sidecar with the "
                       "texts) or .npz.", epilog=f'example: {PROG} text "a dog barks" "rain on a roof" -o text.npy')
    t.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed")
    t.add_argument("--from-file", dest="text_file", default=None, metavar="FILE",
                   help="also read texts from FILE, one per line")
    t.add_argument("-o", "--output", required=True, metavar="OUT", help="output .npy or .npz")
    t.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    t.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="texts per batch (default 64)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t.set_defaults(func=cmd_text)

    c = sub.add_parser("convert", parents=[common], help="convert an upstream .pth into the package's format",
                       description="Convert an upstream M2D/M2D-CLAP .pth (or re-save a converted model) into "
                       "model.safetensors + config.json (DST a directory) or one .safetensors file.")
    c.add_argument("src", metavar="SRC", help="upstream .pth, .safetensors or converted directory")
    c.add_argument("dst", metavar="DST", help="output directory, or a path ending in .safetensors")
    c.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("download", parents=[common], help="download, verify and convert a model into the cache",
                       description="Download a registry model (or an http(s):// / hf:// URL), check its SHA-256 "
                       "and convert it into the cache; prints the converted path.")
    d.add_argument("name", metavar="NAME_OR_URL", help=f"registry name (e.g. {DEFAULT_MODEL}) or URL")
    d.add_argument("--cache-dir", default=None, help="model cache (default $M2D2_EMBED_CACHE or ~/.cache/m2d2_embed)")
    d.add_argument("--keep-source", action="store_true", help="keep the downloaded archive/checkpoint after converting")
    d.add_argument("--no-progress", action="store_true", help="no download progress bar")
    d.set_defaults(func=cmd_download)

    li = sub.add_parser("list", parents=[common], help="list the registry models and which are cached",
                        description="List the models `--model` accepts by name, their size and whether they are "
                        "in the cache.")
    li.add_argument("--cache-dir", default=None, help="model cache to look in")
    li.add_argument("--json", action="store_true", help="print JSON")
    li.set_defaults(func=cmd_list)

    x = sub.add_parser("export", parents=[common], help="export the encoder and CLAP head as ONNX for other runtimes",
                       description="Write MODEL's audio encoder (and CLAP audio head) as ONNX, with dynamic batch and "
                       "chunk width, plus m2d2_export.json (front-end settings, norm stats, tensor layouts). The "
                       "weights stay NTT's: not for redistribution. Needs `pip install 'm2d2-embed[onnx]'`.")
    x.add_argument("name", metavar="MODEL", help="registry name, checkpoint path, converted directory or URL")
    x.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    x.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    x.add_argument("--no-heads", action="store_true", help="export the encoder only")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export in DIR")
    x.add_argument("--cache-dir", default=None, help="model cache (default $M2D2_EMBED_CACHE or ~/.cache/m2d2_embed)")
    x.add_argument("--offline", action="store_true", help="use the cache only; never download")
    x.set_defaults(func=cmd_export)

    ca = sub.add_parser("cache", parents=[common], help="show where the model cache is and what it holds",
                        description="Show the model cache folder, its entries and sizes, and how to clear it.")
    ca.add_argument("--cache-dir", default=None, help="model cache to inspect")
    ca.add_argument("--json", action="store_true", help="print JSON")
    ca.set_defaults(func=cmd_cache)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # everything after `train` belongs to the training command line
        return _train(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(message)s", stream=sys.stderr, force=True)
    if args.verbose == 0:  # skipped files are listed once, at the end
        logging.getLogger("m2d2_embed.files").setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except _Fatal as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        if args.verbose:
            log.exception("failed")
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_FAILED


# ---------------------------------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------------------------------

def _collect(args: argparse.Namespace) -> list[str]:
    from .files import NoAudioFilesError, collect_files

    try:
        return collect_files(args.paths, recursive=args.recursive, glob=args.glob)
    except (FileNotFoundError, NoAudioFilesError) as e:
        fatal(str(e))


def _load_model(args: argparse.Namespace):
    from .loader import load

    compile_ = bool(getattr(args, "compile", False))  # embed and zero-shot have --compile, text does not
    if compile_ and args.dtype == "int8":
        fatal("--compile does not work with --dtype int8 (dynamically quantized layers); drop one of them")
    try:
        return load(args.model, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                    offline=True if args.offline else None, compile=compile_)
    except (ValueError, OSError, RuntimeError, NotImplementedError) as e:
        fatal(f"cannot load model {args.model!r}: {e}", EXIT_FAILED)


def _check_file_output(out: Path, overwrite: bool) -> None:
    parent = out.parent
    if not parent.is_dir():
        fatal(f"the directory of the output {out} does not exist ({parent}); create it first (mkdir -p {parent})")
    if out.is_dir():
        fatal(f"output {out} is a directory; give a file name with a .npz, .npy or .parquet suffix, or a directory "
              "name without one for a resumable directory output")
    if out.exists() and not overwrite:
        fatal(f"output {out} exists; pass --overwrite to replace it")


def _format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


# ---------------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------------

class _DirOutput:
    """A resumable output directory: ``manifest.json``, ``part-NNNNN.<fmt>`` shards, ``failures.jsonl``, and
    ``shards/`` (work of ``--shard``/``--devices`` workers not merged yet)."""

    def __init__(self, root: Path, fmt: str) -> None:
        self.root, self.fmt = root, fmt
        self.manifest_path = root / "manifest.json"

    def existing_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            fatal(f"{self.manifest_path} is unreadable ({e}); pass --overwrite to start over")

    def ours(self) -> list[Path]:
        from .outputs import FAILURES, MANIFEST, SHARD_PREFIX

        return [p for p in self.root.iterdir() if p.name in (MANIFEST, FAILURES, STAGING)
                or p.name.startswith(SHARD_PREFIX)
                or (p.name.startswith(".") and p.name.endswith(tuple(f".tmp{s}" for s in ("", ".parquet"))))]

    def only_staging(self) -> bool:
        """The directory holds nothing but unmerged worker output (``shards/``)."""
        return [p.name for p in self.root.iterdir()] == [STAGING]

    def clean_partial(self) -> None:
        """Remove temporary files of an interrupted write and ``.npy`` shards whose sidecar never landed."""
        from .outputs import SHARD_PREFIX, sidecar_path

        for p in self.root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)
            elif p.name.startswith(SHARD_PREFIX) and p.suffix == ".npy" and not sidecar_path(p).exists():
                p.unlink(missing_ok=True)

    def done_paths(self) -> set[str]:
        from .outputs import shard_files

        done: set[str] = set()
        if self.root.is_dir():
            for s in shard_files(self.root, self.fmt):
                done.update(_part_paths(s, self.fmt))
        return done

    def next_index(self) -> int:
        from .outputs import SHARD_PREFIX

        nums = [int(p.name[len(SHARD_PREFIX):].split(".")[0]) for p in self.root.glob(f"{SHARD_PREFIX}*")
                if p.name[len(SHARD_PREFIX):].split(".")[0].isdigit()]
        return max(nums, default=-1) + 1

    def write_manifest(self, meta: dict[str, Any]) -> None:
        from .outputs import atomic_write

        text = json.dumps(meta, indent=2)
        atomic_write(self.manifest_path, lambda tmp: Path(tmp).write_text(text))


def _part_paths(part: Path, fmt: str) -> list[str]:
    """The paths held by one ``part-NNNNN`` shard, read without its embeddings."""
    if fmt == "npz":
        import numpy as np

        with np.load(part, allow_pickle=False) as z:
            return [str(p) for p in z["paths"]]
    if fmt == "npy":
        from .outputs import sidecar_path

        return list(json.loads(sidecar_path(part).read_text())["paths"])
    from .outputs import require_pyarrow

    _, pq = require_pyarrow()
    return pq.read_table(part, columns=["path"]).column("path").to_pylist()


def cmd_embed(args: argparse.Namespace) -> int:
    from .outputs import FORMATS, require_pyarrow

    out = Path(args.output)
    is_file = out.suffix.lower() in FILE_SUFFIXES
    fmt = out.suffix.lower().lstrip(".") if is_file else (args.format or "npz")
    if args.format and args.format != fmt:
        fatal(f"--format {args.format} does not match the output suffix {out.suffix!r}")
    if fmt not in FORMATS:
        fatal(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if args.level == "clap" and args.reduce != "none":
        fatal("--reduce applies to the clip and frame levels only")
    if fmt == "parquet":
        try:
            require_pyarrow()
        except ImportError as e:
            fatal(str(e))
    if args.devices is not None and args.shard is not None:
        fatal("--devices and --shard do not go together: --devices runs all shards here; --shard i/n runs one "
              "(for a scheduler that starts the others)")
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
    dir_out: _DirOutput | None = None
    previous: dict[str, Any] | None = None
    if is_file:
        _check_file_output(out, args.overwrite)
    else:
        dir_out, previous = _open_dir_output(out, fmt, args, overwrite=args.overwrite)
    files = _collect(args)
    return _embed_files(args, out, fmt, files, dir_out, previous).code


def _wanted(args: argparse.Namespace, fmt: str) -> dict[str, Any]:
    """The resume keys known before the model loads."""
    return {"level": args.level, "reduce": args.reduce if args.level != "clap" else "none",
            "normalize": bool(args.normalize), "format": fmt}


def _open_dir_output(out: Path, fmt: str, args: argparse.Namespace,
                     overwrite: bool) -> tuple[_DirOutput, dict[str, Any] | None]:
    """Check a directory output before the model loads: (its handle, its manifest if it is one to resume)."""
    if not out.parent.is_dir():
        fatal(f"the parent of the output directory {out} does not exist ({out.parent}); create it first")
    if out.exists() and not out.is_dir():
        fatal(f"output {out} exists and is not a directory; give a file name ending in .npz, .npy or .parquet "
              "for a file output")
    dir_out = _DirOutput(out, fmt)
    previous = None
    if out.is_dir():
        previous = dir_out.existing_manifest()
        if previous is None and any(out.iterdir()) and not dir_out.only_staging():
            fatal(f"output directory {out} exists and is not an {PROG} output (no manifest.json); choose a new "
                  "or empty directory")
        if overwrite:
            for p in dir_out.ours():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            previous = None
        elif previous is not None:
            _check_resume(out, previous, _wanted(args, fmt))
    return dir_out, previous


@dataclass
class _Run:
    """What one embedding run did."""

    code: int
    completed: bool  # every file was tried (not interrupted)
    embedded: int = 0
    skipped: int = 0
    failed: int = 0


def _embed_files(args: argparse.Namespace, out: Path, fmt: str, files: list[str], dir_out: _DirOutput | None,
                 previous: dict[str, Any] | None, *, also_done: set[str] | None = None, label: str = PROG,
                 on_model: Any = None) -> _Run:
    """Embed ``files`` (less those already in ``dir_out`` or ``also_done``) into ``out``; print the summary.

    ``on_model(meta)`` runs once the model is loaded (the shard workers check and create the final manifest)."""
    from .outputs import FAILURES

    done: set[str] = set()
    if dir_out is not None and previous is not None:
        dir_out.clean_partial()
        done = dir_out.done_paths()
    done |= also_done or set()
    todo = [f for f in files if f not in done]
    skipped = len(files) - len(todo)

    model = _load_model(args)
    from .files import AudioFileError, FileResult, embedding_metadata, iter_file_embeddings, results_to_set

    if args.level == "clap" and model.audio_proj is None:
        fatal(f"model {model.name!r} has no CLAP audio head; use --level clip or frame, or an M2D-CLAP model")
    meta = {**embedding_metadata(model, args.level, args.reduce, args.normalize), "format": fmt,
            "model_source": str(args.model)}
    if on_model is not None:
        on_model(meta)
    if dir_out is not None:
        if previous is not None:
            _check_resume(out, previous, meta)
        else:
            out.mkdir(parents=True, exist_ok=True)
            dir_out.write_manifest({**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    results: list[tuple[int, FileResult]] = []  # (input index, result) not yet written
    failures = []
    n_done = 0
    audio_s = 0.0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal results
        if dir_out is None or not results:
            return
        from .outputs import write_file

        results.sort(key=lambda r: r[0])
        shard = out / f"part-{dir_out.next_index():05d}.{fmt}"
        write_file(results_to_set([r for _, r in results], [], meta, args.level), shard, fmt)
        results = []

    restore = _sigterm_as_interrupt()
    interrupted = False
    try:
        for i, r in iter_file_embeddings(model, todo, args.level, reduce=args.reduce, normalize=args.normalize,
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         progress=_progress(args), strict=args.strict):
            if isinstance(r, FileResult):
                results.append((i, r))
                n_done += 1
                audio_s += r.duration
                if dir_out is not None and len(results) >= args.shard_size:
                    flush()
            else:
                failures.append(r)
    except AudioFileError as e:
        flush()
        _write_failures(out, dir_out, [*failures, e], FAILURES)
        fatal(f"{e} (--strict)", EXIT_FAILED)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        restore()
    elapsed = time.perf_counter() - t0
    if interrupted:
        if dir_out is None:
            print(f"{label}: interrupted after {n_done} of {len(todo)} files; nothing was written to {out} (a "
                  "directory output keeps finished work: -o DIR)", file=sys.stderr)
            return _Run(EXIT_INTERRUPTED, False)
        flush()
        _write_failures(out, dir_out, failures, FAILURES)
        print(f"{label}: interrupted: {n_done + skipped} of {len(files)} files are saved in {out}; run the same "
              "command again to finish", file=sys.stderr)
        return _Run(EXIT_INTERRUPTED, False)
    if dir_out is None:
        ordered = [r for _, r in sorted(results, key=lambda r: r[0])]
        es = results_to_set(ordered, failures, meta, args.level)
        from .outputs import write_file

        write_file(es, out, fmt)
    else:
        flush()
    side = _write_failures(out, dir_out, failures, FAILURES)
    rate = audio_s / elapsed if elapsed > 0 else math.inf
    line = (f"{label}: {n_done} files embedded, {skipped} skipped (already done), {len(failures)} failed; "
            f"{_format_seconds(audio_s)} of audio in {elapsed:.1f} s ({rate:.1f} audio-s/s) -> {out}")
    print(line, flush=True)
    code = EXIT_OK
    if failures:
        print(f"{label}: {len(failures)} file(s) failed; listed in {side}", file=sys.stderr)
        for f in failures[:10]:
            print(f"  {f.path}: {f.reason}", file=sys.stderr)
        if len(failures) > 10:
            print(f"  ... and {len(failures) - 10} more", file=sys.stderr)
        code = EXIT_FAILED
    return _Run(code, True, n_done, skipped, len(failures))


def _check_resume(out: Path, previous: dict[str, Any], wanted: dict[str, Any]) -> None:
    diffs = [f"{k}: {previous.get(k)!r} there, {wanted[k]!r} now" for k in RESUME_KEYS
             if k in wanted and previous.get(k) != wanted[k]]
    if diffs:
        fatal(f"output directory {out} holds embeddings made with other settings ({'; '.join(diffs)}); use another "
              "directory, the same settings to resume, or --overwrite to start over")


def _write_failures(out: Path, dir_out: _DirOutput | None, failures: list, name: str) -> Path:
    from .files import AudioFileError
    from .outputs import FileFailure, failures_path, write_failures

    items = [FileFailure(f.path, f.reason) if isinstance(f, AudioFileError) else f for f in failures]
    side = out / name if dir_out is not None else failures_path(out)
    write_failures(items, side)
    return side


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
# embed on several devices (--devices) or as one shard of a split (--shard i/n); merge
# ---------------------------------------------------------------------------------------------------
#
# The sorted file list is split round-robin: shard i of n takes files i, i + n, i + 2n, ... Each shard is a
# resumable directory output of its own, under OUT/shards/IIIII-of-NNNNN/ (beside a file output:
# OUT.shards/IIIII-of-NNNNN/), with complete.json written once all its files are done. Merging moves the parts
# of complete shards into OUT (a directory output grows as shards finish; files already there are never
# duplicated) or, for a file output, writes OUT from all n shards once every one is complete.

def _staging(out: Path, is_file: bool) -> Path:
    return out.with_name(out.name + ".shards") if is_file else out / STAGING


def _shard_name(i: int, n: int) -> str:
    return f"{i:05d}-of-{n:05d}"


def _shard_dirs(root: Path) -> list[tuple[int, int, Path]]:
    """(i, n, dir) of each shard directory under a staging folder, sorted."""
    found = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            parts = p.name.split("-of-")
            if p.is_dir() and len(parts) == 2 and all(s.isdigit() for s in parts):
                found.append((int(parts[0]), int(parts[1]), p))
    return found


def _embed_shard(args: argparse.Namespace, out: Path, fmt: str, is_file: bool, i: int, n: int) -> int:
    """One worker of a split: embed files i, i + n, ... of the sorted list into its shard directory, mark it
    complete, then merge (unless --no-merge)."""
    if args.overwrite:
        fatal("--overwrite does not go with --shard: workers of one job cannot clear each other's output; "
              f"delete {out} (and {_staging(out, is_file)}) to start over")
    final_dir: _DirOutput | None = None
    final_previous: dict[str, Any] | None = None
    if is_file:
        if not out.parent.is_dir():
            fatal(f"the directory of the output {out} does not exist ({out.parent}); create it first")
        if out.exists():
            fatal(f"output {out} exists (all shards were merged into it); delete it to embed again")
    else:
        final_dir, final_previous = _open_dir_output(out, fmt, args, overwrite=False)
    files = sorted(_collect(args))
    mine = files[i::n]
    root = _staging(out, is_file)
    shard_dir = root / _shard_name(i, n)
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / COMPLETE).unlink(missing_ok=True)
    dir_out = _DirOutput(shard_dir, fmt)
    previous = dir_out.existing_manifest()
    if previous is not None:
        _check_resume(shard_dir, previous, _wanted(args, fmt))
    also_done = final_dir.done_paths() if final_dir is not None else set()

    def check_final(meta: dict[str, Any]) -> None:
        if final_dir is None:
            return
        if final_previous is not None:
            _check_resume(out, final_previous, meta)
        elif final_dir.existing_manifest() is None:  # so read_embeddings(OUT) works while shards run
            final_dir.write_manifest({**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    label = f"{PROG} [shard {i}/{n}]"
    run = _embed_files(args, shard_dir, fmt, mine, dir_out, previous, also_done=also_done, label=label,
                       on_model=check_final)
    if not run.completed:
        return run.code
    from .outputs import atomic_write

    marker = {"shard": i, "of": n, "files": len(mine), "embedded": run.embedded, "skipped": run.skipped,
              "failed": run.failed, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(shard_dir / COMPLETE, lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=2)))
    if not args.no_merge:
        report = _merge(out, is_file, n)
        print(f"{label}: {report.describe(out)}", flush=True)
    return run.code


class _MergeReport:
    def __init__(self) -> None:
        self.merged: list[str] = []  # shard names
        self.added = 0  # files added to the output
        self.failed = 0  # files listed as failed in the output
        self.waiting: list[str] = []  # shards not complete (file outputs: nothing merged until all are)
        self.written = False  # the output was (re)written

    def describe(self, out: Path) -> str:
        if not self.merged:
            if self.waiting:
                return f"{out} waits for shard(s) {', '.join(self.waiting)} to complete"
            return f"nothing to merge into {out}"
        s = (f"merged shard(s) {', '.join(self.merged)} into {out}: {self.added} files added"
             f"{f', {self.failed} failed' if self.failed else ''}")
        return s + (f"; waiting for {', '.join(self.waiting)}" if self.waiting else "")


def _merge(out: Path, is_file: bool, n: int | None = None) -> _MergeReport:
    """Merge complete shards into ``out`` (see the comment above); safe to run at any time, from any worker."""
    import filelock

    root = _staging(out, is_file)
    report = _MergeReport()
    if not root.is_dir():
        return report
    root.mkdir(exist_ok=True)  # another worker may have merged and removed it since
    with filelock.FileLock(str(root / ".lock")):
        shards = _shard_dirs(root)
        if n is None:
            ns = sorted({k for _, k, _ in shards})
            if is_file and len(ns) > 1:
                fatal(f"{root} holds shards of splits into {' and '.join(map(str, ns))}; finish one split and "
                      "delete the other's shard directories")
            n = ns[0] if ns else None
        if is_file:
            _merge_file(out, root, shards, n, report)
        else:
            _merge_dir(out, shards, report)
    # the staging folder goes once empty (a new worker may be creating a shard in it: then it stays)
    if root.is_dir() and not _shard_dirs(root):
        (root / ".lock").unlink(missing_ok=True)
        try:
            root.rmdir()
        except OSError:
            pass
    return report


def _shard_meta(shard_dir: Path) -> dict[str, Any]:
    meta = json.loads((shard_dir / "manifest.json").read_text())
    meta.pop("created", None)
    return meta


def _merge_dir(out: Path, shards: list[tuple[int, int, Path]], report: _MergeReport) -> None:
    from .outputs import FAILURES, read_embeddings, read_failures, shard_files, sidecar_path, subset, write_failures
    from .outputs import write_file as write_part

    complete = [(i, k, d) for i, k, d in shards if (d / COMPLETE).exists()]
    report.waiting = [f"{i}/{k}" for i, k, d in shards if not (d / COMPLETE).exists()]
    if not complete:
        return
    final_meta = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else None
    fmt = _shard_meta(complete[0][2])["format"]
    final = _DirOutput(out, fmt)
    if final_meta is None:
        final.write_manifest({**_shard_meta(complete[0][2]), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        final_meta = _shard_meta(complete[0][2])
    done = final.done_paths()
    failures = {f.path: f for f in read_failures(out / FAILURES)}
    index = final.next_index()
    for i, k, d in complete:
        _check_resume(out, final_meta, _shard_meta(d))
        for part in shard_files(d, fmt):
            paths = _part_paths(part, fmt)
            dst = out / f"part-{index:05d}.{fmt}"
            keep = [j for j, p in enumerate(paths) if p not in done]
            if len(keep) == len(paths):  # the usual case: move the part as it is
                part.replace(dst)
                if fmt == "npy":
                    sidecar_path(part).replace(sidecar_path(dst))
            elif keep:  # files embedded twice (a split changed while shards ran): keep one copy
                es = read_embeddings(part)
                write_part(subset(es, keep), dst, fmt)
            else:
                continue
            index += 1
            done.update(paths)
            report.added += len(keep)
        for f in read_failures(d / FAILURES):
            failures[f.path] = f
        shutil.rmtree(d)
        report.merged.append(f"{i}/{k}")
    left = [f for p, f in sorted(failures.items()) if p not in done]
    write_failures(left, out / FAILURES)
    report.failed = len(left)


def _merge_file(out: Path, root: Path, shards: list[tuple[int, int, Path]], n: int | None,
                report: _MergeReport) -> None:
    from .outputs import concat, failures_path, read_embeddings, subset, write_failures, write_file

    if n is None:
        return
    have = {i: d for i, k, d in shards if k == n and (d / COMPLETE).exists()}
    report.waiting = [f"{i}/{n}" for i in range(n) if i not in have]
    if report.waiting:
        return
    parts = [read_embeddings(have[i]) for i in range(n)]
    meta = _shard_meta(have[0])
    fmt = meta["format"]
    es = concat(parts, level=meta["level"], metadata=meta)
    first: dict[str, int] = {}
    for j, p in enumerate(es.paths):
        first.setdefault(p, j)
    es = subset(es, sorted(first.values(), key=lambda j: es.paths[j]))  # sorted by path, each file once
    failures = {f.path: f for f in es.failures if f.path not in first}
    es.failures = list(failures.values())
    write_file(es, out, fmt)
    write_failures(es.failures, failures_path(out))
    for i in range(n):
        shutil.rmtree(have[i])
    report.merged = [f"{i}/{n}" for i in range(n)]
    report.added, report.failed, report.written = len(es.paths), len(es.failures), True


def cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.output)
    is_file = out.suffix.lower() in FILE_SUFFIXES
    root = _staging(out, is_file)
    if not _shard_dirs(root):
        print(f"{PROG}: no shards to merge in {root}")
        return EXIT_OK
    report = _merge(out, is_file, None)
    print(f"{PROG}: {report.describe(out)}")
    if report.waiting:
        print(f"{PROG}: shard(s) {', '.join(report.waiting)} are not complete: run the same `{PROG} embed` command "
              "with --shard i/n for each to finish it (a shard resumes where it stopped), then merge again",
              file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _worker_argv(args: argparse.Namespace, i: int, n: int, device: str, progress: bool) -> list[str]:
    """The `embed` command line of worker ``i`` of ``n``: the parent's options, one device, one shard."""
    sub = _subparser("embed")
    argv = ["embed"]
    for a in sub._actions:
        if a.dest in ("help", "paths", "devices", "shard", "device", "overwrite", "no_progress", "no_merge"):
            continue
        value = getattr(args, a.dest, None)
        opt = max(a.option_strings, key=len)
        if isinstance(a, argparse._StoreTrueAction):
            argv += [opt] if value else []
        elif isinstance(a, argparse._CountAction):
            argv += [opt] * int(value or 0)
        elif value is not None:
            argv.append(f"{opt}={value}")
    argv += ["--shard", f"{i}/{n}", "--device", device, "--no-merge"]
    argv += [] if progress else ["--no-progress"]
    return [*argv, "--", *args.paths]


def _wait(proc: Any, seconds: float) -> int | None:
    import subprocess

    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def _subparser(name: str) -> argparse.ArgumentParser:
    for a in build_parser()._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices[name]
    raise KeyError(name)


def _embed_on_devices(args: argparse.Namespace, out: Path, fmt: str, is_file: bool, devices: list[str]) -> int:
    """Run one `embed --shard i/n` worker process per device, wait for all, then merge."""
    import subprocess

    n = len(devices)
    if any(d.startswith("cuda") for d in devices):
        import torch

        count = torch.cuda.device_count()
        bad = [d for d in devices if d.startswith("cuda") and (count == 0 or int(d.partition(":")[2] or 0) >= count)]
        if bad:
            fatal(f"--devices names {', '.join(bad)} but this machine has {count} CUDA device(s)")
    root = _staging(out, is_file)
    if is_file:
        _check_file_output(out, args.overwrite)
        if args.overwrite:  # the workers refuse an existing file output
            from .outputs import failures_path

            out.unlink(missing_ok=True)
            failures_path(out).unlink(missing_ok=True)
            if root.exists():
                shutil.rmtree(root)
    else:
        _open_dir_output(out, fmt, args, overwrite=args.overwrite)
    stale = [f"{i}/{k}" for i, k, _ in _shard_dirs(root) if k != n]
    if stale:
        fatal(f"{root} holds unfinished shards of a split into another number of workers ({', '.join(stale)}); "
              f"finish them (same command with --devices of that many) or delete them, or run `{PROG} merge {out}`")
    _collect(args)  # fail on bad inputs here, not in every worker
    cpus = os.cpu_count() or 1
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and all(d == "cpu" for d in devices):
        env["OMP_NUM_THREADS"] = str(max(1, cpus // n))  # n CPU workers share the cores
    if args.num_workers is None:
        args.num_workers = max(0, min(8, (cpus - n) // n))  # decoding processes per worker
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
            argv = _worker_argv(args, i, n, dev, progress and i == 0)
            log.info("worker %d/%d on %s: %s", i, n, dev, " ".join(argv))
            procs.append(subprocess.Popen([sys.executable, "-m", "m2d2_embed", *argv], env=env))
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        # Ctrl-C reaches the workers too (one process group) and they are saving: give them time, then pass
        # the interrupt on to any that did not get it
        interrupted = True
        codes = [_wait(p, WORKER_GRACE_SECONDS) for p in procs]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    report = _merge(out, is_file, n)
    if report.merged or not interrupted:
        print(f"{PROG}: {report.describe(out)}")
    if interrupted or EXIT_INTERRUPTED in codes:
        print(f"{PROG}: interrupted; finished work is kept: run the same command again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report.waiting:
        print(f"{PROG}: worker(s) for shard(s) {', '.join(report.waiting)} did not finish (exit codes "
              f"{codes}); run the same command again to finish", file=sys.stderr)
        return EXIT_FAILED
    return max(codes)


# ---------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------

def _train(argv: list[str]) -> int:
    from .train.__main__ import main as train_main  # the training stack loads only here

    try:
        return int(train_main(argv) or 0)
    except SystemExit as e:  # --help, usage errors
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)


def cmd_train(args: argparse.Namespace) -> int:
    return _train(list(args.train_args))


# ---------------------------------------------------------------------------------------------------
# zero-shot
# ---------------------------------------------------------------------------------------------------

def cmd_zero_shot(args: argparse.Namespace) -> int:
    import numpy as np

    labels = [s.strip() for group in args.labels for s in group.split(",") if s.strip()]
    if not labels:
        fatal("--labels is empty; give comma-separated labels, e.g. --labels dog,rain,speech")
    if len(set(labels)) != len(labels):
        fatal(f"--labels has duplicates: {labels}")
    if "{label}" not in args.template:
        fatal(f"--template must contain {{label}}, got {args.template!r}")
    if args.temperature <= 0:
        fatal(f"--temperature must be positive, got {args.temperature}")
    files = _collect(args)
    model = _load_model(args)
    if model.audio_proj is None or model.text_encoder is None:
        fatal(f"model {model.name!r} is not an audio-text (CLAP) model; zero-shot needs one such as m2d2-clap-2025")
    from .files import FileResult, iter_file_embeddings

    text = model.clap_text_embeddings([args.template.format(label=lab) for lab in labels], normalize=True)
    text = text.float().cpu().numpy()
    results: dict[int, FileResult] = {}
    failures = []
    for i, r in iter_file_embeddings(model, files, "clap", normalize=True, batch_size=args.batch_size,
                                     num_workers=args.num_workers, progress=_progress(args)):
        if isinstance(r, FileResult):
            results[i] = r
        else:
            failures.append(r)
    order = sorted(results)
    if order:
        audio = np.stack([results[i].embedding for i in order])
        sim = audio @ text.T  # (files, labels) cosine similarities
        if args.scores == "softmax":
            z = sim / args.temperature
            z = np.exp(z - z.max(axis=1, keepdims=True))
            scores = z / z.sum(axis=1, keepdims=True)
        else:
            scores = sim
    else:
        scores = np.zeros((0, len(labels)))
    paths = [results[i].path for i in order]
    if args.json:
        rows = [{"path": p, "scores": {lab: float(s) for lab, s in zip(labels, row)},
                 "top": [labels[j] for j in np.argsort(-row)[:args.top_k]]} for p, row in zip(paths, scores)]
        print(json.dumps({"labels": labels, "template": args.template, "scores": args.scores, "results": rows,
                          "failures": [{"path": f.path, "error": f.reason} for f in failures]}, indent=2))
    else:
        print(_table(paths, labels, scores, args.top_k))
    for f in failures:
        print(f"{PROG}: failed: {f.path}: {f.reason}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def _table(paths: list[str], labels: list[str], scores, top_k: int) -> str:
    import numpy as np

    k = min(top_k, len(labels))
    header = ["file"] + [f"top-{j + 1}" for j in range(k)]
    rows = [header]
    for p, row in zip(paths, scores):
        best = np.argsort(-row)[:k]
        rows.append([p] + [f"{labels[j]} ({row[j]:.3f})" for j in best])
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    width = shutil.get_terminal_size((120, 20)).columns
    if widths[0] > width // 2:  # long paths: keep the table readable
        widths[0] = max(20, width // 2)
        rows = [[r[0] if len(r[0]) <= widths[0] else "..." + r[0][-(widths[0] - 3):]] + r[1:] for r in rows]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# text, convert, download, list, cache
# ---------------------------------------------------------------------------------------------------

def cmd_text(args: argparse.Namespace) -> int:
    import numpy as np

    from .outputs import EmbeddingSet, write_file

    texts = list(args.texts)
    if args.text_file:
        tf = Path(args.text_file)
        if not tf.is_file():
            fatal(f"--from-file {tf} does not exist")
        texts += [line.strip() for line in tf.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        fatal("no texts given; pass TEXT arguments or --from-file FILE")
    out = Path(args.output)
    if out.suffix.lower() not in (".npy", ".npz"):
        fatal(f"text output must end in .npy or .npz, got {out}")
    _check_file_output(out, args.overwrite)
    model = _load_model(args)
    if model.text_encoder is None:
        fatal(f"model {model.name!r} has no text encoder; text embeddings need an M2D-CLAP model such as "
              "m2d2-clap-2025")
    from . import __version__
    from .files import weights_fingerprint

    emb = model.clap_text_embeddings(texts, normalize=args.normalize, batch_size=args.batch_size)
    emb = emb.float().cpu().numpy()
    meta = {"model": model.name, "weights_fingerprint": weights_fingerprint(model), "level": "text",
            "normalize": bool(args.normalize), "dim": int(emb.shape[-1]), "model_source": str(args.model),
            "m2d2_embed_version": __version__}
    es = EmbeddingSet(texts, emb, "text", durations=np.zeros(0), metadata=meta)
    write_file(es, out, out.suffix.lower().lstrip("."))
    print(f"{PROG}: {len(texts)} text embeddings [{emb.shape[0]}, {emb.shape[1]}] -> {out}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        fatal(f"no such checkpoint: {src}")
    if dst.exists() and not args.overwrite:
        fatal(f"{dst} exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        fatal(f"the directory of {dst} does not exist ({dst.parent}); create it first")
    out = convert(src, dst)
    print(f"{PROG}: converted {src} -> {out}")
    return EXIT_OK


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download_model

    path = download_model(args.name, cache_dir=args.cache_dir, progress=False if args.no_progress else None,
                          keep_source=args.keep_source)
    print(path)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    manifest = export_onnx(args.name, args.output, heads=not args.no_heads, overwrite=args.overwrite,
                           cache_dir=args.cache_dir, offline=args.offline or None)
    print(f"{PROG}: exported {args.name} -> {manifest.parent} (see {manifest.name})")
    return EXIT_OK


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cmd_list(args: argparse.Namespace) -> int:
    from .hub import list_models
    from .registry import DEFAULT_MODEL

    models = list_models(args.cache_dir)
    if args.json:
        print(json.dumps([{**m, "path": str(m["path"])} for m in models], indent=2))
        return EXIT_OK
    rows = [["name", "kind", "download", "cached", "description"]]
    for m in models:
        name = m["name"] + (" (default)" if m["name"] == DEFAULT_MODEL else "")
        rows.append([name, m["kind"], f"{m['size_mb']} MB", "yes" if m["cached"] else "no", m["description"]])
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    if models:
        print(f"\nlicence: {models[0]['license']}")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    from .hub import cache_summary

    s = cache_summary(args.cache_dir)
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
