#!/usr/bin/env python
"""Files vs in-memory: how busy `embed_files` and `m2d2-embed embed` keep the device on a folder of 10-s WAVs.

    PYTHONPATH=. python3 benchmarks/files_gpu.py --out DIR                  # GPU: 4096 files, about a minute
    PYTHONPATH=. python3 benchmarks/files_gpu.py --device cpu --files 32 --workers 1   # rehearsal on a CPU

One run, one device, one model (the seed-0 synthetic checkpoint of bench.py, converted once into --cache-dir):

1. writes ``--files`` 10-s 16-kHz PCM_16 WAVs of noise into a temporary folder (thread pool);
2. (a) in memory: ``model.clip_embeddings(x, 16000, batch_size=B)`` on the same audio as a tensor already on the
   device, best of ``--repeats``: the ceiling the file paths are compared with;
3. (d) decoding alone: ``files.start_decoding`` (probe, batch, workers decode whole batches into their reused
   buffers, pinned on CUDA) with no model, files/s;
4. (b) ``model.embed_files(folder, level="clip", batch_size=B, num_workers=W)`` in-process after a warm-up on a
   few files: wall time (listing, probing, worker start-up included), and the steady rate between the first and
   the last batch (``iter_file_embeddings``);
5. (c) the command line, ``m2d2-embed embed FOLDER -o OUT.npz ... -vv`` in a subprocess (through
   ``benchmarks/cli_trace.py``, which marks the first encoder call): wall time (interpreter start and model load
   included), the audio-s/s it prints (embedding only), time-to-first-batch (process start to the first batch
   entering the encoder) and the start-up phases it logs (``startup: PHASE at T`` lines, seconds from the
   process start); with --compile also ``--compile`` (its rate includes the compilation). ``--compare-src DIR``
   also runs the CLI of another copy of the package (e.g. ``git worktree add /tmp/before COMMIT``), before and
   after interleaved, ``--cli-repeats`` times each: start-up before -> after in one run.

"ratio" is files/s over the in-memory clips/s: how busy the file path keeps the device compared with the model
fed from device memory. While (a), (b) and (c) run, GPU utilisation is sampled with nvidia-smi every 200 ms when
it exists (mean over the stage, and over the span between the first and last busy sample). Results: a table on
stdout, ``files_gpu.json`` and ``files_gpu.md`` in --out (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (benchmarks/bench.py: checkpoint, conversion and timing helpers)
from bench import SR, log  # noqa: E402

import m2d2_embed  # noqa: E402
from m2d2_embed import files as files_mod  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIP_SECONDS = 10.0


# ---------------------------------------------------------------------------------------------------
# Audio files
# ---------------------------------------------------------------------------------------------------


def clip_int16(i: int, samples: int) -> np.ndarray:
    """File ``i``: uniform noise at about -20 dBFS, int16 (content does not affect speed)."""
    return np.random.default_rng(i).integers(-3300, 3300, samples, dtype=np.int16)


def write_files(folder: Path, n: int, threads: int) -> list[np.ndarray]:
    """Write ``n`` 10-s 16-kHz mono PCM_16 WAVs (``clip_00000.wav`` ...); returns their samples (int16)."""
    import soundfile as sf

    samples = int(CLIP_SECONDS * SR)

    def one(i: int) -> np.ndarray:
        x = clip_int16(i, samples)
        sf.write(folder / f"clip_{i:05d}.wav", x, SR, subtype="PCM_16")
        return x

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, range(n)))


# ---------------------------------------------------------------------------------------------------
# GPU utilisation
# ---------------------------------------------------------------------------------------------------


class GpuUtil:
    """Samples ``utilization.gpu`` of the device with nvidia-smi every 200 ms while the block runs."""

    def __init__(self, device: torch.device, work: Path) -> None:
        self.exe = shutil.which("nvidia-smi") if device.type == "cuda" else None
        index = device.index if device.index is not None else 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if visible and visible[0] and index < len(visible):
            self.smi_index = visible[index].strip()
        else:
            self.smi_index = str(index)
        self.path = work / f"smi_{time.monotonic_ns()}.csv"
        self.proc: subprocess.Popen | None = None
        self.samples: list[int] = []

    def __enter__(self) -> GpuUtil:
        if self.exe:
            self._f = open(self.path, "w")
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "-i",
                    self.smi_index,
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=self._f,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.3)  # let the first sample in
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is None:
            return
        time.sleep(0.3)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._f.close()
        for line in self.path.read_text().splitlines():
            line = line.strip()
            if line.isdigit():
                self.samples.append(int(line))

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        s = self.samples
        busy = [i for i, v in enumerate(s) if v >= 5]
        span = s[busy[0] : busy[-1] + 1] if busy else []
        return {
            "mean": float(np.mean(s)),
            "mean_busy_span": float(np.mean(span)) if span else 0.0,
            "max": int(max(s)),
            "samples": len(s),
        }


# ---------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------


def measure_in_memory(
    model: m2d2_embed.M2D2, waves: list[np.ndarray], batch_size: int, repeats: int, work: Path
) -> dict[str, Any]:
    dev = model.device
    x = torch.from_numpy(np.stack(waves)).to(dev).float().div_(32768.0)  # what soundfile reads from PCM_16
    n = x.shape[0]
    bench.timed(lambda: model.clip_embeddings(x[: min(n, batch_size)], SR, batch_size=batch_size), dev)  # warm-up
    times = []
    with GpuUtil(dev, work) as util:
        for _ in range(repeats):
            times.append(bench.timed(lambda: model.clip_embeddings(x, SR, batch_size=batch_size), dev))
    x = None  # free the device copy before the file runs
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    best = min(times)
    return {
        "clips": n,
        "times_s": times,
        "best_s": best,
        "files_per_s": n / best,
        "audio_s_per_s": n * CLIP_SECONDS / best,
        "gpu_util": util.summary(),
    }


def measure_decode(
    paths: list[str], config: Any, device: torch.device, batch_size: int, workers: int
) -> dict[str, Any]:
    """The decoding stage of embed_files alone (``files.start_decoding``: probe, batch, decode into the workers'
    reused buffers, pin on CUDA), no model."""
    t = time.perf_counter()
    pre = files_mod.start_decoding(paths, config, device, batch_size=batch_size, num_workers=workers)
    n = n_first = 0
    t_first = None
    for groups, failures in pre.decoded():
        if t_first is None:
            t_first = time.perf_counter()
            n_first = sum(len(i) for i, _ in groups)
        n += sum(len(i) for i, _ in groups) + len(failures)
    t_end = time.perf_counter()
    w = pre.workers
    pre.close()
    wall = t_end - t
    steady = (n - n_first) / (t_end - t_first) if len(pre.batches) > 1 and t_end > t_first else None
    return {
        "files": n,
        "workers": w,
        "pinned": device.type == "cuda",
        "wall_s": wall,
        "files_per_s": n / wall,
        "steady_files_per_s": steady,
        "per_worker_files_per_s": (steady / w) if (steady and w) else None,
    }


def measure_embed_files(
    model: m2d2_embed.M2D2, folder: Path, paths: list[str], batch_size: int, workers: int, work: Path
) -> dict[str, Any]:
    dev = model.device
    warm = paths[: min(len(paths), 2 * batch_size, 64)]
    bench.timed(
        lambda: model.embed_files(
            warm, level="clip", batch_size=batch_size, num_workers=min(workers, 2), progress=False
        ),
        dev,
    )
    with GpuUtil(dev, work) as util:
        t = time.perf_counter()
        es = model.embed_files(folder, level="clip", batch_size=batch_size, num_workers=workers, progress=False)
        bench.sync(dev)
        wall = time.perf_counter() - t
    assert len(es) == len(paths) and not es.failures, (len(es), es.failures[:3])
    # steady state: files/s from the first batch's embeddings being ready to the last's (start-up excluded).
    # A batch's results come out together once it is collected (on CUDA while the next batch runs)
    t = time.perf_counter()
    pre = files_mod.start_decoding(paths, model.config, dev, batch_size=batch_size, num_workers=workers)
    first = len(pre.batches[0]) if pre.batches else 0
    ready = [
        time.perf_counter()
        for _ in files_mod.iter_file_embeddings(
            model, paths, "clip", batch_size=batch_size, progress=False, prefetch=pre
        )
    ]
    steady = None
    if 0 < first < len(ready):
        steady = (len(ready) - first) / (ready[-1] - ready[first - 1])
    n = len(paths)
    return {
        "files": n,
        "workers": workers,
        "wall_s": wall,
        "files_per_s": n / wall,
        "audio_s_per_s": n * CLIP_SECONDS / wall,
        "first_batch_s": ready[first - 1] - t if first else None,
        "batches": len(pre.batches),
        "steady_files_per_s": steady,
        "gpu_util": util.summary(),
    }


STARTUP_LINE = re.compile(r"(?:startup|cli_trace): (.+?) at (\d+\.\d+)")


def measure_cli(
    converted: Path,
    folder: Path,
    n: int,
    device: torch.device,
    batch_size: int | None,
    workers: int | None,
    dtype: str | None,
    compile_: bool,
    work: Path,
    src: Path = ROOT,
    stop: bool = False,
) -> dict[str, Any]:
    out = work / f"cli{'_compiled' if compile_ else ''}.npz"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "cli_trace.py"),
        "embed",
        str(folder),
        "-o",
        str(out),
        "--overwrite",
        "--level",
        "clip",
        "--model",
        str(converted),
        "--device",
        str(device),
        "--no-progress",
        "-vv",
    ]
    argv += ["--batch-size", str(batch_size)] if batch_size else []  # None: the CLI's defaults
    argv += ["--num-workers", str(workers)] if workers is not None else []
    argv += ["--dtype", dtype] if dtype else []
    argv += ["--compile"] if compile_ else []
    argv += ["--stop-at-first-batch"] if stop else []
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # output to files, not pipes: a run stopped at its first batch leaves decoding workers that hold them a while
    with GpuUtil(device, work) as util, open(work / "cli.out", "w+") as so, open(work / "cli.err", "w+") as se:
        t = time.perf_counter()
        spawned = time.time()
        r = subprocess.run(argv, stdout=so, stderr=se, text=True, env=env, timeout=1800)
        wall = time.perf_counter() - t
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read(), se.read()
    if r.returncode != 0:
        raise RuntimeError(f"CLI exit {r.returncode}: {stderr[-2000:]}")
    phases: dict[str, float] = {}  # seconds from the process start; the first of each name
    for m in STARTUP_LINE.finditer(stderr):
        phases.setdefault(m.group(1), float(m.group(2)) - spawned)
    if stop:
        return {"src": str(src), "time_to_first_batch_s": phases.get("first encoder call"), "phases_s": phases}
    m = re.search(r"\(([\d.]+) audio-s/s\)", stdout)
    rate = float(m.group(1)) if m else math.nan
    m2 = re.search(r"in ([\d.]+) s \(", stdout)
    embed_s = float(m2.group(1)) if m2 else math.nan
    es = m2d2_embed.read_embeddings(out)
    assert len(es) == n, (len(es), n)
    return {
        "argv": " ".join(argv[1:]),
        "src": str(src),
        "time_to_first_batch_s": phases.get("first encoder call"),  # cli_trace.py's mark: any version
        "phases_s": phases,
        "wall_s": wall,
        "files_per_s_wall": n / wall,
        "embed_s": embed_s,
        "audio_s_per_s": rate,
        "files_per_s": rate / CLIP_SECONDS,
        "stdout": stdout.strip(),
        "gpu_util": util.summary(),
    }


def measure_startup(
    converted: Path,
    folder: Path,
    n: int,
    device: torch.device,
    batch_size: int | None,
    workers: int | None,
    dtype: str | None,
    work: Path,
    srcs: list[tuple[str, Path]],
    repeats: int,
) -> dict[str, Any]:
    """Time-to-first-batch of the CLI of each source, runs stopped at the first encoder call, interleaved
    (ABBA...), ``repeats`` each: median, min and the median of each start-up phase."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in srcs}
    for k in range(repeats):
        for key, src in srcs if k % 2 == 0 else srcs[::-1]:
            r = measure_cli(converted, folder, n, device, batch_size, workers, dtype, False, work, src, stop=True)
            runs[key].append(r)
            log(f"  {key}: time-to-first-batch {_fmt(r['time_to_first_batch_s'], '.3f')} s")
    out: dict[str, Any] = {"load_average": os.getloadavg()}
    for key, src in srcs:
        ttfb = [r["time_to_first_batch_s"] for r in runs[key] if r["time_to_first_batch_s"] is not None]
        names = list(dict.fromkeys(p for r in runs[key] for p in r["phases_s"]))
        out[key] = {
            "src": str(src),
            "time_to_first_batch_s": ttfb,
            "median_s": float(np.median(ttfb)) if ttfb else None,
            "min_s": min(ttfb, default=None),
            "phases_median_s": {
                p: float(np.median([r["phases_s"][p] for r in runs[key] if p in r["phases_s"]])) for p in names
            },
        }
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str | None = None) -> str:
    """``spec``, or by default whole numbers from 100 up and three significant digits below."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if spec is None:
        spec = ".0f" if abs(v) >= 100 else ".3g"
    return format(v, spec)


def _util(r: dict[str, Any] | None) -> tuple[str, str]:
    u = (r or {}).get("gpu_util")
    return (_fmt(u["mean"]), _fmt(u["mean_busy_span"])) if u else ("-", "-")


def markdown(res: dict[str, Any]) -> str:
    mem = res.get("in_memory") or {}
    ref = mem.get("files_per_s")
    env = res["environment"]
    lines = [
        f"# files_gpu: {res['files']} x 10-s WAV, {res['device']} ({env.get('gpu') or env.get('cpu')}), "
        f"{res['dtype']}, batch {res['batch_size']}, {res['workers']} workers",
        "",
        f"torch {env.get('torch')}, Python {env.get('python')}, {os.cpu_count()} CPUs; "
        f"files written in {_fmt(res.get('write_s'), '.1f')} s; total {_fmt(res.get('total_s'), '.0f')} s",
        "",
        "| path | files/s | ratio to in-memory | GPU util % (mean) | GPU util % (busy span) | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict[str, Any] | None, fps_key: str = "files_per_s", wall_key: str = "wall_s") -> None:
        if not r:
            return
        fps = r.get(fps_key)
        ratio = _fmt(fps / ref, ".2f") if fps and ref else "-"
        u_mean, u_span = _util(r)
        lines.append(f"| {name} | {_fmt(fps)} | {ratio} | {u_mean} | {u_span} | {_fmt(r.get(wall_key), '.2f')} |")

    row("(a) in memory: clip_embeddings on a device tensor (best)", mem, wall_key="best_s")
    d = res.get("decode")
    if d:
        lines.append(
            f"| (d) decoding only, DataLoader, {d['workers']} workers (steady: "
            f"{_fmt(d.get('steady_files_per_s'))}/s) | {_fmt(d['files_per_s'])} | - | - | - | "
            f"{_fmt(d['wall_s'], '.2f')} |"
        )
    b = res.get("embed_files")
    row("(b) embed_files, wall (probe + worker start-up included)", b)
    if b:
        row(
            "(b) embed_files, steady state (first to last batch)",
            {**b, "gpu_util": None, "wall_s": None},
            fps_key="steady_files_per_s",
        )
    for key, name in [
        ("cli", "(c) CLI `m2d2-embed embed`, its own rate (embedding only)"),
        ("cli_compare", "(c) CLI of --compare-src, its own rate (embedding only)"),
        ("cli_compile", "(c) CLI with --compile, its own rate (compilation included)"),
    ]:
        r = res.get(key)
        row(name, r)
        if r:
            row(
                f"{name.split(',')[0]}, wall (interpreter + model load)",
                {**r, "gpu_util": None},
                fps_key="files_per_s_wall",
            )
    runs = [(k, r) for k, r in res.items() if k.startswith("cli") and isinstance(r, dict) and "phases_s" in r]
    if runs:
        names = list(dict.fromkeys(p for _, r in runs for p in sorted(r["phases_s"], key=r["phases_s"].get)))
        lines += [
            "",
            "CLI start-up, seconds from the process start (time-to-first-batch: the first encoder call):",
            "",
            "| run | source | time-to-first-batch | " + " | ".join(names) + " |",
            "|---|---|---:|" + "---:|" * len(names),
        ]
        for k, r in runs:
            ph = r["phases_s"]
            cells = " | ".join(_fmt(ph.get(p), ".2f") for p in names)
            lines.append(f"| {k} | {r['src']} | {_fmt(r['time_to_first_batch_s'], '.2f')} | {cells} |")
    st = res.get("startup")
    if st:
        keys = [k for k in st if isinstance(st[k], dict)]
        names = list(dict.fromkeys(p for k in keys for p in st[k]["phases_median_s"]))
        lines += [
            "",
            f"CLI time-to-first-batch (process start to the first encoder call), {res.get('cli_repeats')} interleaved "
            f"runs each, stopped there; load average {', '.join(f'{x:.1f}' for x in st['load_average'])}; phases: "
            "medians, s from the process start:",
            "",
            "| source | median s | min s | " + " | ".join(names) + " |",
            "|---|---:|---:|" + "---:|" * len(names),
        ]
        for k in keys:
            r = st[k]
            cells = " | ".join(_fmt(r["phases_median_s"].get(p), ".2f") for p in names)
            lines.append(f"| {r['src']} | {_fmt(r['median_s'], '.3f')} | {_fmt(r['min_s'], '.3f')} | {cells} |")
    if res.get("errors"):
        lines += ["", "Errors: " + ", ".join(res["errors"])]
    return "\n".join(lines) + "\n"


def save(res: dict[str, Any], out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "files_gpu.json").write_text(json.dumps(res, indent=2, default=str))
    (out / "files_gpu.md").write_text(markdown(res))


def environment(dev: torch.device) -> dict[str, Any]:
    import platform

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--files", type=int, default=4096, help="10-s WAV files to write and embed (default 4096)")
    p.add_argument(
        "--workers",
        type=int,
        default=files_mod.default_num_workers(),
        help="decoding workers (default: embed_files's, up to 8)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="chunks per batch (default 256 on CUDA; 8 on CPU, so a rehearsal has several batches)",
    )
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also run the CLI with --compile (and the in-memory "
        "path compiled, as its reference); adds the compilation time",
    )
    p.add_argument("--repeats", type=int, default=None, help="in-memory runs, best kept (default 3 CUDA, 2 CPU)")
    p.add_argument("--no-cli", action="store_true", help="skip the command-line runs")
    p.add_argument(
        "--compare-src",
        type=Path,
        default=None,
        help="also run the CLI of the package in this folder (another checkout), interleaved with this one",
    )
    p.add_argument("--cli-repeats", type=int, default=1, help="CLI runs of each source (default 1)")
    p.add_argument(
        "--startup-only",
        action="store_true",
        help="only the CLI's time-to-first-batch: --cli-repeats runs of each source, stopped at the first "
        "batch (no in-memory, decoding or embed_files stages; --workers -1: the CLI's default)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="checkpoint cache (default as bench.py)")
    p.add_argument("--tmp-dir", type=Path, default=None, help="where the WAV folder is written (default: $TMPDIR)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    dev = torch.device(a.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    bs = a.batch_size or (256 if dev.type == "cuda" else 8)
    repeats = a.repeats or (3 if dev.type == "cuda" else 2)
    res: dict[str, Any] = {
        "environment": environment(dev),
        "device": str(dev),
        "files": a.files,
        "workers": a.workers,
        "batch_size": bs,
        "dtype": a.dtype or "default",
        "args": {k: str(v) for k, v in vars(a).items()},
        "errors": {},
    }

    def section(name: str, fn) -> Any:
        log(f"[{name}] {time.perf_counter() - t0:.0f} s")
        try:
            return fn()
        except Exception:  # record and go on
            res["errors"][name] = traceback.format_exc()
            log(res["errors"][name])
            return None
        finally:
            res["total_s"] = time.perf_counter() - t0
            save(res, a.out)

    cache = a.cache_dir or bench.default_cache()
    converted = bench.ensure_converted(bench.ensure_checkpoint(cache), cache)
    res["prepare_s"] = time.perf_counter() - t0
    if a.startup_only:
        res["cli_repeats"] = a.cli_repeats
        srcs = [("cli", ROOT)] + ([("cli_compare", a.compare_src.resolve())] if a.compare_src else [])
        with tempfile.TemporaryDirectory(prefix="m2d2_files_gpu_", dir=a.tmp_dir) as tmp:
            folder = Path(tmp) / "wavs"
            folder.mkdir()
            write_files(folder, a.files, threads=min(32, 2 * (os.cpu_count() or 1)))
            workers = None if a.workers < 0 else a.workers
            res["startup"] = section(
                "startup",
                lambda: measure_startup(
                    converted, folder, a.files, dev, a.batch_size, workers, a.dtype, Path(tmp), srcs, a.cli_repeats
                ),
            )
        print(markdown(res))
        return 1 if res["errors"] else 0
    model = m2d2_embed.load(converted, device=dev, dtype=a.dtype)
    res["dtype"] = str(model.dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory(prefix="m2d2_files_gpu_", dir=a.tmp_dir) as tmp:
        work = Path(tmp)
        folder = work / "wavs"
        folder.mkdir()
        t = time.perf_counter()
        waves = write_files(folder, a.files, threads=min(32, 2 * (os.cpu_count() or 1)))
        res["write_s"] = time.perf_counter() - t
        paths = sorted(str(q) for q in folder.iterdir())
        log(f"wrote {a.files} files in {res['write_s']:.1f} s")
        res["in_memory"] = section("in_memory", lambda: measure_in_memory(model, waves, bs, repeats, work))
        waves = []  # free the host copy
        res["decode"] = section("decode", lambda: measure_decode(paths, model.config, dev, bs, a.workers))
        res["embed_files"] = section(
            "embed_files", lambda: measure_embed_files(model, folder, paths, bs, a.workers, work)
        )
        if not a.no_cli:
            srcs = [("cli", ROOT)] + ([("cli_compare", a.compare_src.resolve())] if a.compare_src else [])
            for k in range(a.cli_repeats):
                for key, src in srcs if k % 2 == 0 else srcs[::-1]:
                    name = key if k == 0 else f"{key}_{k + 1}"
                    res[name] = section(
                        name,
                        lambda src=src: measure_cli(
                            converted, folder, a.files, dev, bs, a.workers, a.dtype, False, work, src
                        ),
                    )
        if a.compile:

            def compiled_in_memory() -> dict[str, Any]:
                cm = m2d2_embed.load(converted, device=dev, dtype=a.dtype, compile=True)
                return measure_in_memory(
                    cm, [clip_int16(i, int(CLIP_SECONDS * SR)) for i in range(a.files)], bs, repeats, work
                )

            res["in_memory_compile"] = section("in_memory_compile", compiled_in_memory)
            if not a.no_cli:
                res["cli_compile"] = section(
                    "cli_compile",
                    lambda: measure_cli(converted, folder, a.files, dev, bs, a.workers, a.dtype, True, work),
                )
    res["total_s"] = time.perf_counter() - t0
    save(res, a.out)
    print(markdown(res))
    if a.compile and res.get("in_memory_compile") and res.get("cli_compile"):
        ref = res["in_memory_compile"]["files_per_s"]
        print(
            f"compiled: in memory {ref:.0f} clips/s; CLI --compile {res['cli_compile']['files_per_s']:.0f} "
            f"files/s (ratio {res['cli_compile']['files_per_s'] / ref:.2f}, compilation included)"
        )
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
