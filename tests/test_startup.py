"""Start-up of the file pipeline: the files are probed and their decoding starts before the model loads (the CLI),
with the same results, order, failures and resumption as before."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import numpy as np
from audio_files import BAD, good_paths, make_clip_folder

import m2d2_embed as m2d2
from m2d2_embed import cli, files, loader

PHASES = [
    "files listed",
    "files probed",
    "decoding started",
    "model loading",
    "model loaded",
    "first batch decoded",
    "first batch in the encoder",
    "decoding finished",
    "last batch out",
    "output written",
]


def test_the_cli_decodes_while_the_model_loads(folder, tiny_model_dir, model, tmp_path, monkeypatch):
    phases: list[str] = []
    workers_during_load: list[int] = []
    monkeypatch.setattr(files, "startup_mark", phases.append)
    real_load = loader.load

    def load(*args, **kw):
        workers_during_load.append(len(multiprocessing.active_children()))  # the decoding workers, already running
        return real_load(*args, **kw)

    monkeypatch.setattr(loader, "load", load)
    out = tmp_path / "emb.npz"
    argv = ["embed", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--batch-size", "1"]
    assert cli.main([*argv, "--num-workers", "2", "--no-progress"]) == 1  # the BAD files fail
    assert [p for p in phases if p in PHASES] == PHASES  # probed and decoding before the model loads; then the end
    assert workers_during_load == [2]
    es = m2d2.read_embeddings(out)
    ref = model.embed_files(folder, num_workers=0, progress=False)
    assert es.paths == ref.paths == good_paths(folder)  # same files, same order
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5)
    assert sorted(Path(f.path).name for f in es.failures) == sorted(BAD)  # failures still listed

    # --num-workers 0: decoded inline, after the model has loaded; the same embeddings
    phases.clear()
    assert cli.main([*argv, "--num-workers", "0", "--no-progress", "--overwrite"]) == 1
    assert phases.index("first batch decoded") > phases.index("model loaded")
    np.testing.assert_allclose(m2d2.read_embeddings(out).embeddings, ref.embeddings, atol=2e-5)


def test_resuming_decodes_only_the_files_left(tiny_model_dir, model, tmp_path, monkeypatch, capsys):
    many = make_clip_folder(tmp_path / "many", 12)
    out = tmp_path / "out"
    common = ["-o", str(out), "--model", str(tiny_model_dir), "--batch-size", "2", "--num-workers", "1"]
    first = sorted(str(p) for p in many.glob("*.wav"))[:5]
    assert cli.main(["embed", *first, *common, "--no-progress"]) == 0
    started: list[list[str]] = []
    real = files.start_decoding

    def record(paths, *args, **kw):
        started.append(list(paths))
        return real(paths, *args, **kw)

    monkeypatch.setattr(files, "start_decoding", record)
    assert cli.main(["embed", str(many), *common, "--no-progress"]) == 0
    assert "7 files embedded, 5 skipped (already done)" in capsys.readouterr().out
    assert started == [sorted(str(p) for p in many.glob("*.wav"))[5:]]
    es = m2d2.read_embeddings(out)
    ref = model.embed_files(many, num_workers=0, progress=False)
    assert es.paths == ref.paths
    np.testing.assert_allclose(es.embeddings, ref.embeddings, atol=2e-5)


def test_a_prefetch_gives_the_results_of_none_and_one_that_does_not_fit_is_started_again(model, folder):
    paths = files.collect_files(folder)

    def run(**kw) -> dict[str, object]:
        return dict(files.iter_file_embeddings(model, paths, batch_size=2, num_workers=1, progress=False, **kw))

    plain = run()
    fits = files.start_decoding(paths, model.config, "cpu", batch_size=2, num_workers=1)
    misfit = files.start_decoding(paths, model.config, "cpu", batch_size=3, num_workers=1)
    assert fits.fits(paths, model.config, model.device, 2) and not misfit.fits(paths, model.config, model.device, 2)
    for got in (run(prefetch=fits), run(prefetch=misfit)):
        assert sorted(got) == sorted(plain)
        for i, r in plain.items():
            assert type(got[i]) is type(r)
            if isinstance(r, files.FileResult):
                np.testing.assert_allclose(got[i].embedding, r.embedding, atol=2e-5)
            else:
                assert got[i].reason == r.reason


def test_peek_config_reads_the_config_of_local_weights_only(tiny_model_dir, model, tmp_path):
    assert loader.peek_config(tiny_model_dir) == model.config
    assert loader.peek_config(tiny_model_dir / "model.safetensors") == model.config
    assert loader.peek_config(tmp_path / "missing") is None
    assert loader.peek_config("https://example.org/model.safetensors") is None
    (tmp_path / "checkpoint-30.pth").write_bytes(b"not read")
    assert loader.peek_config(tmp_path / "checkpoint-30.pth") is None


def test_startup_marks_are_debug_lines_with_wall_clock_times(caplog):
    with caplog.at_level(logging.DEBUG, logger="m2d2_embed.startup"):
        files.startup_mark("files listed")
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "m2d2_embed.startup"]
    assert msg.startswith("startup: files listed at ") and "after the process started" in msg
