"""The registry: every published weight by name, each with its own configuration, loading from a checkpoint in
its upstream layout; AudioSet labels in upstream's order; heads of fine-tuned models."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from http_fixtures import Blob
from tiny import save_tiny, tiny_config, tiny_model, upstream_state_dict

import m2d2_embed as m2d2
from m2d2_embed import registry
from m2d2_embed.config import ClassifierConfig, EncoderConfig, FrontEndConfig, ModelConfig
from m2d2_embed.convert import CheckpointError, from_state_dict, read_any, save_model
from m2d2_embed.loader import list_models
from m2d2_embed.model import M2D2

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_README = Path("/work/.mirror/nttcslab+m2d/repo")


# --------------------------------------------------------------------------- the table itself


def test_every_published_weight_has_a_name_config_and_upstream_url():
    assert len(registry.MODELS) == 17 and registry.available_models()[0] == "m2d2-clap-2025"
    assert "m2d2-clap-2025-20ms" in registry.MODELS
    for info in registry.MODELS.values():
        assert info.config is not None and info.config.name == info.name
        folder = info.url.rsplit("/", 1)[1].removesuffix(".zip")
        assert info.member is None or info.member.startswith(folder + "/")
        assert info.url.startswith(registry.RELEASES + "/v0.")
        assert info.best_for and info.frame_ms in (20.0, 40.0, 160.0) and info.size_mb > 0
        # the folder name agrees with the config (the config is what is used; this guards typos in the table)
        m = re.match(r"^[^-]+-(\d+)x(\d+)p(\d+)x(\d+)(?:p(16|32)k)?", folder)
        enc, fe = info.config.encoder, info.config.frontend
        assert enc.input_size == (int(m[1]), int(m[2])) and enc.patch_size == (int(m[3]), int(m[4])), info.name
        assert fe.sample_rate == (32000 if m[5] == "32" else 16000), info.name
    as_ft = {n for n, i in registry.MODELS.items() if "AS-FT" in i.url or "_as_46ab246d" in i.url}
    assert set(registry.tagging_models()) == as_ft and len(as_ft) == 4


def test_release_urls_match_upstream_readme():
    """The two URLs that were wrong (v0.3.0 instead of v0.1.0) and every other table URL come from the README."""
    proc = subprocess.run(
        ["git", "--git-dir", str(UPSTREAM_README), "show", "HEAD:README.md"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip("upstream mirror not available")
    table_rows = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("| ["))
    readme_urls = set(re.findall(r"\((https://github\.com/nttcslab/m2d/releases/download/[^)]+\.zip)\)", table_rows))
    ours = {i.url for i in registry.MODELS.values()}
    v050 = {u for u in ours if "/v0.5.0/" in u}  # the M2D2 release, named in its release notes, not the README
    assert ours - v050 == readme_urls
    assert registry.MODELS["m2d-clap-2024"].url.endswith("/v0.1.0/m2d_clap_vit_base-80x608p16x16-240128.zip")
    assert registry.MODELS["m2d-as-2024"].url.endswith("/v0.1.0/m2d_as_vit_base-80x608p16x16-240213.zip")


def test_list_models_rows_and_cli_table(tmp_path):
    rows = {r["name"]: r for r in list_models(tmp_path)}
    assert rows["m2d2-clap-2025"]["default"] and rows["m2d2-clap-2025"]["dims"] == {
        "frame": 3840,
        "clip": 3840,
        "clap": 768,
    }
    assert rows["m2d2-clap-2025-20ms"]["frame_ms"] == 20 and rows["m2d2-clap-2025-20ms"]["dims"]["clip"] == 768
    assert rows["m2d-2023-40ms"]["frame_ms"] == 40
    assert rows["m2d-as-2024-32k"]["sample_rate"] == 32000
    assert rows["m2d-as-2024-tagging"]["dims"]["classes"] == 527 and "AT/SED" in rows["m2d-as-2024-tagging"]["best_for"]
    assert "speech" in rows["m2d-s-2023-6s"]["best_for"] and not any(r["cached"] for r in rows.values())
    proc = subprocess.run(
        [sys.executable, "-m", "m2d2_embed", "list", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["name", "best", "for", "frame", "dims", "download", "cached"]
    for name in registry.MODELS:
        assert any(line.startswith(name + " ") for line in lines), name
    assert re.search(r"m2d2-clap-2025-20ms\s+CLAP.*20 ms\s+768/768\s+~\d+ MB\s+no", proc.stdout)


# --------------------------------------------------------------------------- every entry builds from its layout


def _layout(info: registry.ModelInfo) -> str:
    if info.config.text is not None and info.text_weights is None:
        return "2025"
    if info.config.audio_head is not None:
        return "2024"
    return "evar" if info.config.classifier is not None else "m2d"


def _upstream_like(info: registry.ModelInfo) -> dict[str, torch.Tensor]:
    """A shape-only (meta) state dict in the entry's upstream layout, at the real ViT-B / BERT-base size."""
    cfg = ModelConfig(
        name="x",
        frontend=info.config.frontend,
        encoder=info.config.encoder,
        audio_head=info.config.audio_head,
        text=info.config.text if info.text_weights is None else None,
    )
    with torch.device("meta"):
        model = M2D2(cfg)
    layout = _layout(info)
    sd = upstream_state_dict(model, layout if layout != "2025" or cfg.text else "2024")
    if layout == "evar":
        d = info.config.classifier.in_features
        sd.update(
            {
                "module.head.norm.running_mean": torch.zeros(d, device="meta"),
                "module.head.norm.running_var": torch.ones(d, device="meta"),
                "module.head.norm.num_batches_tracked": torch.zeros((), dtype=torch.long, device="meta"),
                "module.head.mlp.mlp.0.weight": torch.empty(527, d, device="meta"),
                "module.head.mlp.mlp.0.bias": torch.empty(527, device="meta"),
            }
        )
    return sd


@pytest.mark.parametrize("name", list(registry.MODELS))
def test_every_entry_converts_from_its_upstream_layout_to_the_model_it_describes(name, caplog):
    info = registry.MODELS[name]
    sd = _upstream_like(info)
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.convert"):
        out, cfg = from_state_dict(sd, name="not-an-upstream-folder-name", config=info.config)
    assert "folder name" not in caplog.text  # the registry config is used, never the name
    assert cfg.encoder == info.config.encoder and cfg.frontend.sample_rate == info.config.frontend.sample_rate
    assert cfg.frontend == FrontEndConfig.for_rate(
        info.config.frontend.sample_rate, norm_mean=cfg.frontend.norm_mean, norm_std=cfg.frontend.norm_std
    )
    assert cfg.audio_head == info.config.audio_head and cfg.text == info.config.text
    assert cfg.text_weights == info.text_weights
    with torch.device("meta"):
        built = M2D2(cfg).state_dict()
    if info.text_weights:  # GTE-base comes from the Hub at load time (see test_hub)
        built = {k: v for k, v in built.items() if not k.startswith("text_encoder.")}
    assert set(out) == set(built), sorted(set(out) ^ set(built))[:5]  # the classifier too: nothing ignored
    for k, v in built.items():
        assert out[k].shape == v.shape, k
    if info.config.classifier is not None:
        assert cfg.classifier == info.config.classifier
        assert cfg.classifier.labels == registry.audioset_labels() and cfg.classifier.norm
        assert {k for k in out if k.startswith("classifier.")} == {
            "classifier.norm.running_mean",
            "classifier.norm.running_var",
            "classifier.linear.weight",
            "classifier.linear.bias",
        }
    else:
        assert cfg.classifier is None


def test_a_checkpoint_that_does_not_fit_its_entry_is_refused():
    info = registry.MODELS["m2d2-clap-2025-20ms"]
    sd = _upstream_like(registry.MODELS["m2d2-clap-2025"])  # 16x16 patches where the entry says 80x2
    with pytest.raises(CheckpointError, match="does not hold the model its registry entry describes.*patch_size"):
        from_state_dict(sd, config=info.config)


# --------------------------------------------------------------------------- end to end through the cache


def _tiny_entry_config(name: str, width: int, patch=(16, 16), rate=16000) -> ModelConfig:
    return ModelConfig(
        name=name,
        frontend=FrontEndConfig.for_rate(rate),
        encoder=EncoderConfig(input_size=(80, width), patch_size=patch, embed_dim=64, depth=2, num_heads=1),
    )


@pytest.mark.parametrize(
    ("folder", "width", "patch", "rate"),
    [
        ("m2d_as_vit_base-80x608p16x16p32k-240413_enconly", 608, (16, 16), 32000),
        ("m2d_s_vit_base-80x400p80x2-230201", 400, (80, 2), 16000),
    ],
)
def test_registry_config_wins_over_the_folder_and_args(monkeypatch, server, tmp_path, folder, width, patch, rate):
    """A p32k / 80x2 entry gets its front end and geometry from its entry, even from a checkpoint whose folder
    name and args say otherwise (here: a plain 16-kHz name, args claiming 16k and 80x1001)."""
    import argparse

    cfg = _tiny_entry_config("tiny-entry", width, patch, rate)
    model = tiny_model(cfg)
    sd = upstream_state_dict(model, "m2d")
    pth = tmp_path / "src" / "m2d_vit_base-80x1001p16x16-000000" / "checkpoint-300.pth"
    pth.parent.mkdir(parents=True)
    torch.save({"model": sd, "args": argparse.Namespace(sr="16k", input_size=[80, 1001])}, pth)
    zpath = tmp_path / f"{folder}.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.write(pth, f"{folder}/checkpoint-300.pth")
    server.routes[f"/{folder}.zip"] = Blob(zpath.read_bytes())
    info = registry.ModelInfo(
        "tiny-entry", server.url(f"/{folder}.zip"), None, None, 1, "tiny", "audio", config=cfg, best_for="test"
    )
    monkeypatch.setitem(registry.MODELS, "tiny-entry", info)
    loaded = m2d2.load("tiny-entry", device="cpu", cache_dir=tmp_path / "cache")
    assert loaded.config.frontend.sample_rate == rate and loaded.config.encoder == cfg.encoder
    wave = np.sin(np.linspace(0, 500, rate)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.clip_embeddings(wave, sample_rate=rate), model.clip_embeddings(wave, sample_rate=rate), atol=1e-5
    )


def test_folder_name_is_a_logged_last_resort_for_unknown_files(tmp_path, caplog):
    cfg = tiny_config(head=None, text=False, width=608)
    sd = upstream_state_dict(tiny_model(cfg), "m2d")  # a bare dict: no args recorded
    pth = tmp_path / "m2d_vit_base-80x608p16x16p32k-240101_enconly" / "weights.pth"
    pth.parent.mkdir()
    torch.save(sd, pth)
    with caplog.at_level(logging.WARNING, logger="m2d2_embed.convert"):
        got = read_any(pth)[1]
    assert got.frontend.sample_rate == 32000 and got.encoder.input_size == (80, 608)
    assert "taken from the folder name" in caplog.text


# --------------------------------------------------------------------------- AudioSet labels and heads


def test_audioset_labels_follow_upstreams_index_convention():
    path = REPO_ROOT / "m2d2_embed" / "assets" / "audioset_labels.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    mids = [r["mid"] for r in rows]
    assert len(rows) == 527 and mids == sorted(mids) and len(set(mids)) == 527  # EVAR: sorted mids
    assert sorted(int(r["audioset_index"]) for r in rows) == list(range(527))
    by_mid = {r["mid"]: r["display_name"] for r in rows}
    assert by_mid["/m/09x0r"] == "Speech" and by_mid["/m/0bt9lr"] == "Dog" and by_mid["/m/07hvw1"] == "Field recording"
    labels = registry.audioset_labels()
    assert labels[0] == "Firecracker" and labels[mids.index("/m/09x0r")] == "Speech"  # '/g/...' sorts first


def test_evar_head_is_converted_with_audioset_labels(tmp_path):
    cfg = tiny_config(head=None, text=False, width=608)
    model = tiny_model(cfg)
    sd = upstream_state_dict(model, "evar")
    torch.manual_seed(1)
    head = {
        "module.head.norm.running_mean": torch.randn(320),
        "module.head.norm.running_var": torch.rand(320) + 0.5,
        "module.head.norm.num_batches_tracked": torch.tensor(7),
        "module.head.mlp.mlp.0.weight": torch.randn(527, 320),
        "module.head.mlp.mlp.0.bias": torch.randn(527),
    }
    pth = tmp_path / "m2d_vit_base-80x608p16x16-221006-mr7_as_ft" / "weights_ep69it3124-0.47929.pth"
    pth.parent.mkdir()
    torch.save({"module." + k[len("module.") :]: v for k, v in {**sd, **head}.items()}, pth)
    out, got = read_any(pth)
    assert got.classifier == ClassifierConfig(
        in_features=320, num_classes=527, norm=True, labels=registry.audioset_labels(), multi_label=True
    )
    assert torch.equal(out["classifier.linear.weight"], head["module.head.mlp.mlp.0.weight"])
    assert torch.equal(out["classifier.norm.running_var"], head["module.head.norm.running_var"])
    assert not any("num_batches_tracked" in k for k in out)
    dst = save_model(out, got, tmp_path / "conv")  # the config and tensors survive our format
    again, cfg2 = read_any(dst)
    assert cfg2.classifier == got.classifier and torch.equal(
        again["classifier.linear.bias"], head["module.head.mlp.mlp.0.bias"]
    )


def test_finetune_export_classifier_is_read_beside_the_model(tmp_path):
    from types import SimpleNamespace

    from m2d2_embed.train.downstream import FinetuneModel, TaskHead

    dst = save_tiny(tmp_path / "ft", tiny_config(head=None, text=False))
    head = TaskHead(320, 3, norm=False)
    labels = SimpleNamespace(names=["dog", "rain", "siren"], multi_label=False)
    ft = SimpleNamespace(head=head, labels=labels)
    ft.classifier_config = lambda: FinetuneModel.classifier_config(ft)
    FinetuneModel.export_extra(ft, dst)  # the real exporter
    sd, cfg = read_any(dst)
    assert cfg.classifier == ClassifierConfig(
        in_features=320, num_classes=3, norm=False, labels=("dog", "rain", "siren"), multi_label=False
    )
    assert torch.equal(sd["classifier.linear.weight"], head.linear.weight.detach())
    assert torch.equal(sd["classifier.linear.bias"], head.linear.bias.detach())
    assert json.loads((dst / "config.json").read_text())["classifier"] is None  # read from the file, not copied


def test_classifier_files_of_earlier_exports_still_read_and_foreign_ones_are_refused(tmp_path):
    from safetensors.torch import save_file

    dst = save_tiny(tmp_path / "ft", tiny_config(head=None, text=False))
    w, b = torch.randn(2, 320), torch.randn(2)
    meta = {"labels": json.dumps(["cough", "sneeze"]), "multi_label": "true"}
    save_file({"weight": w, "bias": b}, str(dst / "classifier.safetensors"), metadata=meta)  # before linear.*
    sd, cfg = read_any(dst)
    assert cfg.classifier == ClassifierConfig(320, 2, norm=False, labels=("cough", "sneeze"), multi_label=True)
    assert torch.equal(sd["classifier.linear.weight"], w) and torch.equal(sd["classifier.linear.bias"], b)
    save_file({"head.weight": w}, str(dst / "classifier.safetensors"))
    with pytest.raises(CheckpointError, match="is not a classifier head"):
        read_any(dst)
