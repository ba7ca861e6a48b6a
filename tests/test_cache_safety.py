"""Nothing bad enters or stays in the model cache, and every damaged file gets our message, not a traceback.

Downloads go to real HTTP servers on 127.0.0.1; command-line cases run ``m2d2-embed`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from http_fixtures import Blob
from tiny import UPSTREAM_2025, save_tiny, save_upstream

import m2d2_embed as m2d2
from m2d2_embed import registry
from m2d2_embed.convert import CHECKSUM_NAME, CheckpointError, read_pth
from m2d2_embed.download import ChecksumMismatch, DownloadError
from m2d2_embed.loader import clear_cache, verify_cache

pytestmark = pytest.mark.usefixtures("online")

REPO_ROOT = Path(__file__).resolve().parents[1]
WAVE = (0.3 * np.sin(np.linspace(0, 3000, 16000))).astype(np.float32)
HTML = b"<!DOCTYPE html><html><head><title>Proxy error</title></head><body>blocked</body></html>\n" * 20


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release zip (folder/checkpoint-30.pth) of a tiny M2D2, one of another model, and expected outputs."""
    d = tmp_path_factory.mktemp("release")
    out = {}
    for seed in (0, 1):
        pth, model = save_upstream(d / f"src{seed}", "2025", seed=seed)
        zpath = d / f"{seed}" / f"{UPSTREAM_2025}.zip"
        zpath.parent.mkdir()
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.write(pth, f"{UPSTREAM_2025}/checkpoint-30.pth")
        out[seed] = {
            "zip": zpath.read_bytes(),
            "sha": hashlib.sha256(pth.read_bytes()).hexdigest(),
            "expected": model.clip_embeddings(WAVE, sample_rate=16000),
            "pth": pth,
        }
    return out


class Switch:
    """A route that serves ``bodies`` in turn (the last one from then on)."""

    def __init__(self, *bodies: bytes) -> None:
        self.blobs = [Blob(b) for b in bodies]
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            i = min(self.calls, len(self.blobs) - 1)
            if h.command == "GET":
                self.calls += 1
        self.blobs[i](h)


def register(monkeypatch, server, route, sha=None, name="tiny-test", path=f"/v0.5.0/{UPSTREAM_2025}.zip"):
    server.routes[path] = route
    info = registry.ModelInfo(name, server.url(path), f"{UPSTREAM_2025}/checkpoint-30.pth", sha, 1, "tiny", "clap")
    monkeypatch.setitem(registry.MODELS, name, info)
    return info


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".lock")


def run_cli(*args: str, env_extra: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "M2D2_EMBED"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "m2d2_embed", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


# --------------------------------------------------------------------------- bad payloads never stick


@pytest.mark.parametrize(
    ("bad", "looks_like"),
    [
        (HTML, "an HTML page"),
        (None, "a zip archive"),  # a truncated archive, served whole (its Content-Length matches what is sent)
        (b"", "empty (0 bytes)"),
    ],
)
def test_bad_payload_is_deleted_and_the_fixed_server_then_loads(
    monkeypatch, server, release, tmp_path, bad, looks_like
):
    good = release[0]["zip"]
    bad = good[: len(good) // 2] if bad is None else bad
    route = Switch(bad, good)
    info = register(monkeypatch, server, route)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        m2d2.load("tiny-test", device="cpu", cache_dir=cache)
    msg = str(e.value)
    assert info.url in msg and f"received {len(bad):,} bytes that look like {looks_like}" in msg
    assert "next call downloads it again" in msg
    assert cache_files(cache) == []  # no archive, no .sha256, no converted folder
    model = m2d2.load("tiny-test", device="cpu", cache_dir=cache)  # the server is fixed: no manual step
    np.testing.assert_allclose(
        model.clip_embeddings(WAVE, sample_rate=16000), release[0]["expected"], atol=1e-5
    )  # packed CPU path: float32 rounding only
    assert route.calls == 2


def test_bad_payload_from_a_url_is_deleted_too(server, release, tmp_path):
    server.routes["/ckpt/checkpoint-30.pth"] = route = Switch(HTML, release[0]["pth"].read_bytes())
    url = server.url("/ckpt/checkpoint-30.pth")
    with pytest.raises(DownloadError, match="did not give a valid checkpoint: received .* an HTML page"):
        m2d2.load(url, device="cpu", cache_dir=tmp_path)
    assert cache_files(tmp_path) == []
    m2d2.load(url, device="cpu", cache_dir=tmp_path)
    assert route.calls == 2


def test_pinned_mismatch_is_downloaded_again_once(monkeypatch, server, release, tmp_path, caplog):
    route = Switch(release[1]["zip"], release[0]["zip"])  # another release first, then the right one
    register(monkeypatch, server, route, sha=release[0]["sha"])
    model = m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    np.testing.assert_allclose(
        model.clip_embeddings(WAVE, sample_rate=16000), release[0]["expected"], atol=1e-5
    )  # packed CPU path: float32 rounding only
    assert route.calls == 2 and "downloading again once" in caplog.text


def test_persistent_pinned_mismatch_fails_clearly_and_leaves_nothing(monkeypatch, server, release, tmp_path):
    route = Switch(release[1]["zip"])
    register(monkeypatch, server, route, sha=release[0]["sha"])
    with pytest.raises(ChecksumMismatch, match=f"expected {release[0]['sha']}, got {release[1]['sha']}.*twice"):
        m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    assert route.calls == 2 and cache_files(tmp_path) == []


def test_hash_is_recorded_only_after_conversion(monkeypatch, server, release, tmp_path):
    from m2d2_embed.loader import download_model

    register(monkeypatch, server, Switch(release[0]["zip"]))
    download_model("tiny-test", cache_dir=tmp_path, keep_source=True, progress=False)
    archive = tmp_path / "downloads" / f"{UPSTREAM_2025}.zip"
    assert (
        archive.with_name(archive.name + ".sha256").read_text().split()[0]
        == hashlib.sha256(release[0]["zip"]).hexdigest()
    )
    assert (tmp_path / "tiny-test" / CHECKSUM_NAME).is_file()


# --------------------------------------------------------------------------- clearing and verifying the cache


def test_cache_clear_one_entry_or_all(monkeypatch, server, release, tmp_path):
    register(monkeypatch, server, Switch(release[0]["zip"]))
    m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("not ours")  # --clear leaves what the package did not make
    removed = clear_cache("tiny-test", tmp_path)
    assert tmp_path / "tiny-test" in removed and not (tmp_path / "tiny-test").exists()
    with pytest.raises(ValueError, match="'nope' is not in the cache"):
        clear_cache("nope", tmp_path)
    m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)  # downloads again
    env = {"M2D2_EMBED_CACHE": str(tmp_path)}
    proc = run_cli("cache", "--clear", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _cached_model(monkeypatch, server, release, tmp_path) -> Path:
    register(monkeypatch, server, Switch(release[0]["zip"]))
    m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path)
    return tmp_path / "tiny-test" / "model.safetensors"


def _nan_in_place(weights: Path) -> None:
    """Overwrite the first float32 values of the encoder's patch projection with NaN, size unchanged."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())  # noqa: SIM118
    assert "encoder.patch_embed.proj.weight" in names
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    import json

    header = json.loads(weights.read_bytes()[8 : 8 + header_len])
    start = 8 + header_len + header["encoder.patch_embed.proj.weight"]["data_offsets"][0]
    with open(weights, "r+b") as f:
        f.seek(start)
        f.write(np.full(64, np.nan, dtype=np.float32).tobytes())


def test_nan_flipped_cached_weights_are_refused_naming_the_fix(monkeypatch, server, release, tmp_path):
    weights = _cached_model(monkeypatch, server, release, tmp_path)
    _nan_in_place(weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is damaged.*SHA-256.*cache --clear tiny-test"):
        m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path, offline=True)
    (weights.parent / CHECKSUM_NAME).unlink()  # no record (an older cache): the values themselves are checked
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights in 1 tensors \(encoder\.patch_embed"):
        m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path, offline=True)


def test_cache_verify_hashes_everything_and_exits_1_when_damaged(monkeypatch, server, release, tmp_path):
    weights = _cached_model(monkeypatch, server, release, tmp_path)
    env = {"M2D2_EMBED_CACHE": str(tmp_path)}
    ok = run_cli("cache", "--verify", env_extra=env)
    assert ok.returncode == 0 and "ok       tiny-test" in ok.stdout, ok.stdout + ok.stderr
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # a flipped bit; then the original mtime back, so only a full hash can tell
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_cache(tmp_path)[0]["ok"] is False
    bad = run_cli("cache", "--verify", env_extra=env)
    assert bad.returncode == 1 and "DAMAGED  tiny-test" in bad.stdout and "cache --clear tiny-test" in bad.stdout


def test_copied_cache_is_hashed_once_then_trusted(monkeypatch, server, release, tmp_path):
    weights = _cached_model(monkeypatch, server, release, tmp_path)
    os.utime(weights, ns=(1, 1))  # a copy without preserved times: same bytes, new mtime
    m2d2.load("tiny-test", device="cpu", cache_dir=tmp_path, offline=True)
    import json

    assert json.loads((weights.parent / CHECKSUM_NAME).read_text())["mtime_ns"] == 1  # re-recorded


# --------------------------------------------------------------------------- damaged files: our message, no traceback


def _wav(tmp_path: Path) -> Path:
    p = tmp_path / "a.wav"
    sf.write(p, WAVE, 16000)
    return p


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_safetensors_gives_our_message_in_the_cli(tmp_path, damage):
    src = save_tiny(tmp_path / "model")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": HTML}[damage])
    proc = run_cli("embed", str(_wav(tmp_path)), "--model", str(src), "-o", str(tmp_path / "out.npz"))
    assert proc.returncode != 0
    assert f"{weights} is damaged" in proc.stderr and "m2d2-embed convert" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "SafetensorError" not in proc.stderr


def test_single_safetensors_file_damaged_is_our_error(tmp_path):
    st = tmp_path / "m.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="m.safetensors is damaged or not a safetensors file"):
        m2d2.load(st, device="cpu")


class _Evil:
    pass


@pytest.mark.parametrize("kind", ["legacy-object", "zip-object", "plain-pickle", "html", "empty"])
def test_refused_pth_never_suggests_turning_safety_off(tmp_path, kind):
    path = tmp_path / "checkpoint-300.pth"
    if kind == "legacy-object":
        torch.save({"model": {}, "x": _Evil()}, path, _use_new_zipfile_serialization=False)
    elif kind == "zip-object":
        torch.save({"model": {}, "x": _Evil()}, path)
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"model": {"a": [1, 2]}, "x": _Evil()}))
    elif kind == "html":
        path.write_bytes(HTML)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        read_pth(path)
    msg = str(e.value)
    assert str(path) in msg and "weights_only" not in msg and "will likely succeed" not in msg
    expected = {
        "legacy-object": "Python objects",
        "zip-object": "Python objects",
        "plain-pickle": "Python objects",
        "html": "an HTML page",
        "empty": "empty (0 bytes)",
    }[kind]
    assert expected in msg


def test_refused_pth_in_the_cli_is_one_clear_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Evil()}, path, _use_new_zipfile_serialization=False)
    proc = run_cli("embed", str(_wav(tmp_path)), "--model", str(path), "-o", str(tmp_path / "out.npz"))
    assert proc.returncode != 0 and "was not loaded" in proc.stderr
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the default model cannot be downloaded


def test_default_model_download_failure_says_how_to_work_without_it(monkeypatch, server, tmp_path):
    info = registry.MODELS[registry.DEFAULT_MODEL]
    monkeypatch.setitem(
        registry.MODELS,
        info.name,
        registry.ModelInfo(
            info.name, server.url("/gone.zip"), info.member, info.sha256, 1, "", "clap", config=info.config
        ),
    )
    with pytest.raises(DownloadError) as e:
        m2d2.load(device="cpu", cache_dir=tmp_path)
    msg = str(e.value)
    for part in (
        "404",
        "--model PATH",
        "m2d2_embed.load(PATH)",
        f"m2d2-embed download {info.name}",
        "M2D2_EMBED_CACHE",
        "m2d2-embed cache",
    ):
        assert part in msg, part


def test_default_model_offline_in_the_cli_says_how_to_work_without_it(tmp_path):
    proc = run_cli(
        "embed",
        str(_wav(tmp_path)),
        "-o",
        str(tmp_path / "out.npz"),
        env_extra={"M2D2_EMBED_CACHE": str(tmp_path / "empty"), "M2D2_EMBED_OFFLINE": "1"},
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    for part in ("--model PATH", "m2d2_embed.load(PATH)", "m2d2-embed download m2d2-clap-2025", "M2D2_EMBED_CACHE"):
        assert part in proc.stderr, (part, proc.stderr)


def test_cache_entry_without_a_record_is_checked_and_recorded_on_first_load(monkeypatch, server, release, tmp_path):
    weights = _cached_model(monkeypatch, server, release, tmp_path)
    (weights.parent / CHECKSUM_NAME).unlink()  # converted by an older version
    monkeypatch.setenv("M2D2_EMBED_CACHE", str(tmp_path))
    m2d2.load("tiny-test", device="cpu", offline=True)
    import json

    rec = json.loads((weights.parent / CHECKSUM_NAME).read_text())
    assert rec["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() and rec["size"] == weights.stat().st_size
