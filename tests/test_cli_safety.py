"""Everyday mistakes on the command line give a clear error or the right answer (issue 17: items 1, 10, 11, 13,
14, 15), run for real in subprocesses (tiny model, generated audio)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_files import good_paths, make_clip_folder
from audio_files import signal as make_signal
from cli_run import ENV, ROOT, run, start

import m2d2_embed as m2d2
from m2d2_embed import outputs


def test_a_second_run_on_the_same_output_directory_is_refused_and_nothing_is_duplicated(tiny_model_dir, tmp_path):
    many = make_clip_folder(tmp_path / "many", 30)
    out = tmp_path / "out"
    args = [
        "embed",
        str(many),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--shard-size",
        "1",
        "--batch-size",
        "1",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    first = start(*args)
    deadline = time.time() + 90
    while time.time() < deadline and not list(out.glob("part-*.npz")) and first.poll() is None:
        time.sleep(0.01)
    assert first.poll() is None, "the first run finished before it could be paused; make it longer"
    first.send_signal(signal.SIGSTOP)  # paused in the middle of its work: it still holds the directory
    try:
        second = run(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    out1, err1 = first.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 2, second.stderr
    assert "another m2d2-embed run is writing to" in second.stderr and "wait for it to finish" in second.stderr
    assert "30 files embedded" in out1
    es = m2d2.read_embeddings(out)
    assert es.paths == sorted(str(p) for p in many.glob("*.wav"))  # each file once
    # once the first has finished, the same command has nothing left to do
    again = run(*args)
    assert again.returncode == 0 and "0 files embedded, 30 skipped" in again.stdout


def test_read_embeddings_returns_each_path_of_a_directory_once(tmp_path):
    def part(paths: list[str], value: float) -> outputs.EmbeddingSet:
        return outputs.EmbeddingSet(
            paths,
            np.full((len(paths), 4), value, np.float32),
            "clip",
            None,
            np.ones(len(paths)),
            [],
            {"model": "m", "dim": 4},
        )

    d = outputs.OutputDir(tmp_path / "out", "npz")
    with d.open():
        d.start({"model": "m", "dim": 4, "level": "clip", "format": "npz"})
        d.add_part(part(["b.wav", "a.wav"], 1.0))
        d.add_part(part(["a.wav", "c.wav"], 2.0))  # as two unlocked runs of an older version left it
    es = m2d2.read_embeddings(tmp_path / "out")
    assert es.paths == ["a.wav", "b.wav", "c.wav"]
    np.testing.assert_array_equal(es.embeddings[:, 0], [1.0, 1.0, 2.0])  # a.wav from the first part


def test_resume_recognises_the_same_files_under_another_spelling(folder, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    common = ["-o", str(out), "--model", str(tiny_model_dir), "--num-workers", "0", "--no-progress"]
    rel = os.path.relpath(folder, tmp_path)
    r = run("embed", rel, *common, cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # the broken files fail
    assert "4 files embedded" in r.stdout
    r = run("embed", str(folder.resolve()), *common, cwd=tmp_path)  # absolute now
    assert "0 files embedded, 4 skipped (already done)" in r.stdout, r.stdout + r.stderr
    es = m2d2.read_embeddings(out)
    assert len(es.paths) == 4 and all(not os.path.isabs(p) for p in es.paths)  # the spelling first given


def test_an_output_with_an_unknown_suffix_is_refused(folder, tiny_model_dir, tmp_path):
    wav = good_paths(folder)[0]
    common = ["--model", str(tiny_model_dir), "--num-workers", "0", "--no-progress"]
    r = run("embed", wav, "-o", str(tmp_path / "x.txt"), *common)
    assert r.returncode == 2 and "not an output format" in r.stderr and "ending in /" in r.stderr, r.stderr
    assert not (tmp_path / "x.txt").exists()
    r = run("embed", wav, "-o", str(tmp_path / "y.txt") + "/", *common)  # asked for a directory: taken
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "y.txt" / "manifest.json").exists()
    r = run("embed", wav, "-o", str(tmp_path / "y.txt"), *common)  # an existing directory: taken
    assert r.returncode == 0 and "0 files embedded, 1 skipped" in r.stdout, r.stderr


def test_unsupported_files_in_a_folder_are_counted_and_listed_with_verbose(folder, tiny_model_dir, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    sf.write(mixed / "a.wav", make_signal(0.5, 16000, 1, 0), 16000)
    for name in ("b.m4a", "c.m4a", "notes.txt"):
        (mixed / name).write_bytes(b"not read")
    common = ["--model", str(tiny_model_dir), "--num-workers", "0", "--no-progress"]
    r = run("embed", str(mixed), "-o", str(tmp_path / "e.npz"), *common)
    assert r.returncode == 0, r.stderr
    assert "3 other files skipped: unsupported format, see --glob" in r.stdout
    assert "b.m4a" not in r.stderr
    r = run("embed", str(mixed), "-o", str(tmp_path / "e.npz"), "--overwrite", "-v", *common)
    for name in ("b.m4a", "c.m4a", "notes.txt"):
        assert str(mixed / name) in r.stderr
    # with --glob the user chose what to take: nothing is reported as unsupported
    r = run("embed", str(mixed), "-o", str(tmp_path / "e.npz"), "--overwrite", "--glob", "*.wav", *common)
    assert r.returncode == 0 and "skipped: unsupported" not in r.stdout


def test_one_file_embedded_is_said_in_the_singular(folder, tiny_model_dir, tmp_path):
    r = run(
        "embed",
        good_paths(folder)[0],
        "-o",
        str(tmp_path / "one.npz"),
        "--model",
        str(tiny_model_dir),
        "--num-workers",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "1 file embedded," in r.stdout and "1 files" not in r.stdout


def test_list_into_a_closed_pipe_exits_quietly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2d2_embed", "list", "--cache-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    proc.stdout.close()  # the reader is gone before anything is written, as `| head -1` after its line
    _, err = proc.communicate(timeout=60)
    assert b"Broken pipe" not in err and b"Traceback" not in err and b"Exception" not in err, err
    assert proc.returncode == 141
    # and as a user types it
    r = subprocess.run(
        f"{sys.executable} -m m2d2_embed list --cache-dir {tmp_path} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert r.stdout.startswith("name") and r.stderr == ""


def test_train_help_names_the_command_as_typed():
    r = run("train", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: m2d2-embed train"), r.stdout[:200]
    r = run("train", "--set", "x=1")  # options before the stage reach the training CLI, which explains
    assert r.returncode == 2 and "m2d2-embed train" in r.stderr


def test_readme_says_to_install_cpu_torch_before_the_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set up") : readme.index("\n## ", readme.index("## Set up") + 1)]
    note = setup.index("CPU build of PyTorch")
    assert note < setup.index("pip install . && m2d2-embed embed") and note < setup.index('pip install -e ".[test]"')


@pytest.mark.parametrize("output", ["emb.npz", "emb_dir"])
def test_a_truncated_wav_is_embedded_with_a_warning_in_the_sidecar(tiny_model_dir, tmp_path, output):
    src = tmp_path / "in"
    src.mkdir()
    whole = src / "whole.wav"
    sf.write(whole, make_signal(5.0, 16000, 1, 1), 16000, subtype="PCM_16")
    cut = src / "cut.wav"  # the header still promises 5 s; 0.69 s of samples are left
    cut.write_bytes(whole.read_bytes()[: 44 + 2 * int(0.69 * 16000)])
    out = tmp_path / output
    r = run("embed", str(src), "-o", str(out), "--model", str(tiny_model_dir), "--num-workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr  # a warning, not a failure
    assert "2 files embedded" in r.stdout and "0 failed" in r.stdout
    assert f"warning: {cut}: truncated file: its header promises 5.00 s of audio but it holds 0.69 s" in r.stderr
    es = m2d2.read_embeddings(out)
    assert sorted(Path(p).name for p in es.paths) == ["cut.wav", "whole.wav"] and not es.failures
    assert [(Path(w.path).name, w.kind) for w in es.warnings] == [("cut.wav", "warning")]
    assert es.durations[es.paths.index(str(cut))] == pytest.approx(0.69, abs=1e-3)
