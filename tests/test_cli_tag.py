"""`m2d2-embed tag`: a table of the top classes per file, events with --frames, JSON, and -o through the output
formats of `embed` (tiny model with a classifier head, generated audio)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from audio_files import good_paths
from cli_run import run
from tiny import save_tiny, tiny_config

import m2d2_embed as m2d2
from m2d2_embed import cli
from m2d2_embed.config import ClassifierConfig
from m2d2_embed.model import detect_events

LABELS = ("dog", "rain", "speech", "music")


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> Path:
    cfg = dataclasses.replace(tiny_config(), classifier=ClassifierConfig(in_features=64, num_classes=4, labels=LABELS))
    return save_tiny(tmp_path_factory.mktemp("tagger") / "tiny-tagger", cfg)


@pytest.fixture(scope="module")
def tagger(tagger_dir):
    return m2d2.load(tagger_dir, device="cpu", dtype=torch.float32)


def common(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--num-workers", "0", "--no-progress"]


def test_tag_prints_the_top_classes_of_each_file(folder, tagger_dir, tagger):
    r = run("tag", str(folder), "--top-k", "2", *common(tagger_dir))
    assert r.returncode == 1, r.stderr  # the broken files of the folder fail, the others are tagged
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["file", "top-1", "top-2"] and len(lines) == 2 + 4
    assert "4 files embedded" in r.stderr and "corrupt.wav" in r.stderr  # the summary keeps stdout a table
    for wav in good_paths(folder):
        scores = np.asarray(tagger.tag(wav))
        best = [LABELS[j] for j in np.argsort(-scores)[:2]]
        row = next(line for line in lines if Path(wav).name in line)
        assert row.index(best[0] + " (") < row.index(best[1] + " (")


def test_tag_json_scores_and_threshold_follow_the_python_api(folder, tagger_dir, tagger, capsys):
    wavs = good_paths(folder)
    assert cli.main(["tag", *wavs, "--json", "--top-k", "4", *common(tagger_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [row["path"] for row in res["results"]] == wavs
    for row, wav in zip(res["results"], wavs):
        want = np.asarray(tagger.tag(wav))
        got = {t["label"]: t["score"] for t in row["top"]}
        np.testing.assert_allclose([got[lab] for lab in LABELS], want, atol=1e-4)
        assert [t["label"] for t in row["top"]] == [LABELS[j] for j in np.argsort(-want)]
    cut = float(np.median([t["score"] for row in res["results"] for t in row["top"]]))
    assert cli.main(["tag", *wavs, "--json", "--top-k", "4", "--threshold", str(cut), *common(tagger_dir)]) == 0
    kept = json.loads(capsys.readouterr().out)["results"]
    for row, full in zip(kept, res["results"]):
        assert [t["label"] for t in row["top"]] == [t["label"] for t in full["top"] if t["score"] >= cut]


def test_tag_frames_gives_the_events_of_detect_events(folder, tagger_dir, tagger, capsys):
    wav = good_paths(folder)[1]  # 3.3 s
    frames = np.asarray(tagger.frame_tags(wav))
    threshold = float(np.median(frames))
    n = int(round(3.3 * tagger.sample_rate))
    want = detect_events(frames, tagger.frame_timestamps(n), list(LABELS), threshold, tagger.frame_hop_seconds)
    assert want  # the median leaves events to find
    assert cli.main(["tag", wav, "--frames", "--threshold", str(threshold), "--json", *common(tagger_dir)]) == 0
    res = json.loads(capsys.readouterr().out)
    got = res["results"][0]["events"]
    assert [e["label"] for e in got] == [e["label"] for e in want]
    np.testing.assert_allclose(
        [[e["onset"], e["offset"], e["score"]] for e in got],
        [[e["onset"], e["offset"], e["score"]] for e in want],
        atol=1e-4,
    )
    assert cli.main(["tag", wav, "--frames", "--threshold", str(threshold), *common(tagger_dir)]) == 0
    table = capsys.readouterr().out
    assert wav in table and f"{want[0]['onset']:8.2f} {want[0]['offset']:8.2f}" in table


@pytest.mark.parametrize("frames", [False, True], ids=["tags", "frame_tags"])
def test_tag_output_is_written_in_the_formats_of_embed(folder, tagger_dir, tagger, tmp_path, frames, capsys):
    wavs = good_paths(folder)[:2]
    out = tmp_path / ("scores/" if frames else "scores.npz")
    argv = ["tag", *wavs, "-o", str(out), *common(tagger_dir), *(["--frames"] if frames else [])]
    assert cli.main(argv) == 0
    es = m2d2.read_embeddings(out)
    assert es.level == ("frame_tags" if frames else "tags") and es.paths == wavs
    assert es.metadata["labels"] == list(LABELS) and es.dim == len(LABELS)
    for got, wav in zip(es.embeddings, wavs):
        np.testing.assert_allclose(got, np.asarray(tagger.frame_tags(wav) if frames else tagger.tag(wav)), atol=1e-4)
    if frames:
        assert len(es.timestamps[0]) == len(es.embeddings[0])
        assert cli.main(argv) == 0  # a directory resumes: nothing left to do
        assert "0 files embedded, 2 skipped" in capsys.readouterr().err


def test_tag_with_a_model_without_a_classifier_says_so(folder, tiny_model_dir, tmp_path):
    r = run("tag", good_paths(folder)[0], "-o", str(tmp_path / "t"), *common(tiny_model_dir))
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()  # nothing left behind
