"""`m2d2-embed embed --devices` / `--shard I/N` and `m2d2-embed merge`: the split, the merge, resuming, and the
hand-off of `m2d2-embed train` (tiny model, generated audio)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from audio_files import BAD
from audio_files import signal as make_signal
from cli_run import run

import m2d2_embed as m2d2
from m2d2_embed import cli, files


@pytest.fixture(scope="module")
def single(folder, tiny_model_dir, tmp_path_factory) -> m2d2.EmbeddingSet:
    """The output of one worker (directory output), the reference for the sharded runs."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert (
        cli.main(
            [
                "embed",
                str(folder),
                "-o",
                str(out),
                "--model",
                str(tiny_model_dir),
                "--num-workers",
                "0",
                "--no-progress",
            ]
        )
        == 1
    )  # the broken files fail
    return m2d2.read_embeddings(out)


def assert_same(es: m2d2.EmbeddingSet, ref: m2d2.EmbeddingSet) -> None:
    assert es.paths == ref.paths
    np.testing.assert_allclose(np.asarray(es.embeddings), np.asarray(ref.embeddings), atol=2e-5)
    assert sorted(f.path for f in es.failures) == sorted(f.path for f in ref.failures)
    assert sorted(Path(f.path).name for f in es.failures) == sorted(BAD)


def embed_args(folder: Path, out: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "embed",
        str(folder),
        "-o",
        str(out),
        "--model",
        str(model_dir),
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_two_cpu_devices_give_the_embeddings_of_one_worker(folder, tiny_model_dir, single, tmp_path):
    out = tmp_path / "out"
    r = run("embed", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--devices", "cpu,cpu")
    assert r.returncode == 1, r.stderr  # the broken files fail, as with one worker
    assert "[shard 0/2]" in r.stdout and "[shard 1/2]" in r.stdout
    assert "merged shard(s) 0/2, 1/2" in r.stdout
    es = m2d2.read_embeddings(out)
    assert_same(es, single)
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "failures.jsonl",
        "manifest.json",
        "part-00000.npz",
        "part-00001.npz",
    ]  # shards merged and gone
    # run again: every file is done already; nothing is embedded or duplicated
    r = run("embed", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--devices", "cpu,cpu")
    assert r.returncode == 1, r.stderr  # the broken files are tried again
    assert "[shard 0/2]: 0 files embedded, 3 skipped" in r.stdout
    assert m2d2.read_embeddings(out).paths == single.paths


def test_shards_split_the_sorted_list_round_robin_and_merge_as_each_completes(
    folder, tiny_model_dir, single, tmp_path, capsys
):
    out = tmp_path / "out"
    everything = sorted(files.collect_files(folder))
    assert cli.main(embed_args(folder, out, tiny_model_dir, "--shard", "1/2")) == 1
    assert "merged shard(s) 1/2" in capsys.readouterr().out
    part = m2d2.read_embeddings(out)  # shard 1 is readable in OUT already
    assert part.paths == [p for p in everything[1::2] if p in single.paths]
    assert cli.main(embed_args(folder, out, tiny_model_dir, "--shard", "0/2")) == 1
    assert_same(m2d2.read_embeddings(out), single)
    assert not (out / "shards").exists()


def test_frame_level_parquet_shards_with_no_merge_then_the_merge_command(folder, tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    ref_out = tmp_path / "ref"
    argv = ["--level", "frame", "--format", "parquet", "--shard-size", "1"]
    assert cli.main(embed_args(folder, ref_out, tiny_model_dir, *argv)) == 1
    ref = m2d2.read_embeddings(ref_out)
    out = tmp_path / "out"
    for i in range(3):
        assert cli.main(embed_args(folder, out, tiny_model_dir, *argv, "--shard", f"{i}/3", "--no-merge")) == 1
    assert m2d2.read_embeddings(out).paths == []  # nothing merged yet
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000-of-00003", "00001-of-00003", "00002-of-00003"]
    capsys.readouterr()
    assert cli.main(["merge", str(out)]) == 0
    assert "merged shard(s) 0/3, 1/3, 2/3" in capsys.readouterr().out
    es = m2d2.read_embeddings(out)
    assert es.level == "frame" and es.paths == ref.paths
    for a, b, ta, tb in zip(es.embeddings, ref.embeddings, es.timestamps, ref.timestamps):
        np.testing.assert_allclose(a, b, atol=2e-5)
        np.testing.assert_array_equal(ta, tb)
    assert cli.main(["merge", str(out)]) == 0
    assert "no shards to merge" in capsys.readouterr().out


def test_a_file_output_is_written_once_all_shards_are_complete(folder, tiny_model_dir, single, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    assert cli.main(embed_args(folder, out, tiny_model_dir, "--shard", "0/2")) == 1
    assert "waits for shard(s) 1/2" in capsys.readouterr().out
    assert not out.exists()
    assert cli.main(["merge", str(out)]) == 1  # shard 1 has not run
    assert "--shard i/n" in capsys.readouterr().err
    assert cli.main(embed_args(folder, out, tiny_model_dir, "--shard", "1/2")) == 1
    es = m2d2.read_embeddings(out)  # rows sorted by path, failures from the sidecar
    assert_same(es, single)
    assert not (tmp_path / "emb.npz.shards").exists()
    failed = [json.loads(line)["path"] for line in (tmp_path / "emb.failures.jsonl").read_text().splitlines()]
    assert sorted(Path(p).name for p in failed) == sorted(BAD)
    # a merged file output is final: a worker refuses to start over it
    assert cli.main(embed_args(folder, out, tiny_model_dir, "--shard", "0/2")) == 2
    assert "exists" in capsys.readouterr().err


def test_an_interrupted_shard_resumes_and_nothing_is_duplicated(
    folder, tiny_model_dir, single, tmp_path, monkeypatch, capsys
):
    real = files.iter_file_embeddings

    def stop_after_one_embedded(*a, **kw):  # the first item is the 0-byte file failing
        for n, item in enumerate(real(*a, **kw)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    out = tmp_path / "out"
    argv = embed_args(folder, out, tiny_model_dir, "--shard", "0/2", "--shard-size", "1")
    monkeypatch.setattr(files, "iter_file_embeddings", stop_after_one_embedded)
    assert cli.main(argv) == 130
    shard = out / "shards" / "00000-of-00002"
    assert not (shard / "complete.json").exists() and len(list(shard.glob("part-*.npz"))) == 1
    monkeypatch.setattr(files, "iter_file_embeddings", real)
    assert cli.main(embed_args(folder, out, tiny_model_dir, "--shard", "1/2")) == 1
    assert "waiting for 0/2" in capsys.readouterr().out  # shard 1 merged; shard 0 is not complete
    assert cli.main(argv) == 1
    assert "1 skipped (already done)" in capsys.readouterr().out
    assert_same(m2d2.read_embeddings(out), single)


def test_bad_split_options_are_refused_before_the_model_loads(folder, tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["--shard", "2/2"], "0 <= I < N"),
        (["--shard", "a/b"], "expected I/N"),
        (["--devices", "cpu,gpu"], "expected devices"),
        (["--devices", "cpu,cpu", "--shard", "0/2"], "do not go together"),
        (["--devices", "cpu,cpu", "--device", "cpu"], "not both"),
        (["--no-merge"], "applies to --shard"),
        (["--shard", "0/2", "--overwrite"], "--overwrite does not go with --shard"),
    ]
    for extra, message in cases:
        assert cli.main(["embed", str(folder), "-o", out, "--model", "no-such-model", *extra]) == 2, extra
        assert message in capsys.readouterr().err


def test_train_hands_the_rest_of_the_command_line_to_the_training_cli(monkeypatch, capsys):
    import m2d2_embed.train.__main__ as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "main", lambda argv, prog: seen.append((argv, prog)) or 7)
    assert cli.main(["train", "stage1", "--config", "c.json", "--set", "train.epochs=1"]) == 7
    assert seen == [(["stage1", "--config", "c.json", "--set", "train.epochs=1"], "m2d2-embed train")]
    monkeypatch.undo()
    assert cli.main(["train", "--help"]) == 0
    assert "stage1" in capsys.readouterr().out
    assert "train" in cli.build_parser().format_help()


@pytest.mark.parametrize("output", ["emb.npz", "emb_dir"])
def test_warnings_of_the_shards_survive_the_merge(tiny_model_dir, tmp_path, output):
    # a truncated file is embedded with a warning in its shard's sidecar; the merged output keeps it
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(src / name, make_signal(2.0, 16000, 1, 1), 16000, subtype="PCM_16")
    cut = src / "b.wav"  # the header still promises 2 s; 0.5 s of samples are left
    cut.write_bytes(cut.read_bytes()[: 44 + 2 * 8000])
    out = tmp_path / output
    for i in range(2):
        assert cli.main(embed_args(src, out, tiny_model_dir, "--shard", f"{i}/2")) == 0
    es = m2d2.read_embeddings(out)
    assert [Path(p).name for p in es.paths] == ["a.wav", "b.wav", "c.wav"] and not es.failures
    assert [(Path(w.path).name, w.kind) for w in es.warnings] == [("b.wav", "warning")]
    assert "truncated file" in es.warnings[0].reason
