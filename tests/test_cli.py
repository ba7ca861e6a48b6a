"""The `m2d2-embed` command line, run for real in a subprocess on generated audio (tiny model), plus in-process
checks of the commands that need the network or a deterministic interruption."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from audio_files import BAD, good_paths, make_clip_folder
from cli_run import run, start

import m2d2_embed as m2d2
from m2d2_embed import cli, files


def test_embed_folder_to_npz_with_failures_sidecar(folder, tiny_model_dir, model, tmp_path):
    out = tmp_path / "emb.npz"
    r = run(
        "embed", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--num-workers", "1", "--batch-size", "2"
    )
    assert r.returncode == 1, r.stderr  # some files failed
    assert "4 files embedded, 0 skipped (already done), 4 failed" in r.stdout
    assert "audio-s/s" in r.stdout
    assert "corrupt.wav" in r.stderr and "emb.failures.jsonl" in r.stderr
    es = m2d2.read_embeddings(out)
    assert es.paths == good_paths(folder)
    ref = model.embed_files(folder, num_workers=0, progress=False)
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5)
    assert es.metadata["model_source"] == str(tiny_model_dir) and es.metadata["level"] == "clip"
    failed = [json.loads(line) for line in (tmp_path / "emb.failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failed) == sorted(BAD)
    assert all(f["error"] for f in failed)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind

    # an existing output is refused without --overwrite, before the model loads
    r = run("embed", str(folder), "-o", str(out), "--model", "no-such-model")
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr
    r = run(
        "embed", *good_paths(folder), "-o", str(out), "--model", str(tiny_model_dir), "--overwrite", "--level", "frame"
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "emb.failures.jsonl").exists()  # the stale sidecar is gone
    es = m2d2.read_embeddings(out)
    assert es.level == "frame" and len(es.timestamps) == 4


def test_bad_inputs_fail_fast_with_a_clear_message(folder, tmp_path, capsys):
    # each of these is refused before the (nonexistent) model would load
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["embed", str(folder), "-o", str(tmp_path / "missing" / "x.npz")], "does not exist"),
        (["embed", str(folder), "--glob", "*.mp3", "-o", str(tmp_path / "x.npz")], "no files match --glob"),
        (["embed", str(empty), "-o", str(tmp_path / "x.npz")], "is empty"),
        (["embed", str(folder / "nope.wav"), "-o", str(tmp_path / "x.npz")], "no such file or folder"),
        (["embed", str(folder), "-o", str(tmp_path / "x.npz"), "--format", "parquet"], "does not match"),
        (["zero-shot", str(folder), "--labels", " , "], "--labels is empty"),
        (["text", "-o", str(tmp_path / "t.npy")], "no texts given"),
    ]
    for argv, message in cases:
        assert cli.main([*argv, "--model", "no-such-model"]) == 2, argv
        assert message in capsys.readouterr().err
    r = run(*cases[0][0], "--model", "no-such-model")
    assert r.returncode == 2 and "does not exist" in r.stderr and "mkdir -p" in r.stderr
    r = run(*cases[1][0], "--model", "no-such-model")
    assert r.returncode == 2 and "no files match --glob '*.mp3'" in r.stderr
    r = run(*cases[2][0], "--model", "no-such-model")
    assert r.returncode == 2 and "is empty" in r.stderr
    r = run("embed", str(folder), "-o", str(tmp_path / "x.npz"), "--model", "no-such-model")
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr


def test_directory_output_resumes_after_an_interruption(folder, tiny_model_dir, tmp_path, model):
    many = make_clip_folder(tmp_path / "many", 40)
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
    ]
    proc = start(*args)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("part-*.npz")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 130:
        assert "run the same command again" in err
        n_first = len(list(out.glob("part-*.npz")))
        assert 0 < n_first < 40
    r = run(*args)
    assert r.returncode == 0, r.stderr
    es = m2d2.read_embeddings(out)
    assert es.paths == sorted(str(p) for p in many.glob("*.wav"))  # nothing lost, nothing duplicated
    ref = model.embed_files(many, num_workers=0, progress=False)
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5)
    # a third run has nothing left to do
    r = run(*args)
    assert r.returncode == 0 and "0 files embedded, 40 skipped" in r.stdout


def test_interrupted_directory_output_keeps_finished_shards(folder, tiny_model_dir, tmp_path, monkeypatch, capsys):
    real = files.iter_file_embeddings

    def stop_after_two(*a, **kw):
        for n, item in enumerate(real(*a, **kw)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    out = tmp_path / "out"
    args = [
        "embed",
        *good_paths(folder),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--num-workers",
        "0",
        "--shard-size",
        "1",
    ]
    monkeypatch.setattr(files, "iter_file_embeddings", stop_after_two)
    assert cli.main(args) == 130
    assert "2 of 4 files are saved" in capsys.readouterr().err
    assert len(m2d2.read_embeddings(out)) == 2
    # a temporary file of a write that never finished is cleaned up and ignored
    (out / ".part-00009.npz.abc.tmp").write_bytes(b"partial")
    monkeypatch.setattr(files, "iter_file_embeddings", real)
    assert cli.main(args) == 0
    assert "2 files embedded, 2 skipped" in capsys.readouterr().out
    assert m2d2.read_embeddings(out).paths == good_paths(folder)
    assert not list(out.glob(".*tmp*"))
    # other settings are refused, --overwrite starts over
    assert cli.main([*args, "--level", "frame"]) == 2
    assert "other settings (level: 'clip' there, 'frame' now)" in capsys.readouterr().err
    assert cli.main([*args, "--level", "frame", "--overwrite", "--shard-size", "10"]) == 0
    assert [p.name for p in sorted(out.iterdir())] == [".lock", "manifest.json", "part-00000.npz"]
    # a folder that is not an m2d2-embed output is never written into
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert (
        cli.main(["embed", *good_paths(folder), "-o", str(other), "--model", str(tiny_model_dir), "--overwrite"]) == 2
    )
    assert "not an m2d2-embed output" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_directory_output_in_other_formats(folder, tiny_model_dir, tmp_path, fmt, capsys):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "d"
    argv = [
        "embed",
        *good_paths(folder),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--format",
        fmt,
        "--level",
        "frame",
        "--shard-size",
        "3",
        "--num-workers",
        "0",
    ]
    assert cli.main(argv) == 0
    es = m2d2.read_embeddings(out)
    assert es.paths == good_paths(folder) and es.level == "frame"
    assert len(list(out.glob(f"part-*.{fmt}"))) == 2
    assert cli.main(argv) == 0
    assert "0 files embedded, 4 skipped" in capsys.readouterr().out


def test_strict_stops_at_the_first_failure(folder, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = ["embed", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--strict", "--num-workers", "0"]
    assert cli.main(argv) == 1
    assert "--strict" in capsys.readouterr().err
    assert not out.exists()


def test_zero_shot_prints_a_table_and_json(folder, tiny_model_dir, model):
    wavs = good_paths(folder)[:2]
    r = run(
        "zero-shot", *wavs, "--labels", "dog,rain", "--labels", "speech", "--top-k", "2", "--model", str(tiny_model_dir)
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2"] and len(lines) == 4
    assert Path(wavs[0]).name in lines[2]
    assert (
        cli.main(
            [
                "zero-shot",
                *wavs,
                str(folder / "corrupt.wav"),
                "--labels",
                "dog,rain,speech",
                "--json",
                "--model",
                str(tiny_model_dir),
                "--num-workers",
                "0",
            ]
        )
        == 1
    )
    # JSON scores equal the Python API
    r = run("zero-shot", *wavs, "--labels", "dog,rain,speech", "--json", "--model", str(tiny_model_dir))
    res = json.loads(r.stdout)
    got = np.array([[row["scores"][lab] for lab in ["dog", "rain", "speech"]] for row in res["results"]])
    a = model.clap_audio_embeddings(wavs, normalize=True)
    t = model.clap_text_embeddings([f"{lab} can be heard" for lab in ["dog", "rain", "speech"]], normalize=True).numpy()
    z = (a @ t.T) / 0.01
    want = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), atol=1e-4)


def test_text_writes_npy_with_a_sidecar(tiny_model_dir, model, tmp_path):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("rain on a roof\n\n")
    out = tmp_path / "text.npy"
    r = run("text", "a dog barks", "--from-file", str(texts_file), "-o", str(out), "--model", str(tiny_model_dir))
    assert r.returncode == 0, r.stderr
    emb = np.load(out)
    side = json.loads((tmp_path / "text.json").read_text())
    assert side["texts"] == ["a dog barks", "rain on a roof"] and side["metadata"]["level"] == "text"
    np.testing.assert_allclose(emb, model.clap_text_embeddings(side["texts"]).numpy(), atol=1e-5)
    back = m2d2.read_embeddings(out)
    assert back.paths == side["texts"] and back.embeddings.shape == (2, 64)
    assert cli.main(["text", "again", "-o", str(out), "--model", str(tiny_model_dir)]) == 2


def test_convert_download_list_cache(tmp_path, monkeypatch, capsys):
    from tiny import save_upstream

    from m2d2_embed import loader as hub

    pth, _ = save_upstream(tmp_path)
    dst = tmp_path / "conv"
    assert cli.main(["convert", str(pth), str(dst)]) == 0
    assert (dst / "model.safetensors").exists() and m2d2.load(dst, device="cpu").audio_proj is not None
    assert cli.main(["convert", str(pth), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    calls = {}

    def fake_download(name, *, cache_dir=None, progress=None, keep_source=False):
        calls.update(name=name, cache_dir=cache_dir, progress=progress, keep_source=keep_source)
        return tmp_path / "cache" / name

    monkeypatch.setattr(hub, "download_model", fake_download)
    assert (
        cli.main(
            ["download", "m2d2-clap-2025", "--cache-dir", str(tmp_path / "cache"), "--keep-source", "--no-progress"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / "cache" / "m2d2-clap-2025")
    assert calls == {
        "name": "m2d2-clap-2025",
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        "keep_source": True,
    }

    assert cli.main(["list", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "m2d2-clap-2025 (default)" in out and "licence" in out
    assert cli.main(["list", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} >= {"m2d2-clap-2025"}
    (tmp_path / "cache" / "m2d2-clap-2025").mkdir(parents=True)
    (tmp_path / "cache" / "m2d2-clap-2025" / "model.safetensors").write_bytes(b"x" * 2048)
    assert cli.main(["cache", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "m2d2-clap-2025" in out and "2.0 KB" in out and "rm -r" in out


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0
    for command in ["embed", "zero-shot", "text", "convert", "download", "list", "cache"]:
        assert command in r.stdout
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2


def test_compile_reaches_load_for_embed_and_zero_shot_and_is_refused_with_int8(
    folder, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from m2d2_embed import loader

    real, seen = loader.load, []

    def recording_load(*a, compile=False, **kw):
        seen.append(compile)
        return real(*a, **kw)  # the encoder itself is not compiled: this checks the option's path, fast

    monkeypatch.setattr(loader, "load", recording_load)
    wav = good_paths(folder)[0]
    common = ["--model", str(tiny_model_dir), "--num-workers", "0", "--no-progress"]
    assert cli.main(["embed", wav, "-o", str(tmp_path / "a.npz"), *common, "--compile"]) == 0
    assert cli.main(["embed", wav, "-o", str(tmp_path / "b.npz"), *common]) == 0
    assert cli.main(["zero-shot", wav, "--labels", "dog,rain", *common, "--compile"]) == 0
    assert cli.main(["text", "a dog", "-o", str(tmp_path / "t.npy"), "--model", str(tiny_model_dir)]) == 0
    assert seen == [True, False, True, False]
    capsys.readouterr()
    assert cli.main(["embed", wav, "-o", str(tmp_path / "c.npz"), *common, "--compile", "--dtype", "int8"]) == 2
    assert "--compile does not work with --dtype int8" in capsys.readouterr().err
    assert len(seen) == 4  # refused before loading
    assert "--compile" in run("embed", "--help").stdout
    # --devices workers get the option too
    argv = cli.worker_argv(["embed", wav, "-o", "x.npz", "--compile", "--devices", "cpu,cpu"], 0, 2, "cpu", False)
    assert "--compile" in argv and "--devices" not in argv and argv[argv.index("--device") + 1] == "cpu"
