"""Every benchmark script still runs: each one end to end with tiny counts on the CPU, as a user runs it.

GPU time is scarce and a benchmark that breaks is found only when it is run (``write_outputs.py`` and
``breakdown.py`` both broke unnoticed that way), so each script runs here in a subprocess, on the session's
seed-0 checkpoint (the cache the scripts share), and what it reports is checked for shape and sense. No
timing is asserted: the numbers of a tiny run on a shared CPU mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def env(parity_checkpoint) -> dict[str, str]:
    """The scripts' environment: this checkout on the import path; their cache holds the session's checkpoint
    (``bench.ensure_checkpoint`` finds it there), and the first script to need it adds the conversion."""
    cache = parity_checkpoint.parents[1]
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "M2D2_BENCH_CACHE": str(cache),
        "OUT": "",
    }


def script(env: dict[str, str], name: str, *args: str, timeout: float = 300) -> str:
    """Run ``benchmarks/NAME ARGS``; fail with its output unless it exits 0; return stdout + stderr."""
    cmd = ["bash", str(BENCH / name)] if name.endswith(".sh") else [sys.executable, str(BENCH / name)]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{out[-4000:]}"
    return out


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def _cosines(tree) -> list[float]:
    if isinstance(tree, dict):
        return [c for v in tree.values() for c in _cosines(v)]
    return [float(tree)] if isinstance(tree, (int, float)) else []


@pytest.mark.parametrize("frames", [0, 3])
def test_write_outputs(env, tmp_path, frames):
    out = tmp_path / "r.json"
    script(env, "write_outputs.py", "--files", "40", "--dim", "8", "--batch", "8", "--rounds", "1",
           "--frames", str(frames), "--format", "npy" if frames else "npz", "--dir", str(tmp_path),
           "--compare-src", str(ROOT), "--json", str(out))  # fmt: skip
    r = json.loads(out.read_text())
    for side in ("this", "compare"):
        assert positive(r[side]["add_s"], r[side]["file_s"], r[side]["set_s"], r[side]["rss_peak_mb"])
        assert len(r[side]["rounds"]) == 1


def test_read_outputs(env, tmp_path):
    out = tmp_path / "r.json"
    script(env, "read_outputs.py", "--files", "300", "--dim", "16", "--part", "64", "--shards", "3", "--rounds", "1",
           "--dir", str(tmp_path), "--compare-src", str(ROOT), "--json", str(out))  # fmt: skip
    r = json.loads(out.read_text())
    for side in ("this", "compare"):
        for what in ("read", "merge"):
            (run,) = r[side][what]["rounds"]
            assert run["files"] == 300 and positive(run["s"], run["rss_peak_mb"])
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the inputs went with their temporary folder


def test_decode_files(env, tmp_path):
    out = tmp_path / "r.json"
    script(env, "decode_files.py", "--files", "12", "--batch", "4", "--workers", "1", "--rounds", "1",
           "--folder", str(tmp_path / "wavs"), "--compare-src", str(ROOT), "--json", str(out))  # fmt: skip
    r = json.loads(out.read_text())
    assert len(list((tmp_path / "wavs").glob("*.wav"))) == 12
    for side in ("this", "compare"):
        (run,) = r[side]["runs"]
        assert run["files"] == 12 and run["workers"] == 1
        assert positive(run["files_per_s"], run["tail_s"], run["files_per_s_to_closed"])
    assert "avx2" in r["isa_flags"]["present"] + r["isa_flags"]["absent"]


def test_bench(env, tmp_path):
    out = tmp_path / "r.json"
    # --no-agreement: bench.agreement runs in the gpu_check rehearsal below
    script(env, "bench.py", "--device", "cpu", "--clips", "1", "--clips-60s", "1", "--repeats", "1",
           "--no-agreement", "--json", str(out), "--markdown", str(tmp_path / "r.md"))  # fmt: skip
    r = json.loads(out.read_text())
    rows = r["throughput"]
    assert {row["clips"] for row in rows} == {"10 s", "60 s"}
    assert any(row["variant"].startswith("reference strategy") for row in rows)
    assert all(positive(row["clips_per_s"]) for row in rows)
    assert r["load"] and all(positive(x["load_s"]) for x in r["load"]), r["load"]  # the fresh-process loads
    assert "| " in (tmp_path / "r.md").read_text()


def test_breakdown(env):
    out = script(env, "breakdown.py", "--device", "cpu", "--dtype", "fp32", "--clips", "2", "--batch-size", "2",
                 "--repeats", "1")  # fmt: skip
    stages = [line for line in out.splitlines() if line.rstrip().endswith("clips/s)")]
    assert len(stages) == 5 and "frame_embeddings (whole call)" in stages[-1], out


def test_convert_memory(env):
    out = script(env, "convert_memory.py", "--cache-dir", env["M2D2_BENCH_CACHE"])
    assert "convert:" in out and "peak RSS" in out and "x the weights" in out, out


def test_long_file_memory(env):
    out = script(env, "long_file_memory.py", "--minutes", "0.2", "--cache-dir", env["M2D2_BENCH_CACHE"])
    rows = [line for line in out.splitlines() if line.startswith("| ") and "GiB" not in line and "---" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["load only", "clip_embeddings(path)", "clap_audio_embeddings(path)", "frame_embeddings(path)",
                     "embed_files([path])"], out  # fmt: skip


def test_files_gpu_rehearsal_on_cpu(env, tmp_path):
    script(env, "files_gpu.py", "--device", "cpu", "--files", "8", "--workers", "1", "--repeats", "1",
           "--compare-src", str(ROOT), "--out", str(tmp_path))  # fmt: skip
    r = json.loads((tmp_path / "files_gpu.json").read_text())
    assert r["errors"] == {}, r["errors"]
    assert r["in_memory"]["clips"] == r["decode"]["files"] == r["embed_files"]["files"] == 8
    cli = r["cli"] if isinstance(r["cli"], list) else [r["cli"]]
    assert cli and all(positive(c["time_to_first_batch_s"]) for c in cli), cli
    assert (tmp_path / "files_gpu.md").read_text().strip()


def test_gpu_check_rehearsal_on_cpu(env, tmp_path):
    # --budget-s 0: the optional sections (encoder variants, long file) are left out
    script(env, "gpu_check.py", "--smoke", "--device", "cpu", "--no-compile", "--fp8-emulate", "--clips", "1",
           "--clips-60s", "0", "--budget-s", "0", "--work-dir", env["M2D2_BENCH_CACHE"],
           "--out", str(tmp_path))  # fmt: skip
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["parity_ok"] is True, r["parity"]
    assert not {k: v for k, v in r["errors"].items() if not v.startswith("skipped")}, r["errors"]
    assert all(0.99 < c <= 1.0 + 1e-9 for c in _cosines(r["agreement"])), r["agreement"]
    assert r["fp8_agreement"] and all(0.99 < c <= 1.0 + 1e-9 for c in _cosines(r["fp8_agreement"]))  # emulated
    assert any("fp8" in row["variant"] for row in r["throughput"]), [row["variant"] for row in r["throughput"]]
    assert (tmp_path / "gpu_check.md").read_text().strip()


def test_cpu_backends(env, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "r.json"
    script(env, "cpu_backends.py", "--rounds", "1", "--batches", "1", "--no-compile", "--no-bf16",
           "--cache-dir", env["M2D2_BENCH_CACHE"], "--json", str(out), timeout=600)  # fmt: skip
    r = json.loads(out.read_text())
    names = {row["contender"] for row in r["rows"]}
    assert any("ONNX Runtime" in n for n in names) and any("int8" in n for n in names), names
    assert all(positive(row["median_s"]) for row in r["rows"])
    assert r["targets"], r


def test_gpu_all_rehearses_its_decode_step(env, tmp_path):
    steps = {"STEPS": "decode", "OUT": str(tmp_path), "DECODE_BEFORE": str(ROOT)}
    out = script({**env, **steps}, "gpu_all.sh", "--rehearse")
    assert "decode_files exit 0" in out and "decode_files (unpinned) exit 0" in out, out
    assert json.loads((tmp_path / "decode_files.json").read_text())["compare"]["runs"]


def test_gpu_all_refuses_an_unknown_argument(env):
    r = subprocess.run(["bash", str(BENCH / "gpu_all.sh"), "--rehears"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown argument --rehears" in r.stderr
