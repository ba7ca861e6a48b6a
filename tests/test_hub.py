"""load() end to end against real HTTP servers on 127.0.0.1: registry names, URLs and hf:// specs are
downloaded, verified, converted once into the cache, and loaded offline afterwards."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from http_fixtures import Blob, fake_hub
from tiny import UPSTREAM_2025, save_tiny, save_upstream

import m2d2_embed as m2d2
from m2d2_embed import registry
from m2d2_embed.download import DownloadError
from m2d2_embed.loader import cache_summary, download_model, list_models

pytestmark = pytest.mark.usefixtures("online")

REPO_ROOT = Path(__file__).resolve().parents[1]
WAVE = (0.3 * np.sin(np.linspace(0, 3000, 2 * 16000))).astype(np.float32)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release zip in the official layout (folder/checkpoint-30.pth) holding a tiny M2D2, and its model."""
    d = tmp_path_factory.mktemp("release")
    pth, model = save_upstream(d / "src", "2025")
    zpath = d / f"{UPSTREAM_2025}.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(pth, f"{UPSTREAM_2025}/checkpoint-30.pth")
        zf.writestr(f"{UPSTREAM_2025}/README.txt", "licence: evaluation only")
    sha = hashlib.sha256(pth.read_bytes()).hexdigest()
    expected = model.clip_embeddings(WAVE, sample_rate=16000)
    return {"zip": zpath.read_bytes(), "pth": pth, "sha": sha, "expected": expected}


def register(monkeypatch, server, release, sha=None, name="tiny-test"):
    server.routes[f"/v0.5.0/{UPSTREAM_2025}.zip"] = Blob(release["zip"])
    info = registry.ModelInfo(
        name,
        server.url(f"/v0.5.0/{UPSTREAM_2025}.zip"),
        f"{UPSTREAM_2025}/checkpoint-30.pth",
        sha or release["sha"],
        1,
        "tiny test model",
        "clap",
    )
    monkeypatch.setitem(registry.MODELS, name, info)
    return info


def test_registry_name_downloads_verifies_converts_and_then_loads_offline(
    monkeypatch, server, release, tmp_path, caplog
):
    info = register(monkeypatch, server, release)
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.loader"):
        model = m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    np.testing.assert_allclose(
        model.clip_embeddings(WAVE, sample_rate=16000), release["expected"], atol=1e-5
    )  # packed CPU path: float32 rounding only
    assert "Licence:" in caplog.text and registry.LICENSE_URL in caplog.text
    assert (tmp_path / "tiny-test" / "model.safetensors").is_file()
    leftover = [p.name for p in (tmp_path / "downloads").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert leftover == []  # the archive and the .pth are removed after a verified conversion
    n = len(server.gets(f"/v0.5.0/{UPSTREAM_2025}.zip"))
    again = m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path, offline=True)
    assert len(server.gets(f"/v0.5.0/{UPSTREAM_2025}.zip")) == n == 1
    np.testing.assert_allclose(
        again.clip_embeddings(WAVE, sample_rate=16000), release["expected"], atol=1e-5
    )  # packed CPU path: float32 rounding only
    listed = {m["name"]: m for m in list_models(tmp_path)}
    assert listed["tiny-test"]["cached"] and not listed["m2d2-clap-2025"]["cached"]
    summary = cache_summary(tmp_path)
    assert summary["total_bytes"] > 0 and any(e["name"] == "tiny-test" for e in summary["entries"])
    assert info.name in str(listed)


def test_keep_source_keeps_the_archive(monkeypatch, server, release, tmp_path):
    register(monkeypatch, server, release)
    download_model("tiny-test", cache_dir=tmp_path, keep_source=True, progress=False)
    assert (tmp_path / "downloads" / f"{UPSTREAM_2025}.zip").is_file()
    assert (tmp_path / "downloads" / UPSTREAM_2025 / "checkpoint-30.pth").is_file()


def test_checkpoint_hash_mismatch_is_an_error_and_nothing_is_cached(monkeypatch, server, release, tmp_path):
    register(monkeypatch, server, release, sha="0" * 64)
    with pytest.raises(DownloadError, match=f"expected {'0' * 64}, got {release['sha']}"):
        m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    assert not (tmp_path / "tiny-test").exists()


def test_offline_and_not_cached_names_the_download_command(monkeypatch, server, release, tmp_path):
    register(monkeypatch, server, release)
    monkeypatch.setenv("M2D2_EMBED_OFFLINE", "1")
    with pytest.raises(DownloadError, match="m2d2-embed download tiny-test"):
        m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    assert server.requests == []


def test_url_to_a_zip_pth_or_safetensors_loads(server, release, tmp_path):
    server.routes["/m.zip"] = Blob(release["zip"])
    server.routes["/ckpt/checkpoint-30.pth"] = Blob(release["pth"].read_bytes())
    st = m2d2.convert(release["pth"], tmp_path / "src" / "model.safetensors")
    server.routes["/model.safetensors"] = Blob(st.read_bytes())
    for path in ("/m.zip", "/ckpt/checkpoint-30.pth", "/model.safetensors"):
        model = m2d2.load(server.url(path), device="cpu", cache_dir=tmp_path / "cache")
        np.testing.assert_allclose(model.clip_embeddings(WAVE, sample_rate=16000), release["expected"], atol=1e-6)
    with pytest.raises(ValueError, match="cannot tell what"):
        m2d2.load(server.url("/weights.bin"), device="cpu", cache_dir=tmp_path)


def test_zip_without_a_checkpoint_is_a_clear_error(server, tmp_path):
    zpath = tmp_path / "empty.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("README.txt", "nothing here")
    server.routes["/empty.zip"] = Blob(zpath.read_bytes())
    with pytest.raises(DownloadError, match="holds 0 checkpoint files"):
        m2d2.load(server.url("/empty.zip"), device="cpu", cache_dir=tmp_path / "cache")


def test_404_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match="404.*/missing.zip|/missing.zip.*404"):
        m2d2.load(server.url("/missing.zip"), device="cpu", cache_dir=tmp_path)


LOAD_SCRIPT = """
import json, sys
import m2d2_embed as m2d2, numpy as np
wave = (0.3 * np.sin(np.linspace(0, 3000, 2 * 16000))).astype(np.float32)
model = m2d2.load(sys.argv[1], device="cpu", cache_dir=sys.argv[2] if len(sys.argv) > 2 else None)
print(json.dumps(model.clip_embeddings(wave, sample_rate=16000).tolist()))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "M2D2_EMBED"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


def test_two_processes_loading_the_same_url_download_once(server, release, tmp_path):
    server.routes["/m.zip"] = Blob(release["zip"], chunk_delay=0.02)
    cmd = [sys.executable, "-c", LOAD_SCRIPT, server.url("/m.zip"), str(tmp_path / "cache")]
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        np.testing.assert_allclose(json.loads(out.strip().splitlines()[-1]), release["expected"], atol=1e-6)
    assert len(server.gets("/m.zip")) == 1


def test_hf_repo_with_our_format_loads_through_huggingface_hub(server, tmp_path):
    src = save_tiny(tmp_path / "tiny", seed=3)
    files = {
        "model.safetensors": (src / "model.safetensors").read_bytes(),
        "config.json": (src / "config.json").read_bytes(),
    }
    fake_hub(server, files, repo="ntt/m2d2-tiny")
    expected = m2d2.load(src, device="cpu").clip_embeddings(WAVE, sample_rate=16000)
    env = _env(
        HF_ENDPOINT=server.url(""),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
    )
    for spec in ("hf://ntt/m2d2-tiny", "hf://ntt/m2d2-tiny/model.safetensors@main"):
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, spec], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        np.testing.assert_allclose(json.loads(proc.stdout.strip().splitlines()[-1]), expected, atol=1e-6)


GTE_SCRIPT = """
import json, sys, dataclasses
import m2d2_embed as m2d2
from m2d2_embed import registry
registry.MODELS["tiny-2024"] = registry.ModelInfo("tiny-2024", sys.argv[1], sys.argv[2], None, 1, "tiny", "clap",
                                                  text_weights="hf://thenlper/gte-base/model.safetensors")
model = m2d2.load("tiny-2024", device="cpu", cache_dir=sys.argv[3])
print(json.dumps(model.clap_text_embeddings(["a dog barks", "rain"]).tolist()))
"""


def test_2024_model_fetches_its_gte_text_encoder_from_the_hub(server, tmp_path):
    import torch
    from safetensors.torch import save_file
    from tiny import tiny_config

    from m2d2_embed.config import TextConfig
    from m2d2_embed.text import BertTextEncoder, Tokenizer

    folder = "m2d_clap_vit_base-80x608p16x16-240128"
    pth, _ = save_upstream(tmp_path / "src", "2024", folder, config=tiny_config(head="mlp", text=False, width=608))
    zpath = tmp_path / f"{folder}.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(pth, f"{folder}/checkpoint-300.pth")
    server.routes["/v0.3.0/m2d_clap.zip"] = Blob(zpath.read_bytes())
    # a GTE-like BERT (the real one is bert-base sized, mean pooling); Hub exports name keys without a prefix
    torch.manual_seed(0)
    cfg = TextConfig(hidden_size=768, num_layers=1, num_heads=12, intermediate_size=64, pooling="mean")
    gte = BertTextEncoder(cfg).eval()
    sd = {k: v for k, v in gte.state_dict().items() if not k.startswith("pooler.")}
    save_file(sd, str(tmp_path / "gte.safetensors"))
    fake_hub(server, {"model.safetensors": (tmp_path / "gte.safetensors").read_bytes()}, repo="thenlper/gte-base")
    env = _env(
        HF_ENDPOINT=server.url(""),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
    )
    args = [server.url("/v0.3.0/m2d_clap.zip"), f"{folder}/checkpoint-300.pth", str(tmp_path / "cache")]
    proc = subprocess.run(
        [sys.executable, "-c", GTE_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    ids, mask = Tokenizer().encode(["a dog barks", "rain"])
    with torch.no_grad():
        want = gte(ids, mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # offline afterwards: the converted audio side and the Hub-cached text side are both local
    env["HF_HUB_OFFLINE"] = "1"
    env["M2D2_EMBED_OFFLINE"] = "1"
    again = subprocess.run(
        [sys.executable, "-c", GTE_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr


def test_cli_download_fetches_converts_and_prints_the_path(server, release, tmp_path, capsys):
    from m2d2_embed import cli

    server.routes["/m.zip"] = Blob(release["zip"])
    cache = tmp_path / "cache"
    assert cli.main(["download", server.url("/m.zip"), "--cache-dir", str(cache), "--no-progress"]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out / "model.safetensors").is_file() and out.is_relative_to(cache)
    np.testing.assert_allclose(
        m2d2.load(out, device="cpu").clip_embeddings(WAVE, sample_rate=16000), release["expected"], atol=1e-6
    )
    assert cli.main(["download", server.url("/missing.zip"), "--cache-dir", str(cache), "--no-progress"]) != 0
    assert "404" in capsys.readouterr().err
