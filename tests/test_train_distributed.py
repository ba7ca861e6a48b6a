"""Two processes under torchrun (gloo, CPU): the all-gather InfoNCE equals one process, and DDP training
keeps both ranks' parameters identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import get_synth

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_process_torchrun_run_agrees_across_ranks(tmp_path_factory, tmp_path):
    ds = get_synth(tmp_path_factory)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).parent / "train_fixtures.py"),
        str(ds.root),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["world"] == 2 and r["step"] == 3
        assert r["loss_err"] < 1e-5, "mean of per-process all-gather losses = single-process loss"
        assert r["grad_err"] < 1e-6, "mean of per-process gradients = single-process gradient"
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a), "ranks disagree on the parameters after DDP training"
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")
def test_two_process_gradient_ratios_of_the_gather_modes(tmp_path):
    """DDP-averaged gradients over 2 gloo processes / one process on the whole batch, for (audio, text,
    temperature): "exact" 1/1/1; "upstream" (upstream M2D-CLAP's gather without gradient) 0.5/0.5/1;
    "local" negatives differ, so the ratios are not a multiple (only the value is reported)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    script = str(Path(__file__).parent / "train_fixtures.py")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", script, "ratios", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(2):
        res = json.loads((tmp_path / f"ratios{r}.json").read_text())
        ex, up = res["exact"], res["upstream"]
        assert ex["residual"] < 1e-5 and up["residual"] < 1e-5, res
        assert (ex["audio"], ex["text"], ex["scale"]) == pytest.approx((1.0, 1.0, 1.0), abs=1e-5)
        assert (up["audio"], up["text"], up["scale"]) == pytest.approx((0.5, 0.5, 1.0), abs=1e-5)
        assert res["local"]["residual"] > 1e-3, "local negatives should not give a multiple of the global gradient"
