"""The download layer against real HTTP servers on 127.0.0.1 (threads running ``http.server``).

Nothing here mocks the code under test: every download goes over a socket to a ``ThreadingHTTPServer``
that records what it was asked. The Hugging Face part runs ``huggingface_hub`` in a subprocess whose
``HF_ENDPOINT`` points at a tiny fake Hub, so the library reads it the way it would in real use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from http_fixtures import COMMIT, Blob, FakeServer, fake_hub, redirect_to

from m2d2_embed.download import (
    DownloadError,
    HFSpec,
    cache_dir,
    download_url,
    extract_member,
    hf_download,
    is_offline,
    parse_hf_spec,
    sha256_file,
)

pytestmark = pytest.mark.usefixtures("online")

REPO_ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: crosses the 1 MiB read chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = dict(progress=False, backoff=0.01, timeout=10)


# --------------------------------------------------------------------------- servers


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in {".part", ".tmp"})


# --------------------------------------------------------------------------- settings


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "m2d2_embed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "m2d2_embed"
    monkeypatch.setenv("M2D2_EMBED_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert not any(p.exists() for p in (tmp_path / "home", tmp_path / "xdg", tmp_path / "env", tmp_path / "arg"))


def test_is_offline_explicit_argument_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_offline() and not is_offline(False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("M2D2_EMBED_OFFLINE", "true")
    assert is_offline()
    monkeypatch.setenv("M2D2_EMBED_OFFLINE", "0")
    assert not is_offline() and is_offline(True)


def test_sha256_file_streams_and_matches_hashlib(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert sha256_file(tmp_path / "f", chunk=1000) == PAYLOAD_SHA


# --------------------------------------------------------------------------- download_url


def test_download_verifies_pinned_sha_and_leaves_no_temp_files(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    dest = tmp_path / "sub" / "w.bin"
    assert download_url(server.url("/w.bin"), dest, sha256=PAYLOAD_SHA.upper(), **FAST) == dest
    assert dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == []
    assert not (dest.parent / "w.bin.sha256").exists()  # pinned: nothing to record


def test_progress_bar_path_downloads_too(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    dest = download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, progress=True)
    assert dest.read_bytes() == PAYLOAD


def test_404_fails_at_once_naming_url_and_status(server: FakeServer, tmp_path: Path) -> None:
    url = server.url("/missing.bin")
    with pytest.raises(DownloadError, match=r"404") as e:
        download_url(url, tmp_path / "m.bin", **FAST)
    assert url in str(e.value)
    assert len(server.gets("/missing.bin")) == 1
    assert not (tmp_path / "m.bin").exists()


def test_403_fails_at_once(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/private.bin"] = Blob(PAYLOAD, fail_first=(403,) * 5)
    with pytest.raises(DownloadError, match=r"HTTP 403 .*private\.bin"):
        download_url(server.url("/private.bin"), tmp_path / "p.bin", **FAST)
    assert len(server.gets("/private.bin")) == 1


def test_server_errors_are_retried_then_succeed(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD, fail_first=(500, 503))
    dest = download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.gets("/w.bin")) == 3


def test_retries_are_bounded(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD, fail_first=(502,) * 10)
    with pytest.raises(DownloadError, match=r"after 3 attempts.*502"):
        download_url(server.url("/w.bin"), tmp_path / "w.bin", retries=2, **FAST)
    assert len(server.gets("/w.bin")) == 3
    assert not (tmp_path / "w.bin").exists()
    assert leftovers(tmp_path) == []


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    s = FakeServer()
    url = s.url("/w.bin")
    s.close()  # nothing listens on that port any more
    with pytest.raises(DownloadError, match=r"could not download .* after 2 attempts"):
        download_url(url, tmp_path / "w.bin", retries=1, **FAST)


def test_cut_connection_resumes_with_range_and_hashes_whole_file(server: FakeServer, tmp_path: Path) -> None:
    cut = 300_000
    server.routes["/w.bin"] = Blob(PAYLOAD, cut_first_at=cut)
    dest = download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
    assert dest.read_bytes() == PAYLOAD
    gets = server.gets("/w.bin")
    assert len(gets) == 2
    assert "Range" not in gets[0]
    assert gets[1]["Range"] == f"bytes={cut}-"
    assert gets[1]["If-Range"] == '"v1"'


def test_cut_connection_without_range_support_restarts_from_zero(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD, ranges=False, cut_first_at=300_000)
    dest = download_url(server.url("/w.bin"), tmp_path / "w.bin", **FAST)  # recorded-hash mode
    assert dest.read_bytes() == PAYLOAD
    assert len(server.gets("/w.bin")) == 2  # the server answered 200 to the Range request
    assert (tmp_path / "w.bin.sha256").read_text().split()[0] == PAYLOAD_SHA


def test_part_file_from_earlier_run_is_resumed_when_hash_is_pinned(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD[:1000])
    download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert [h.get("Range") for h in server.gets("/w.bin")] == ["bytes=1000-"]


def test_stale_part_of_another_file_is_discarded_after_mismatch(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    (tmp_path / "w.bin.part").write_bytes(b"x" * 1000)  # not a prefix of PAYLOAD
    download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert [h.get("Range") for h in server.gets("/w.bin")] == ["bytes=1000-", None]


def test_checksum_mismatch_reports_both_hashes_and_leaves_nothing(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    wrong = "0" * 64
    with pytest.raises(DownloadError) as e:
        download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=wrong, **FAST)
    assert wrong in str(e.value) and PAYLOAD_SHA in str(e.value)
    assert not (tmp_path / "w.bin").exists()
    assert leftovers(tmp_path) == []


def test_malformed_pinned_sha_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 hex"):
        download_url("http://127.0.0.1:9/x", tmp_path / "x", sha256="abc", **FAST)


def test_redirect_to_another_host_is_followed(server: FakeServer, tmp_path: Path) -> None:
    cdn = FakeServer()
    try:
        cdn.routes["/blob/w.bin"] = Blob(PAYLOAD)
        server.routes["/releases/w.bin"] = redirect_to(cdn.url("/blob/w.bin", host="localhost"))
        dest = download_url(server.url("/releases/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
        assert dest.read_bytes() == PAYLOAD
        assert len(cdn.gets("/blob/w.bin")) == 1
        assert cdn.gets("/blob/w.bin")[0]["Host"] == f"localhost:{cdn.port}"
    finally:
        cdn.close()


def test_existing_good_file_makes_no_request(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    (tmp_path / "w.bin").write_bytes(PAYLOAD)
    download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
    assert server.requests == []


def test_existing_corrupt_file_is_downloaded_again_with_warning(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    (tmp_path / "w.bin").write_bytes(PAYLOAD[:-1] + b"!")
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.download"):
        download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert len(server.gets("/w.bin")) == 1


def test_recorded_hash_is_written_then_detects_tampering(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    dest = tmp_path / "w.bin"
    download_url(server.url("/w.bin"), dest, **FAST)
    assert (tmp_path / "w.bin.sha256").read_text() == f"{PAYLOAD_SHA}  w.bin\n"
    download_url(server.url("/w.bin"), dest, **FAST)
    assert len(server.gets("/w.bin")) == 1  # second call verified against the record
    dest.write_bytes(b"tampered")
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.download"):
        download_url(server.url("/w.bin"), dest, **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert any("corrupt" in r.getMessage() and "recorded" in r.getMessage() for r in caplog.records)
    assert len(server.gets("/w.bin")) == 2


def test_offline_missing_file_names_it_and_the_hint(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD)
    monkeypatch.setenv("M2D2_EMBED_OFFLINE", "1")
    hint = "run `m2d2-embed download m2d2-clap` while online"
    with pytest.raises(DownloadError, match="offline") as e:
        download_url(server.url("/w.bin"), tmp_path / "w.bin", hint=hint, **FAST)
    assert str(tmp_path / "w.bin") in str(e.value) and hint in str(e.value)
    (tmp_path / "w.bin").write_bytes(PAYLOAD)
    assert download_url(server.url("/w.bin"), tmp_path / "w.bin", sha256=PAYLOAD_SHA, **FAST).exists()
    assert server.requests == []


def _download_in_child(url: str, dest: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait(timeout=30)
    download_url(url, dest, sha256=PAYLOAD_SHA, progress=False, timeout=10)


def test_two_processes_share_one_download(server: FakeServer, tmp_path: Path) -> None:
    server.routes["/w.bin"] = Blob(PAYLOAD, chunk_delay=0.03)  # ~0.5 s: the processes overlap
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    dest = tmp_path / "w.bin"
    procs = [ctx.Process(target=_download_in_child, args=(server.url("/w.bin"), str(dest), barrier)) for _ in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


# --------------------------------------------------------------------------- zip


def test_extract_member_writes_only_that_member_atomically(tmp_path: Path) -> None:
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m2d2/checkpoint-30.pth", PAYLOAD)
        zf.writestr("m2d2/README.txt", b"readme")
    dest = tmp_path / "out" / "weights.pth"
    assert extract_member(archive, "m2d2/checkpoint-30.pth", dest) == dest
    assert sha256_file(dest) == PAYLOAD_SHA
    assert sorted(p.name for p in dest.parent.iterdir()) == ["weights.pth"]


def test_missing_member_lists_the_first_twenty_members(tmp_path: Path) -> None:
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(25):
            zf.writestr(f"file{i:02d}.txt", b"x")
    with pytest.raises(DownloadError, match=r"no member 'weights\.pth'.*holds 25") as e:
        extract_member(archive, "weights.pth", tmp_path / "w.pth")
    assert "file00.txt" in str(e.value) and "file19.txt" in str(e.value) and "5 more" in str(e.value)
    assert "file20.txt" not in str(e.value)
    assert not (tmp_path / "w.pth").exists()


@pytest.mark.parametrize("member", ["../evil", "a/../../evil", "/etc/evil", "C:/evil", "..\\evil"])
def test_zip_slip_member_is_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"evil")
    with pytest.raises(DownloadError, match="refusing zip member"):
        extract_member(archive, member, tmp_path / "out" / "evil")
    assert not (tmp_path / "out").exists()


def test_damaged_archive_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DownloadError, match="damaged"):
        extract_member(tmp_path / "bad.zip", "x", tmp_path / "x")


# --------------------------------------------------------------------------- Hugging Face Hub


def test_parse_hf_spec() -> None:
    assert parse_hf_spec("hf://o/r") == HFSpec("o/r", None, None)
    assert parse_hf_spec("hf://o/r@v1") == HFSpec("o/r", None, "v1")
    assert parse_hf_spec("hf://o/r/a/b.pth@refs/pr/1") == HFSpec("o/r", "a/b.pth", "refs/pr/1")
    for bad in ("o/r", "hf://o", "hf://o/r@", "hf://o/r/../x"):
        with pytest.raises(ValueError):
            parse_hf_spec(bad)


HUB_FILES = {"config.json": b'{"dim": 768}', "weights/model.bin": PAYLOAD}


HUB_SCRIPT = """
import json, sys
from m2d2_embed.download import DownloadError, hf_download
out = {}
out["file"] = str(hf_download("hf://ntt/m2d2-test/weights/model.bin"))
out["snapshot"] = str(hf_download("hf://ntt/m2d2-test@main"))
out["offline_cached"] = str(hf_download("hf://ntt/m2d2-test/config.json", offline=True))
try:
    hf_download("hf://ntt/m2d2-test/absent.bin")
except DownloadError as e:
    out["absent"] = str(e)
print(json.dumps(out))
"""


def test_hf_download_through_fake_hub_in_subprocess(server: FakeServer, tmp_path: Path) -> None:
    fake_hub(server, HUB_FILES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "M2D2_EMBED"))}
    env.update(
        HF_ENDPOINT=server.url(""),
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_XET="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    file, snapshot = Path(out["file"]), Path(out["snapshot"])
    assert file.read_bytes() == PAYLOAD and file.is_relative_to(tmp_path / "hub")
    assert snapshot.is_dir() and snapshot.name == COMMIT
    assert (snapshot / "config.json").read_bytes() == HUB_FILES["config.json"]
    assert (snapshot / "weights" / "model.bin").read_bytes() == PAYLOAD
    assert Path(out["offline_cached"]).read_bytes() == HUB_FILES["config.json"]
    assert "absent.bin" in out["absent"]
    paths = [urlsplit(p).path for _, p, _ in server.requests]
    assert any(p.endswith("/resolve/main/weights/model.bin") for p in paths)
    assert any(p.startswith("/api/models/ntt/m2d2-test/") for p in paths)


def test_hf_download_offline_and_missing_names_it_and_the_hint(tmp_path: Path) -> None:
    hint = "run `m2d2-embed download m2d2-clap` while online"
    with pytest.raises(DownloadError, match="offline mode is on") as e:
        hf_download("hf://ntt/never-cached/model.bin", cache_dir=tmp_path, offline=True, hint=hint)
    assert "hf://ntt/never-cached/model.bin" in str(e.value) and hint in str(e.value)
    with pytest.raises(DownloadError, match="offline mode is on"):
        hf_download("hf://ntt/never-cached", cache_dir=tmp_path, offline=True, hint=hint)
